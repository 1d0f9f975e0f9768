"""Sweeps: grid expansion, dotted-path errors, resume, failed cells, backends agree."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sim.errors import RouteSimError
from sim.runner import run
from sim.scenario import parse_scenario
from sim.sweep import (
    CELLS_DIR,
    DONE_FILE,
    ERROR_FILE,
    GridError,
    cell_dir,
    expand,
    parse_grid,
    run_sweep,
)

# A cell of this grid simulates ~2 minutes at a few requests/s: a fraction of a second.
TINY = {
    "name": "tiny",
    "base": "load_spike",
    "overrides": {
        "duration_s": 120,
        "warmup_s": 10,
        "arrivals": {"kind": "poisson", "rate_per_s": 2.0},
        "workload.n_queries": 200,
        "run.drain_s": 30,
    },
}


def grid(**extra):
    return parse_grid({**TINY, **extra}, source="grid.yaml")


def test_expansion_is_the_cross_product_in_a_fixed_order():
    g = grid(
        axes={"arrivals.rate_per_s": [1.0, 3.0], "llms.0.replicas": [1, 2]},
        policies=["least_loaded", {"name": "cheapest", "axes": {"output_share": [0.3, 0.7]}}],
        seeds=[5, 6],
    )
    cells = expand(g)
    assert len(cells) == 2 * 2 * 3 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert [c.cell_id for c in expand(g)] == [c.cell_id for c in cells]  # stable ids
    first = cells[0]
    assert first.values == {"arrivals.rate_per_s": 1.0, "llms.0.replicas": 1}
    assert (first.policy, first.seed) == ("least_loaded", 5)
    assert cells[2].policy == "cheapest[output_share=0.3]"
    assert cells[2].values["policy.output_share"] == 0.3
    # The axis values reached the resolved scenario, and each cell has exactly one policy.
    last = parse_scenario(cells[-1].scenario)
    assert last.arrivals.rate_per_s == 3.0 and last.llms[0].replicas == 2
    assert [p.display for p in last.policy_specs] == ["cheapest[output_share=0.7]"]
    assert last.policy_specs[0].params == {"output_share": 0.7}


def test_seed_count_counts_from_the_scenario_seed():
    cells = expand(grid(overrides={**TINY["overrides"], "seed": 40}, seeds=3,
                        policies=["random"]))
    assert [c.seed for c in cells] == [40, 41, 42]


def test_cell_id_depends_only_on_the_resolved_run():
    a = expand(grid(axes={"llms.0.replicas": [1, 2]}, policies=["random"]))
    b = expand(grid(axes={"llms.0.replicas": [2, 3]}, policies=["random"]))
    assert a[1].cell_id == b[0].cell_id  # replicas=2 in both grids: same run, same id
    assert a[0].cell_id != b[1].cell_id


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("llms.0.replica", ["llms.0.replica", "'replica'", "replicas", "slots"]),
        ("arrivals.rate_per_ss", ["arrivals.rate_per_ss", "rate_per_s", "kind"]),
        ("llms.70.replicas", ["llms.70.replicas", "valid indices: 0.."]),
        ("slo.p95_wait_s.x", ["slo.p95_wait_s.x", "cannot go into 'slo.p95_wait_s'"]),
        ("nosuch", ["'nosuch'", "duration_s", "arrivals", "llms"]),
    ],
)
def test_bad_dotted_path_names_the_path_and_the_valid_keys(path, expected):
    with pytest.raises(GridError) as info:
        expand(grid(axes={path: [1]}, policies=["random"]))
    msg = str(info.value)
    assert msg.startswith(f"grid.yaml: axes.{path}:")
    for part in expected:
        assert part in msg


def test_invalid_axis_value_names_the_cell_and_the_field():
    with pytest.raises(GridError) as info:
        expand(grid(axes={"llms.0.replicas": [1, 0]}, policies=["random"]))
    msg = str(info.value)
    assert "llms.0.replicas=0" in msg and "greater than or equal to 1" in msg


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"axis": {}}, ["axis", "allowed keys", "axes", "overrides"]),
        ({"seedz": [1]}, ["seedz", "did you mean 'seeds'?"]),
        ({"policies": [{"name": "threshold", "axis": {}}]}, ["policies.0.axis", "params"]),
        ({"policies": ["nope"]}, ["policies.0", "unknown policy 'nope'", "least_loaded"]),
        ({"policies": [{"name": "cheapest", "axes": {"share": [1]}}]},
         ["policies.0.params.share", "output_share"]),
        ({"axes": {"seed": [1, 2]}}, ["axes.seed", "`seeds`"]),
        ({"axes": {"llms.0.slots": [4, 4]}}, ["axes.llms.0.slots", "twice"]),
    ],
)
def test_grid_errors_say_what_is_allowed(extra, expected):
    with pytest.raises(RouteSimError) as info:
        expand(grid(**extra))
    for part in expected:
        assert part in str(info.value)


def test_new_keys_are_allowed_in_free_form_mappings():
    over = {**TINY["overrides"], "workload.mix": {"code": 1.0}}
    cells = expand(grid(overrides=over, axes={"workload.mix.math": [1.0, 3.0]},
                        policies=["random"]))
    assert parse_scenario(cells[1].scenario).workload.mix == {"code": 1.0, "math": 3.0}


def test_resume_skips_finished_cells(tmp_path):
    g = grid(axes={"arrivals.rate_per_s": [1.0, 3.0]}, policies=["least_loaded", "cheapest"])
    first = run_sweep(g, tmp_path, backend="inline")
    assert (first.ran, first.skipped, first.failed) == (4, 0, 0)
    done = {c.cell_id: (cell_dir(tmp_path, c.cell_id) / "summary.json").stat().st_mtime_ns
            for c in first.cells}
    again = run_sweep(g, tmp_path, backend="inline")
    assert (again.ran, again.skipped) == (0, 4)
    for cid, mtime in done.items():  # untouched: nothing was rerun
        assert (cell_dir(tmp_path, cid) / "summary.json").stat().st_mtime_ns == mtime
    # An interrupted cell (no done marker) is run again, and only that one.
    victim = first.cells[2].cell_id
    (cell_dir(tmp_path, victim) / DONE_FILE).unlink()
    third = run_sweep(g, tmp_path, backend="inline")
    assert (third.ran, third.skipped) == (1, 3)
    assert third.frame.drop("elapsed_s").equals(first.frame.drop("elapsed_s"))
    # Growing the grid runs only the new cells.
    bigger = grid(axes={"arrivals.rate_per_s": [1.0, 3.0, 5.0]},
                  policies=["least_loaded", "cheapest"])
    fourth = run_sweep(bigger, tmp_path, backend="inline")
    assert (fourth.ran, fourth.skipped) == (2, 4)


def test_failed_cell_is_recorded_and_others_finish(tmp_path):
    missing = tmp_path / "no_such_trace.csv"
    g = grid(axes={"arrivals": [{"kind": "poisson", "rate_per_s": 2.0},
                                {"kind": "trace", "path": str(missing)}]},
             policies=["least_loaded", "cheapest"])
    res = run_sweep(g, tmp_path / "out", backend="inline")
    assert (res.ran, res.failed) == (4, 2)
    df = res.frame
    assert df["status"].to_list() == ["ok", "ok", "failed", "failed"]
    bad = df.filter(pl.col("status") == "failed")
    assert bad["error"].str.contains("trace file not found").all()
    assert bad["quality_pct_of_reference"].is_null().all()
    for cid in bad["cell_id"]:
        d = tmp_path / "out" / CELLS_DIR / cid
        err = json.loads((d / ERROR_FILE).read_text())
        assert err["type"] == "DataError"
        assert "Traceback (most recent call last)" in err["traceback"]
        assert not (d / DONE_FILE).exists()
    assert df.filter(pl.col("status") == "ok")["arrived"].min() > 0
    # The axis of dicts is stored as JSON text, one dtype per column.
    assert df["arrivals"].dtype == pl.String
    # A rerun tries the failed cells again (and only those).
    again = run_sweep(g, tmp_path / "out", backend="inline")
    assert (again.ran, again.skipped, again.failed) == (2, 2, 2)


def _comparable(df: pl.DataFrame) -> pl.DataFrame:
    return df.drop("elapsed_s").sort("index")


def test_local_pool_matches_a_sequential_run(tmp_path):
    g = grid(axes={"arrivals.rate_per_s": [1.0, 3.0]}, policies=["least_loaded", "random"],
             seeds=[1, 2])
    res = run_sweep(g, tmp_path / "local", backend="local", workers=2)
    assert (res.ran, res.failed) == (8, 0)
    inline = run_sweep(g, tmp_path / "inline", backend="inline")
    assert _comparable(res.frame).equals(_comparable(inline.frame))
    # ... and each cell equals a plain sequential `sim.runner.run` of its scenario and seed.
    for cell in res.cells[:3]:
        direct = run(parse_scenario(cell.scenario), None, [cell.seed])
        stored = json.loads((cell_dir(res.out, cell.cell_id) / "summary.json").read_text())
        assert stored == json.loads(json.dumps(direct.summaries[0]))
        req = pl.read_parquet(cell_dir(res.out, cell.cell_id) / "requests.parquet")
        assert req.equals(direct.requests.drop("scenario", "policy", "seed"))


def test_sweep_report_is_offline_html(tmp_path):
    from reports.sweep_report import write_sweep_report

    g = grid(axes={"arrivals.rate_per_s": [1.0, 3.0], "llms.0.replicas": [1, 2]},
             policies=["least_loaded", "oracle"])
    run_sweep(g, tmp_path, backend="inline")
    path = write_sweep_report(tmp_path)
    text = Path(path).read_text()
    assert "oracle (upper bound)" in text and "least_loaded (upper bound)" not in text
    assert "quality, % of reference along arrivals.rate_per_s" in text
    assert "llms.0.replicas x arrivals.rate_per_s" in text  # a heatmap of the axis pair
    assert 'src="https://' not in text  # plotly.js is inline
    assert text.count("<div class='fig'>") == 6 * (2 + 1)  # per metric: 2 lines, 1 heatmap


def test_cli_sweep_runs_resumes_and_rejects_bad_grids(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from sim.cli import app

    gfile = tmp_path / "g.yaml"
    gfile.write_text(yaml.safe_dump({**TINY, "axes": {"arrivals.rate_per_s": [1.0, 2.0]},
                                     "policies": ["least_loaded"]}))
    out = tmp_path / "out"
    cli = CliRunner()
    r = cli.invoke(app, ["sweep", str(gfile), "--backend", "inline", "--out", str(out),
                         "--no-report"])
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(out / "sweep.parquet")["status"].to_list() == ["ok", "ok"]
    r = cli.invoke(app, ["sweep", str(gfile), "--backend", "inline", "--out", str(out),
                         "--no-report"])
    assert r.exit_code == 0 and "2 skipped" in r.output
    gfile.write_text(yaml.safe_dump({**TINY, "axes": {"llms.0.replica": [1]}}))
    r = cli.invoke(app, ["sweep", str(gfile), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2
    assert "llms.0.replica" in r.output and "replicas" in r.output
    assert not (tmp_path / "bad").exists()


def test_sweep_command_writes_the_report_when_reports_are_registered(tmp_path, monkeypatch):
    import typer
    import yaml
    from typer.testing import CliRunner

    import sim.sweep
    from reports import sweep_report

    monkeypatch.setattr(sim.sweep, "AFTER_SWEEP_HOOKS", [])
    app = typer.Typer()
    sim.sweep.register(app)
    sweep_report.register(app)
    gfile = tmp_path / "g.yaml"
    gfile.write_text(yaml.safe_dump({**TINY, "axes": {"arrivals.rate_per_s": [1.0, 2.0]},
                                     "policies": ["least_loaded"]}))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sweep", str(gfile), "--backend", "inline", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "sweep_report.html").is_file()
    (out / "sweep_report.html").unlink()
    r = CliRunner().invoke(app, ["sweep-report", str(out)])
    assert r.exit_code == 0 and (out / "sweep_report.html").is_file()


@pytest.mark.slow
def test_ray_backend_matches_local(tmp_path):
    pytest.importorskip("ray")
    g = grid(axes={"arrivals.rate_per_s": [1.0, 3.0]}, policies=["least_loaded", "random"])
    ray_res = run_sweep(g, tmp_path / "ray", backend="ray", workers=2)
    assert (ray_res.ran, ray_res.failed) == (4, 0)
    local = run_sweep(g, tmp_path / "local", backend="inline")
    assert _comparable(ray_res.frame).equals(_comparable(local.frame))
    for cell in ray_res.cells:  # the driver wrote the same files the workers would have
        a = pl.read_parquet(cell_dir(ray_res.out, cell.cell_id) / "requests.parquet")
        b = pl.read_parquet(cell_dir(local.out, cell.cell_id) / "requests.parquet")
        assert a.equals(b)


def test_sweep_report_is_the_same_file_for_the_same_sweep(tmp_path):
    from reports.sweep_report import sweep_report_html

    g = grid(axes={"arrivals.rate_per_s": [1.0, 2.0]}, policies=["least_loaded"])
    run_sweep(g, tmp_path / "a", backend="inline")
    run_sweep(g, tmp_path / "b", backend="inline")
    first = sweep_report_html(tmp_path / "a")
    assert "<div class='fig'>" in first
    assert sweep_report_html(tmp_path / "a") == first
    assert sweep_report_html(tmp_path / "b") == first


def test_corrupt_sweep_parquet_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from sim.cli import app
    from sim.sweep import read_sweep

    (tmp_path / "sweep.parquet").write_bytes(b"not parquet")
    with pytest.raises(RouteSimError, match="cannot read parquet") as exc:
        read_sweep(tmp_path)
    assert str(tmp_path / "sweep.parquet") in str(exc.value)
    r = CliRunner().invoke(app, ["sweep-report", str(tmp_path)])
    assert r.exit_code == 2 and "cannot read parquet" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "sweep_report.html").exists()


def test_a_rerun_asking_for_more_outputs_reruns_the_cells_without_them(tmp_path):
    # done.json alone used to mark a cell finished, so a rerun with save_requests: true
    # skipped cells run without it and they never got their requests.parquet.
    lean = run_sweep(grid(policies=["random"], save_requests=False), tmp_path,
                     backend="inline")
    d = cell_dir(tmp_path, lean.cells[0].cell_id)
    assert not (d / "requests.parquet").exists()
    full = run_sweep(grid(policies=["random"], save_requests=True), tmp_path, backend="inline")
    assert (full.ran, full.skipped) == (1, 0) and (d / "requests.parquet").is_file()
    again = run_sweep(grid(policies=["random"], save_requests=True), tmp_path,
                      backend="inline")
    assert (again.ran, again.skipped) == (0, 1)


def test_a_cells_scenario_file_reruns_the_cell(tmp_path):
    # The cell's scenario.yaml carries its seed (it used to keep the grid's base seed, so
    # `routesim run` on it simulated another seed).
    res = run_sweep(grid(policies=["random"], seeds=[3, 4]), tmp_path, backend="inline")
    for cell in res.cells:
        d = cell_dir(tmp_path, cell.cell_id)
        again = run(str(d / "scenario.yaml"), seeds=1)
        summary = json.loads((d / "summary.json").read_text())
        assert again.summaries[0]["seed"] == cell.seed
        assert again.summaries[0]["quality_pct_of_reference"] == pytest.approx(
            summary["quality_pct_of_reference"])
        assert again.summaries[0]["p95_wait_s"] == pytest.approx(summary["p95_wait_s"])


def test_a_relative_data_path_resolves_the_same_from_any_working_directory(
        tmp_path, monkeypatch):
    # Beside the scenario file; it used to stay relative when it also existed from the
    # working directory, so a sweep cell's id (and its path) depended on where it ran.
    from sim.scenario import load_scenario

    home = tmp_path / "scen"
    home.mkdir()
    (home / "data.csv").write_text("x\n")
    sc = home / "s.yaml"
    sc.write_text(
        "name: s\nseed: 1\nduration_s: 10\n"
        "workload: {source: routerbench, path: data.csv, reference_llm: gpt-4}\n"
        "arrivals: {kind: poisson, rate_per_s: 1}\n"
        "llms: [{name: gpt-4, price_in_per_mtok: 10, price_out_per_mtok: 30}]\n"
    )
    paths = []
    for cwd in (home, tmp_path):
        monkeypatch.chdir(cwd)
        paths.append(load_scenario(str(sc)).workload.path)
    assert paths[0] == paths[1] == str((home / "data.csv").resolve())


def test_the_encoder_directories_resolve_beside_the_scenario_file(tmp_path, monkeypatch):
    from sim.scenario import load_scenario

    home = tmp_path / "scen"
    home.mkdir()
    sc = home / "s.yaml"
    sc.write_text(
        "name: s\nseed: 1\nduration_s: 10\n"
        "workload: {source: synthetic, encoder: {model_path: models/bert, cache_dir: cache,"
        " kind: hashing}}\n"
        "arrivals: {kind: poisson, rate_per_s: 1}\n"
        "llms: [{name: gpt-4, price_in_per_mtok: 10, price_out_per_mtok: 30}]\n"
    )
    monkeypatch.chdir(tmp_path)
    enc = load_scenario(str(sc)).workload.encoder
    assert enc.model_path == str((home / "models" / "bert").resolve())
    assert enc.cache_dir == str((home / "cache").resolve())
    # as for workload.path: a directory that exists only from the working directory
    (tmp_path / "models" / "bert").mkdir(parents=True)
    enc = load_scenario(str(sc)).workload.encoder
    assert enc.model_path == str((tmp_path / "models" / "bert").resolve())
    sc.write_text(sc.read_text().replace("cache_dir: cache", "cache_dir: ~/c"))
    assert load_scenario(str(sc)).workload.encoder.cache_dir == "~/c"  # the user's home


def test_a_policys_encoder_directories_resolve_beside_the_scenario_file(tmp_path,
                                                                         monkeypatch):
    # mixllm's tag encoder is its own `encoder` param: its relative paths used to resolve
    # from wherever routesim was started.
    from sim.scenario import load_scenario

    home = tmp_path / "scen"
    home.mkdir()
    sc = home / "s.yaml"
    sc.write_text(
        "name: s\nseed: 1\nduration_s: 10\nworkload: {source: synthetic}\n"
        "arrivals: {kind: poisson, rate_per_s: 1}\n"
        "llms: [{name: gpt-4, price_in_per_mtok: 10, price_out_per_mtok: 30}]\n"
        "policies: [random, {name: mixllm, params: {tags: false, encoder: {model_path: "
        "models/bert, cache_dir: /abs/cache, kind: transformer}}}]\n"
    )
    monkeypatch.chdir(tmp_path)
    specs = load_scenario(str(sc)).policy_specs
    assert specs[0].name == "random"
    enc = specs[1].params["encoder"]
    assert enc == {"model_path": str((home / "models" / "bert").resolve()),
                   "cache_dir": "/abs/cache", "kind": "transformer"}


def test_an_unknown_baseline_fails_before_any_run(tmp_path):
    ran = []
    with pytest.raises(RouteSimError,
                       match="baseline: 'cheapst' is not one of the policies run") as err:
        run(grid_scenario(), policies=["random", "cheapest"], seeds=2, out=tmp_path / "o",
            baseline="cheapst", on_run_done=ran.append)
    assert err.value.field == "baseline" and ran == [] and not (tmp_path / "o").exists()


def grid_scenario():
    return parse_scenario({"name": "b", "seed": 1, "duration_s": 60,
                           "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
                           "llms": [{"name": "gpt-4", "price_in_per_mtok": 10,
                                     "price_out_per_mtok": 30},
                                    {"name": "mistral-7b", "price_in_per_mtok": 0.2,
                                     "price_out_per_mtok": 0.2}]})


def _children(pid: int) -> set[int]:
    """Every descendant of a process (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out |= {k} | _children(k)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _stop_a_long_sweep(tmp_path: Path, sig: int) -> tuple[int, set[int]]:
    """Start `routesim sweep` on two long cells with two workers, send `sig` to the driver
    once both workers run a cell; returns its exit code and its descendants then (the
    workers and the pool's helper processes), after they had time to end."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    gfile = tmp_path / "grid.yaml"
    gfile.write_text(yaml.safe_dump({
        "name": "long", "base": "steady", "policies": ["random"], "seeds": [1, 2],
        "overrides": {"duration_s": 10**6},
    }))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.cli", "sweep", str(gfile), "--workers", "2", "--out",
         str(tmp_path / "out"), "--no-report"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    kids: set[int] = set()
    try:
        # Wait (the bound only stops a hung test) until both workers run a cell.
        for _ in range(1200):
            kids = _children(proc.pid)
            if len(kids) >= 2 and any((tmp_path / "out").rglob("*")):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        assert len(kids) >= 2
        proc.send_signal(sig)
        proc.wait(timeout=120)
        for _ in range(600):  # their exit is asynchronous to the driver's
            if not any(_alive(k) for k in kids):
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in kids:  # a failing run leaves nothing behind
            if _alive(k):
                os.kill(k, 9)
    return proc.returncode, kids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_sigterm_stops_the_sweep_workers(tmp_path):
    """A terminated `routesim sweep` stops its worker processes (they used to run on,
    orphaned, for as long as their cells took) and exits 128 + SIGTERM."""
    import signal

    code, kids = _stop_a_long_sweep(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert not any(_alive(k) for k in kids)
    # The finished (here: none) and pending cells are listed, so a rerun resumes.
    assert (tmp_path / "out" / "sweep.parquet").is_file()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_a_killed_sweep_driver_takes_its_workers_with_it(tmp_path):
    """SIGKILL reaches no handler of the driver: its workers end by the parent-death signal
    they asked the kernel for (they used to run on until their cells ended)."""
    import signal

    code, kids = _stop_a_long_sweep(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not any(_alive(k) for k in kids)
