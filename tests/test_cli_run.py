"""`routesim run` end to end on the built-in default scenario, and the Python API."""

from __future__ import annotations

import json

import polars as pl
from typer.testing import CliRunner

import sim
from helpers import llm, scenario
from policies import registry
from sim.cli import app
from sim.engine import Simulation, prepare_inputs
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
