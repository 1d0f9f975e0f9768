"""`routesim run` end to end on the built-in default scenario, and the Python API."""

from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

import sim
from helpers import llm, scenario
from policies import registry
from sim.cli import app
from sim.engine import Simulation, prepare_inputs
from sim.errors import RouteSimError
from sim.metrics import SUMMARY_KEYS
from sim.runner import build_workload

runner = CliRunner()


def test_default_run_writes_every_output(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "--policy", "least_loaded", "--policy", "cheapest",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "load_spike" in res.output and "runs" in res.output
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary.height == 2
    for pol in ("least_loaded", "cheapest"):
        d = out / "load_spike" / pol / "seed7"
        for f in ("requests.parquet", "timeline.parquet", "events.parquet", "summary.json"):
            assert (d / f).is_file(), f
        s = json.loads((d / "summary.json").read_text())
        assert set(SUMMARY_KEYS) <= set(s)
        req = pl.read_parquet(d / "requests.parquet")
        assert req.height == s["arrived"] + req.filter(pl.col("arrival_s") < 300).height
        assert s["arrived"] == sum(s[k] for k in ("completed", "rejected", "abandoned",
                                                  "failed", "in_flight"))
    assert (out / "load_spike" / "scenario.yaml").is_file()
    # No temp files left behind by the atomic writers.
    assert not list(out.rglob("*.tmp"))


def test_same_seed_same_summaries(tmp_path):
    a = sim.run("load_spike", policies=["least_loaded"], seeds=1, keep_requests=False)
    b = sim.run("load_spike", policies=["least_loaded"], seeds=1, keep_requests=False)
    assert a.summary.equals(b.summary)


def test_python_api_returns_frames():
    sc = scenario(duration_s=100)
    res = sim.run(sc, policies=["random", "round_robin"], seeds=2)
    assert res.summary.height == 4
    assert set(res.requests["policy"].unique()) == {"random", "round_robin"}
    assert set(res.requests["seed"].unique()) == {1, 2}


def test_list_shows_policies_and_scenarios():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    for name in ("random", "least_loaded", "oracle", "load_spike"):
        assert name in res.output
    text = " ".join(res.output.replace("│", " ").split())
    # Notes end at a sentence's end, not at a docstring's line break or a column width.
    assert "is already predicted)." in text  # mlp's note spans three docstring lines
    assert "(the MixLLM paper's step, Wang et al. NAACL 2025" in text  # llm_addition's


def test_rate_limit_rejects_excess():
    sc = scenario(duration_s=200, arrivals={"kind": "poisson", "rate_per_s": 4.0},
                  llms=[llm("gpt-4", slots=100, rate_limit_per_s=1.0)],
                  run={"drain_s": None})
    wl = build_workload(sc, 1)
    res = Simulation(sc, registry.create("random"), prepare_inputs(sc, wl, 1), seed=1).run()
    req = res.requests
    done = req.filter(pl.col("outcome") == "completed").height
    # A 1/s token bucket with a 1 s burst admits at most 1 per second plus the burst.
    assert done <= 200 * 1.0 + 1
    rej = req.filter(pl.col("outcome") == "rejected")
    assert rej.height >= req.height - done
    assert (rej["reject_reason"] == "rate_limited").all()


def test_refined_feedback_is_continuous():
    sc = scenario(duration_s=200, llms=[llm("gpt-4", slots=100)],
                  feedback={"probability": 1.0, "mode": "refined", "noise": 0.1},
                  run={"drain_s": None})
    wl = build_workload(sc, 1)
    res = Simulation(sc, registry.create("random"), prepare_inputs(sc, wl, 1), seed=1).run()
    fb = res.requests["feedback"].drop_nulls().to_numpy()
    assert fb.size > 0 and fb.min() >= 0 and fb.max() <= 100
    assert len(set(fb.tolist())) > 5  # not just thumbs


# ------------------------------------------------------------------ output directories
def _tiny(name: str = "t", policies=("random", "round_robin")):
    return scenario(name=name, duration_s=60, policies=list(policies))


def test_rerun_replaces_the_scenario_and_keeps_other_scenarios(tmp_path):
    from reports.rundata import discover_runs
    from sim.runner import run

    run(_tiny(), out=tmp_path)
    run(_tiny(policies=["random"]), out=tmp_path)
    # The second run's policies only: no stale round_robin directory, rows or report.
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["random", "scenario.yaml"]
    assert pl.read_parquet(tmp_path / "summary.parquet")["policy"].to_list() == ["random"]
    run(_tiny("u", ["cheapest"]), out=tmp_path)
    rows = pl.read_parquet(tmp_path / "summary.parquet").select("scenario", "policy")
    assert sorted(rows.iter_rows()) == [("t", "random"), ("u", "cheapest")]
    assert [(s.name, s.policies) for s in discover_runs(tmp_path)] == [
        ("t", ["random"]), ("u", ["cheapest"])]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _failing_setup(monkeypatch):
    """cheapest fails at setup the way a policy reports bad params (its own field path)."""
    from sim.errors import PolicyError

    def boom(self, ctx):
        raise PolicyError("no such LLM at setup", field="cheapest.params.output_share")

    monkeypatch.setattr(registry.get("cheapest"), "setup", boom)


def test_policy_failing_at_setup_leaves_no_output_and_names_file_and_entry(
        tmp_path, monkeypatch):
    import yaml

    p = tmp_path / "sc.yaml"
    p.write_text(yaml.safe_dump(_tiny(policies=["random", "cheapest"]).model_dump(
        mode="json", exclude_defaults=True)))
    _failing_setup(monkeypatch)
    out = tmp_path / "new" / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert f"{p}: policies.1.params.output_share: no such LLM at setup" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "new").exists()  # random's finished run is not left behind


def test_failed_rerun_keeps_the_previous_result(tmp_path, monkeypatch):
    from sim.runner import run

    run(_tiny(), out=tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*")
              if p.is_file()}
    _failing_setup(monkeypatch)
    with pytest.raises(RouteSimError, match=r"policies\.1\.params\.output_share"):
        run(_tiny(policies=["random", "cheapest"]), out=tmp_path)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*")
             if p.is_file()}
    assert after == before


@pytest.mark.parametrize("labels, rule", [
    (["fast router", "fast/router"], "give the same output directory 'fast_router'"),
    (["a", "A"], "give the same output directory 'A'"),
    (["ok", "."], "cannot name an output directory"),
    (["ok", ".."], "cannot name an output directory"),
])
def test_policy_labels_must_give_distinct_directories(labels, rule):
    from sim.runner import resolve_policies

    with pytest.raises(RouteSimError, match=rule) as exc:
        sc = scenario(policies=[{"name": "random", "label": x} for x in labels])
        resolve_policies(sc)
    assert "policies.1.label" in str(exc.value)


def test_out_that_is_a_file_fails_before_any_work(tmp_path):
    import yaml

    sc = tmp_path / "sc.yaml"
    sc.write_text(yaml.safe_dump(_tiny().model_dump(mode="json", exclude_defaults=True)))
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": str(sc)}))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for args in (["run", str(sc)], ["plan", str(sc), "-p", "random", "--slo-p95-wait", "2"],
                 ["frontier", str(sc), "-p", "knn"], ["sweep", str(grid), "--backend",
                                                      "inline"]):
        for out in (afile, afile / "sub"):
            res = runner.invoke(app, [*args, "--out", str(out)])
            assert res.exit_code == 2, (args, res.output)
            assert f"{out}: --out: " in res.output and "not a directory" in res.output
            assert "Traceback" not in res.output
    assert afile.read_text() == "keep me" and len(list(tmp_path.iterdir())) == 3


def test_error_text_with_brackets_prints_as_is(tmp_path):
    res = runner.invoke(app, ["run", "--policy", "mixllm[bold]", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "unknown policy 'mixllm[bold]'" in res.output


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_an_interrupt_while_swapping_the_result_in_leaves_out_as_it_was(tmp_path, monkeypatch):
    """The last step of a run (moving summary.parquet into place) interrupted: the new
    scenario directory goes back out, the previous one back in."""
    import os

    import sim.runner as runner_mod

    runner_mod.run(_tiny(), out=tmp_path)
    before = _files(tmp_path)
    real_replace = os.replace

    def interrupted(src, dst):
        if f".summary.parquet{runner_mod.PARTIAL_MARK}" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(runner_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner_mod.run(_tiny(policies=["random"]), out=tmp_path)
    assert _files(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_staging_left_by_a_killed_run_is_cleaned_up_or_restored(tmp_path):
    """Only this host's runs whose process is gone count as dead: another host's staging
    (a shared OUT) and a live process's are left alone."""
    import os

    from sim.runner import _HOST, OLD_MARK, PARTIAL_MARK, run

    dead = f"{_HOST}-{2**22 + 12345}-0a1b2c3d"  # pid above Linux's default pid_max
    elsewhere = f"otherhost-{2**22 + 12345}-0a1b2c3d"
    alive = f"{_HOST}-{os.getpid()}-0a1b2c3d"
    run(_tiny(), out=tmp_path)
    # A run killed mid-swap: the previous result set aside, nothing in its place.
    (tmp_path / "t").rename(tmp_path / f".t{OLD_MARK}{dead}")
    for token in (dead, elsewhere, alive):
        (tmp_path / f".t{PARTIAL_MARK}{token}" / "random" / "seed1").mkdir(parents=True)
    run(_tiny("u", ["random"]), out=tmp_path)  # another scenario: t's leftovers stay
    assert (tmp_path / f".t{PARTIAL_MARK}{dead}").exists()
    run(_tiny(policies=["random"]), out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        f".t{PARTIAL_MARK}{token}" for token in (elsewhere, alive))
    # The restored result was then replaced by the new run, as any re-run does.
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["random", "scenario.yaml"]


def test_a_killed_run_that_set_the_result_aside_gets_it_back(tmp_path):
    from sim.runner import _HOST, OLD_MARK, _remove_dead_staging, run

    run(_tiny(), out=tmp_path)
    kept = _files(tmp_path / "t")
    (tmp_path / "t").rename(tmp_path / f".t{OLD_MARK}{_HOST}-{2**22 + 7}-00ff00ff")
    _remove_dead_staging(tmp_path, "t")
    assert _files(tmp_path / "t") == kept


@pytest.mark.parametrize("kind", ["link to a directory", "link to a file", "file"])
def test_a_scenario_path_that_is_not_a_plain_directory_is_bad_input(tmp_path, kind):
    """A run replaces OUT/<scenario> as a whole: through a link it would drop the link or
    land on other storage, over a file it would destroy it. Refused before any run."""
    from sim.runner import run

    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    if kind == "link to a directory":
        elsewhere.mkdir()
        (out / "t").symlink_to(elsewhere, target_is_directory=True)
    elif kind == "link to a file":
        elsewhere.write_text("notes")
        (out / "t").symlink_to(elsewhere)
    else:
        (out / "t").write_text("notes")
    with pytest.raises(RouteSimError, match="replaces a scenario's directory as a whole"):
        run(_tiny(), out=out)
    assert sorted(p.name for p in out.iterdir()) == ["t"]
    if kind == "link to a file":
        assert elsewhere.read_text() == "notes"


def test_out_that_is_a_dangling_symlink_is_bad_input(tmp_path):
    dangling = tmp_path / "dang"
    dangling.symlink_to(tmp_path / "missing")
    res = runner.invoke(app, ["run", "--policy", "random", "--out", str(dangling)])
    assert res.exit_code == 2 and "symbolic link to nothing" in res.output
    assert "Traceback" not in res.output


def test_sigterm_removes_the_staged_outputs(tmp_path):
    """A terminated `routesim run` unwinds like Ctrl-C: nothing staged is left behind."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    sc = tmp_path / "long.yaml"
    sc.write_text(yaml.safe_dump(scenario(name="long", duration_s=10**6, policies=["random"])
                                 .model_dump(mode="json", exclude_defaults=True)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "run", str(sc), "--out", str(out),
                             "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Wait (not a timed assertion: the bound only stops a hung test) until it has staged.
        for _ in range(1200):
            if out.is_dir() and any(p.name.startswith(".long") for p in out.iterdir()):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists() or not any(out.iterdir())


def test_an_interrupt_while_staging_is_set_up_leaves_nothing(tmp_path, monkeypatch):
    """A signal that lands after the staging directory is made but before the run knows
    it (here: while dead staging is cleaned up) left the directory behind: the full-suite
    run of the SIGTERM test above failed so, once."""
    import sim.runner as sim_runner

    def interrupted(out, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim_runner, "_remove_dead_staging", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sim_runner.run(scenario(duration_s=5.0, policies=["random"]), out=out)
    assert not out.exists()


def test_signals_during_a_held_block_come_after_it():
    """Blocking the signals in the main thread held nothing: the kernel handed them to
    another thread (numpy and polars run some) and Python raised in the main thread at
    once, in the middle of the block."""
    import os
    import select
    import signal
    import threading

    from sim.runner import _signals_held

    idle = threading.Event()
    other = threading.Thread(target=idle.wait)  # a thread that does not block them
    other.start()
    # The wakeup fd tells when the signal has reached the C handler, in whichever thread.
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous_fd = signal.set_wakeup_fd(w)
    # Python's own Ctrl-C handler: a process started in the background by a shell (a CI job
    # run with `&`) inherits SIGINT ignored, and an ignored signal is held as ignored.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached_end = False
    try:
        with pytest.raises(KeyboardInterrupt), _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            assert select.select([r], [], [], 60)[0]  # the bound only stops a hang
            for _ in range(1000):  # Python runs its handler at the next check
                pass
            reached_end = True
        restored = signal.getsignal(signal.SIGINT)  # the block put back the handler it found
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.set_wakeup_fd(previous_fd)
        os.close(r)
        os.close(w)
        idle.set()
        other.join()
    assert reached_end
    assert restored is signal.default_int_handler


def test_the_saved_scenario_runs_the_policies_that_ran(tmp_path):
    """--policy replaces the file's list: the saved scenario.yaml says so, and running it
    again reproduces the run."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "steady", "--policy", "cheapest", "--policy",
                              "least_loaded", "--out", str(out), "--no-report"])
    assert res.exit_code == 0, res.output
    saved = out / "steady" / "scenario.yaml"
    import yaml

    assert yaml.safe_load(saved.read_text())["policies"] == [
        # Every param written out, defaults too: a later default change leaves a rerun alone.
        {"name": "cheapest", "params": {"output_share": 0.5}, "label": None},
        {"name": "least_loaded", "params": {}, "label": None},
    ]
    again = runner.invoke(app, ["run", str(saved), "--out", str(tmp_path / "again"),
                                "--no-report"])
    assert again.exit_code == 0, again.output
    first = pl.read_parquet(out / "summary.parquet")
    second = pl.read_parquet(tmp_path / "again" / "summary.parquet")
    assert first.equals(second)


@pytest.mark.parametrize("seed", ['"abc"', "[1]", "true"])
def test_report_on_a_corrupt_summary_is_bad_input(tmp_path, seed):
    d = tmp_path / "s" / "random" / "seed1"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(f'{{"policy": "random", "seed": {seed}}}')
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "seed" in res.output, res.output
    assert "Traceback" not in res.output
    (d / "summary.json").write_bytes(b"\xff\xfe{")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "unreadable summary" in res.output, res.output


def test_a_policy_picked_by_name_or_label_keeps_the_scenarios_params(tmp_path):
    import yaml

    from sim.scenario import load_scenario

    sc = scenario(duration_s=60)
    data = sc.model_dump(mode="json")
    data["policies"] = [{"name": "cheapest", "params": {"output_share": 0.75}},
                        {"name": "random", "label": "random again"}, "round_robin"]
    path = tmp_path / "sc.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(path), "-p", "cheapest", "-p", "random again",
                              "-p", "least_loaded", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ran = load_scenario(out / sc.name / "scenario.yaml").policy_specs
    assert [(s.name, s.display, s.params) for s in ran] == [
        ("cheapest", "cheapest", {"output_share": 0.75}),
        ("random", "random again", {}), ("least_loaded", "least_loaded", {})]
    twice = runner.invoke(app, ["run", str(path), "-p", "random", "-p", "random",
                                "--out", str(tmp_path / "o2")])
    # Both pick the scenario's entry of that policy.
    assert twice.exit_code == 2 and "'random again' is given twice" in twice.output



def test_a_baseline_named_by_policy_is_the_label_that_policy_ran_under(tmp_path):
    import yaml

    data = scenario(duration_s=60).model_dump(mode="json")
    data["policies"] = [{"name": "random", "label": "rnd"}, "round_robin"]
    path = tmp_path / "sc.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(path), "-p", "round_robin", "-p", "random",
                              "--baseline", "random", "--out", str(out), "--no-report"])
    assert res.exit_code == 0, res.output
    summary = pl.read_parquet(out / "summary.parquet")
    assert set(summary["baseline"].drop_nulls()) == {"rnd"}
    bad = runner.invoke(app, ["run", str(path), "--baseline", "cheapest",
                              "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--baseline" in bad.output and "rnd, round_robin" in bad.output
