"""report.html: self-contained, drawn by a real headless browser, clear errors without runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from helpers import llm, scenario
from reports.html import write_run_report
from reports.rundata import discover_runs
from reports.single_llm import single_llm_points
from sim.cli import app
from sim.errors import RouteSimError
from sim.runner import run

runner = CliRunner()
FIGURES_PER_SCENARIO = 8  # frontier, 2 CDFs, SLO, saturation, queues, route share, cost


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two policies x two seeds of a small scenario with an LLM addition and an outage."""
    out = tmp_path_factory.mktemp("runs")
    sc = scenario(
        duration_s=240.0,
        warmup_s=20.0,
        arrivals={"kind": "poisson", "rate_per_s": 2.0},
        llms=[llm("gpt-4", replicas=2, slots=4),
              llm("mistral-7b", price_in_per_mtok=0.2, price_out_per_mtok=0.2, slots=8)],
        events=[
            {"at_s": 80, "add_llm": llm("llama-3.1-8b", price_in_per_mtok=0.18,
                                        price_out_per_mtok=0.18)},
            {"at_s": 120, "outage": {"llm": "gpt-4", "replicas": 1, "duration_s": 40}},
        ],
        policies=["random", "cheapest"],
    )
    run(sc, seeds=2, out=out)
    return out


def test_report_is_self_contained(run_dir):
    path = write_run_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    # plotly.js inline: no script, style sheet or image is fetched from anywhere
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=", text)
    assert not re.search(r"<img[^>]+src=", text)
    assert len(text) > 1_000_000 and "Plotly.newPlot" in text
    n = int(re.search(r'name="routesim-figures" content="(\d+)"', text).group(1))
    assert n == FIGURES_PER_SCENARIO
    for needle in ("Quality vs cost", "Wait CDF", "Latency CDF", "Queue length", "Route share",
                   "Cumulative cost", "SLO attainment", "Saturation", "add_llm", "outage",
                   "Paired differences vs random", "one LLM for every query"):
        assert needle in text, needle


def test_single_llm_points_match_a_router_that_uses_one_llm(run_dir):
    """Every LLM of the scenario, the added one included, gets a point; the reference LLM
    alone is exactly 100% quality at 100% cost."""
    sr = discover_runs(run_dir)[0]
    points, why = single_llm_points(sr)
    assert why == ""
    by = {p.llm: p for p in points}
    assert set(by) == {"gpt-4", "mistral-7b", "llama-3.1-8b"}
    assert by["gpt-4"].quality_pct == pytest.approx(100.0)
    assert by["gpt-4"].cost_pct == pytest.approx(100.0)
    assert by["mistral-7b"].cost_pct < by["gpt-4"].cost_pct


def test_single_llm_cost_equals_an_uncongested_one_llm_run(tmp_path):
    sc = scenario(duration_s=150.0, llms=[llm("gpt-4", slots=64),
                                          llm("mistral-7b", price_in_per_mtok=0.2,
                                              price_out_per_mtok=0.2, slots=64)],
                  policies=["cheapest"])
    res = run(sc, seeds=1, out=tmp_path)
    s = res.summaries[0]
    assert s["completed"] == s["arrived"]  # nothing lost: the router is "mistral-7b alone"
    by = {p.llm: p for p in single_llm_points(discover_runs(tmp_path)[0])[0]}
    assert by["mistral-7b"].cost_pct == pytest.approx(s["cost_pct_of_reference"], rel=1e-9)
    assert by["mistral-7b"].quality_pct == pytest.approx(s["quality_pct_of_reference"],
                                                         rel=1e-6)


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(RouteSimError, match="no runs found"):
        write_run_report(tmp_path)
    with pytest.raises(RouteSimError, match="no such directory"):
        write_run_report(tmp_path / "missing")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert "no runs found" in res.output and "routesim run" in res.output
    assert not (tmp_path / "report.html").exists()


def test_report_command_writes_the_file(run_dir):
    res = runner.invoke(app, ["report", str(run_dir), "--baseline", "cheapest"])
    assert res.exit_code == 0, res.output
    assert "Paired differences vs cheapest" in (run_dir / "report.html").read_text(
        encoding="utf-8")


def test_report_reads_only_files_on_disk(run_dir, tmp_path):
    """A copy of the run directory elsewhere gives the same report."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink(missing_ok=True)
    assert write_run_report(copy).is_file()
    assert pl.read_parquet(copy / "summary.parquet").height == 4


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed "
                    "(apt-get install chromium)")
def test_every_figure_draws_in_headless_chromium(run_dir, tmp_path):
    path = write_run_report(run_dir)
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=30000", "--dump-dom", path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    dom = proc.stdout
    assert dom, proc.stderr[-2000:]
    drawn = re.search(r'data-plots-drawn="(\d+)"', dom)
    assert drawn is not None, "the page's scripts did not run"
    # Each figure's post-draw callback increments the counter once Plotly has drawn it.
    assert int(drawn.group(1)) == FIGURES_PER_SCENARIO
    # Every drawn plotly figure has at least one <svg class="main-svg">.
    assert dom.count('class="main-svg"') >= FIGURES_PER_SCENARIO


def test_report_skips_staging_dirs_and_runs_summary_parquet_does_not_list(run_dir, tmp_path):
    """A run still being written (or killed) and a stale run directory are not reported."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.copytree(copy / "t", copy / ".t.partial-12345")
    stale = copy / "t" / "stale" / "seed1"
    shutil.copytree(copy / "t" / "random" / "seed1", stale)
    summary = (stale / "summary.json").read_text().replace('"policy": "random"',
                                                           '"policy": "stale"')
    (stale / "summary.json").write_text(summary)
    found = discover_runs(copy)
    assert [(s.name, s.policies, len(s.runs)) for s in found] == [
        ("t", ["random", "cheapest"], 4)]


def test_a_scenario_summary_parquet_does_not_list_is_still_reported(run_dir, tmp_path):
    """Outputs of an older routesim (whose summary.parquet kept only the last scenario) or
    of a run another process finished meanwhile: the scenario is reported whole."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    other = copy / "other"
    shutil.copytree(copy / "t", other)
    for path in other.glob("*/seed*/summary.json"):
        path.write_text(path.read_text().replace('"scenario": "t"', '"scenario": "other"'))
    (other / "scenario.yaml").write_text(
        (other / "scenario.yaml").read_text().replace("name: t\n", "name: other\n"))
    found = {s.name: (s.policies, len(s.runs)) for s in discover_runs(copy)}
    assert found == {"t": (["random", "cheapest"], 4), "other": (["random", "cheapest"], 4)}


def test_unknown_report_baseline_lists_the_policies(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink(missing_ok=True)
    res = runner.invoke(app, ["report", str(copy), "--baseline", "foo"])
    assert res.exit_code == 2
    assert f"{copy}: --baseline: 'foo' is not a policy" in res.output
    assert "choose one of: random, cheapest" in res.output
    assert not (copy / "report.html").exists()


def test_the_wait_cdf_reads_the_summarys_p95(tmp_path):
    # One policy, one seed, with rejections (a queue of 2) and requests still queued when the
    # run stops (no drain): the CDF's 0.95 point is the summary's p95 wait. Before, the CDF
    # counted rejections as 0 s waits and left in-flight requests out.
    import json

    import numpy as np

    from reports import figures
    from reports.html import _policy_requests
    from sim.metrics import admitted_waits

    sc = scenario(
        duration_s=300.0,
        arrivals={"kind": "poisson", "rate_per_s": 3.0},
        llms=[llm("gpt-4", slots=2, max_queue=2, decode_tps=20)],
        users={"patience_s": {"kind": "exponential", "mean": 30}},
        run={"drain_s": 0.0},
        policies=["random"],
    )
    run(sc, seeds=1, out=tmp_path)
    sr = discover_runs(tmp_path)[0]
    req = _policy_requests(sr, "random")
    measured = req.filter(pl.col("measured"))
    outcomes = set(measured["outcome"])
    assert {"rejected", "in_flight"} <= outcomes
    fig = figures.cdf_figure(sr, {"random": req}, {"random": "#000"}, kind="wait")
    xs, ps = fig.data[0].x, fig.data[0].y
    at95 = xs[int(np.flatnonzero(np.isclose(ps, 0.95))[0])]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert at95 == pytest.approx(summary["p95_wait_s"])
    assert at95 == pytest.approx(np.percentile(admitted_waits(measured), 95))


def test_the_report_shows_the_numbers_in_summary_parquet(run_dir):
    # Each policy's row in the summary table: quality % and cost % as the mean over its
    # seeds' rows of summary.parquet, with the 95% t-interval's half-width (2 seeds: t with
    # 1 degree of freedom, 12.706).
    import html as html_lib

    import numpy as np

    text = html_lib.unescape(write_run_report(run_dir).read_text(encoding="utf-8"))
    rows = pl.read_parquet(run_dir / "summary.parquet").filter(pl.col("seed").is_not_null())
    for policy in ("random", "cheapest"):
        mine = rows.filter(pl.col("policy") == policy)
        assert mine.height == 2
        cells = []
        for metric in ("quality_pct_of_reference", "cost_pct_of_reference"):
            v = mine[metric].to_numpy()
            half = 12.706 * v.std(ddof=1) / np.sqrt(2)
            cells.append(f"{v.mean():.1f} ± {half:.1f}")
        row = re.search(rf"<tr><td>{policy}</td><td>2</td><td>([^<]*)</td><td>([^<]*)</td>",
                        text)
        assert row is not None, policy
        assert [row.group(1), row.group(2)] == cells


def test_route_shares_count_requests_still_in_flight(tmp_path):
    # round_robin alternates strictly, but gpt-4 (2 slots) keeps a backlog that is still
    # queued when drain_s: 0 stops the run. In-flight requests had no LLM, so the summary
    # gave gpt-4 about 5% of the traffic and the route-share plot fell to 0% at the end.
    sc = scenario(
        duration_s=300.0, warmup_s=0.0, arrivals={"kind": "poisson", "rate_per_s": 4.0},
        llms=[llm("gpt-4", slots=2, max_queue=100000),
              llm("mistral-7b", price_in_per_mtok=0.2, price_out_per_mtok=0.2, replicas=4,
                  slots=16, max_queue=100000)],
        run={"drain_s": 0}, policies=["round_robin"],
    )
    res = run(sc, seeds=1, out=tmp_path)
    s = res.summaries[0]
    assert s["in_flight"] > s["arrived"] / 4  # the case this is about
    req = pl.read_parquet(next(tmp_path.rglob("requests.parquet")))
    assert req["llm"].null_count() == 0
    assert abs(s["route_share"]["gpt-4"] - 0.5) <= 1 / s["arrived"]


def test_terminal_tables_print_labels_as_text():
    from rich.console import Console

    from sim.compare import compare, compare_tables

    rows = [{"scenario": "t", "policy": p, "seed": k, "quality_pct_of_reference": q + k,
             "cost_pct_of_reference": 10.0 + k}
            for p, q in (("mixllm[beta=0]", 90.0), ("mixllm[beta=0.1]", 91.0),
                         ("cheapest[red]", 50.0)) for k in (1, 2)]
    comp = compare(pl.DataFrame(rows), metrics=["quality_pct_of_reference",
                                                "cost_pct_of_reference"])
    console = Console(record=True, width=200)
    for t in compare_tables(comp, metrics=["quality_pct_of_reference", "cost_pct_of_reference"]):
        console.print(t)
    text = console.export_text()
    for label in ("mixllm[beta=0]", "mixllm[beta=0.1]", "cheapest[red]"):
        assert label in text
    assert "vs mixllm[beta=0]" in text


def test_a_report_of_runs_that_measured_nothing_says_why(tmp_path):
    # Arrivals at 0.01/s and a 90 s warm-up: no request is measured. The SLO bars were
    # labelled "nan%" and the single-LLM note blamed a workload mismatch.
    sc = scenario(duration_s=100.0, warmup_s=90.0, arrivals={"kind": "poisson",
                                                             "rate_per_s": 0.01},
                  policies=["random", "cheapest"])
    run(sc, seeds=2, out=tmp_path)
    runs = discover_runs(tmp_path)[0]
    points, note = single_llm_points(runs)
    assert points == [] and "no measured requests" in note
    html = write_run_report(tmp_path).read_text()
    assert "nan%" not in html
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output


def test_a_zero_cost_point_keeps_the_cost_axis_linear():
    import plotly.graph_objects as go

    from reports.figures import cost_axis
    from reports.frontier_cli import frontier_figure

    assert cost_axis([0.5, 10.0], "cost")["type"] == "log"
    assert cost_axis([0.0, 10.0], "cost")["type"] == "linear"
    pts = pl.DataFrame({"kind": ["llm", "llm"], "policy": ["a", "b"],
                        "cost_pct": [0.0, 100.0], "quality_pct": [99.0, 100.0],
                        "knob": [None, None], "knob_value": [None, None]})
    fig = frontier_figure(pts, "t")
    assert isinstance(fig, go.Figure) and fig.layout.xaxis.type == "linear"
