"""`routesim frontier` writes the table and the figure data."""

from __future__ import annotations

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from sim.cli import app
from sim.scenario import load_scenario


def test_frontier_command(tmp_path):
    sc = {
        "name": "fr", "seed": 3, "duration_s": 100,
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 800},
        "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
        "llms": [
            {"name": "gpt-4", "price_in_per_mtok": 10, "price_out_per_mtok": 30},
            {"name": "mixtral-8x7b", "price_in_per_mtok": 0.6, "price_out_per_mtok": 0.6},
            {"name": "mistral-7b", "price_in_per_mtok": 0.2, "price_out_per_mtok": 0.2},
        ],
    }
    p = tmp_path / "fr.yaml"
    p.write_text(yaml.safe_dump(sc))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["frontier", str(p), "-p", "knn", "--out", str(out)])
    assert res.exit_code == 0, res.output
    pts = pl.read_parquet(out / "frontier_points.parquet")
    aiq = pl.read_parquet(out / "frontier_aiq.parquet")
    assert {"knn", "random", "oracle"} <= set(pts["policy"])
    assert pts.filter(pl.col("kind") == "llm").height == 3
    knn = aiq.filter(pl.col("policy") == "knn").row(0, named=True)
    oracle = aiq.filter(pl.col("policy") == "oracle_frontier").row(0, named=True)
    assert knn["aiq_pct"] <= oracle["aiq_pct"]
    assert (out / "frontier.html").read_text().count("Plotly.newPlot") >= 1
    resolved = load_scenario(out / "scenario.yaml")  # what was swept, with its seed
    assert resolved.seed == 3 and resolved.policies == ["knn"]
    bad = CliRunner().invoke(app, ["frontier", str(p), "-p", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown policy 'nope'" in bad.output


def test_negative_seed_is_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["frontier", "--seed", "-1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "--seed" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_a_reference_that_joins_later_is_a_point_of_the_frontier(tmp_path):
    # Valid scenario (the reference is added at t = 50 s); the frontier used to crash on a
    # bare StopIteration looking for it among the initial LLMs.
    sc = {
        "name": "late_ref", "seed": 4, "duration_s": 100,
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 600},
        "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
        "llms": [{"name": "mistral-7b", "price_in_per_mtok": 0.2, "price_out_per_mtok": 0.2},
                 {"name": "mixtral-8x7b", "price_in_per_mtok": 0.6, "price_out_per_mtok": 0.6}],
        "events": [{"at_s": 50, "add_llm": {"name": "gpt-4", "price_in_per_mtok": 10,
                                            "price_out_per_mtok": 30}}],
    }
    p = tmp_path / "late_ref.yaml"
    p.write_text(yaml.safe_dump(sc))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["frontier", str(p), "-p", "knn", "--out", str(out)])
    assert res.exit_code == 0, res.output
    singles = pl.read_parquet(out / "frontier_points.parquet").filter(pl.col("kind") == "llm")
    assert set(singles["policy"]) == {"mistral-7b", "mixtral-8x7b", "gpt-4"}
    ref = singles.filter(pl.col("policy") == "gpt-4").row(0, named=True)
    assert ref["quality_pct"] == pytest.approx(100.0) and ref["cost_pct"] == pytest.approx(100.0)
