"""Comparison across seeds: t-intervals, paired differences vs a baseline, the CLI tables."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from helpers import llm, scenario
from sim.cli import app
from sim.compare import compare, compare_tables, t_interval, with_comparison
from sim.errors import RouteSimError
from sim.runner import run

runner = CliRunner()


def _summaries(values: dict[str, dict[int, float]], metric: str = "quality_pct_of_reference"):
    return pl.DataFrame(
        [
            {"scenario": "s", "policy": p, "seed": seed, metric: v}
            for p, by_seed in values.items()
            for seed, v in by_seed.items()
        ]
    )


def test_t_interval_matches_the_textbook_formula():
    # mean 3, sd sqrt(2.5), n 5: half-width t_{4,0.975} * sd / sqrt(5), t_{4,0.975} = 2.776445
    mean, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 - half, abs=1e-5)
    assert hi == pytest.approx(3.0 + half, abs=1e-5)


def test_t_interval_needs_two_values_and_skips_missing():
    mean, lo, hi = t_interval([4.0])
    assert mean == 4.0 and math.isnan(lo) and math.isnan(hi)
    mean, lo, hi = t_interval([None, 2.0, float("nan"), 4.0])
    assert mean == pytest.approx(3.0) and not math.isnan(lo)
    assert all(math.isnan(v) for v in t_interval([]))


def test_paired_difference_is_tighter_than_the_separate_intervals():
    # Seeds move both policies together (a common +-10 swing); B is A + 1 + small noise.
    rng = np.random.default_rng(0)
    common = rng.normal(0.0, 10.0, size=8)
    a = {k: 80.0 + common[k] for k in range(8)}
    b = {k: 81.0 + common[k] + rng.normal(0.0, 0.1) for k in range(8)}
    comp = compare(_summaries({"A": a, "B": b}), metrics=["quality_pct_of_reference"])
    ra = comp.filter(pl.col("policy") == "A").row(0, named=True)
    rb = comp.filter(pl.col("policy") == "B").row(0, named=True)
    assert ra["baseline"] == "A" and ra["diff_mean"] is None  # first policy is the baseline
    assert rb["n_paired"] == 8
    # noise sd 0.1 over 8 seeds: standard error 0.035; 0.15 is over 4 of them
    assert abs(rb["diff_mean"] - 1.0) < 0.15
    assert rb["diff_ci_low"] > 0  # the seeds agree B is better...
    assert rb["ci_low"] < ra["ci_high"]  # ...although the separate intervals overlap
    assert (rb["diff_ci_high"] - rb["diff_ci_low"]) < 0.05 * (rb["ci_high"] - rb["ci_low"])


def test_differences_use_common_seeds_only_and_a_chosen_baseline():
    s = _summaries({"A": {1: 1.0, 2: 2.0, 3: 3.0}, "B": {2: 5.0, 3: 7.0, 4: 100.0}})
    comp = compare(s, baseline="B", metrics=["quality_pct_of_reference"])
    ra = comp.filter(pl.col("policy") == "A").row(0, named=True)
    assert ra["baseline"] == "B" and ra["n_paired"] == 2
    assert ra["diff_mean"] == pytest.approx(((2 - 5) + (3 - 7)) / 2)
    assert comp.filter(pl.col("policy") == "B")["n"][0] == 3


def test_unknown_baseline_names_the_choices():
    s = _summaries({"A": {1: 1.0}, "B": {1: 2.0}})
    with pytest.raises(RouteSimError, match="choose one of: A, B"):
        compare(s, baseline="nope")


def test_with_comparison_keeps_one_row_per_run():
    s = _summaries({"A": {1: 1.0, 2: 3.0}, "B": {1: 2.0, 2: 5.0}})
    comp = compare(s, metrics=["quality_pct_of_reference"])
    wide = with_comparison(s, comp)
    assert wide.height == s.height
    row = wide.filter((pl.col("policy") == "B") & (pl.col("seed") == 1)).row(0, named=True)
    assert row["quality_pct_of_reference__mean"] == pytest.approx(3.5)
    assert row["quality_pct_of_reference__diff"] == pytest.approx(1.5)
    assert row["baseline"] == "A" and row["n_seeds"] == 2
    assert len(compare_tables(comp)) == 2  # means, and paired differences (2 seeds)


def test_real_runs_pair_by_seed():
    res = run(scenario(duration_s=150), policies=["random", "cheapest"], seeds=3)
    comp = compare(res.summary)
    assert set(comp["n"].to_list()) == {3}
    cheap = comp.filter((pl.col("policy") == "cheapest")
                        & (pl.col("metric") == "cost_pct_of_reference")).row(0, named=True)
    expected = (res.summary.filter(pl.col("policy") == "cheapest")["cost_pct_of_reference"]
                - res.summary.filter(pl.col("policy") == "random")["cost_pct_of_reference"])
    assert cheap["diff_mean"] == pytest.approx(float(expected.mean()))
    assert cheap["diff_ci_high"] < 0  # the cheapest LLM is cheaper on every seed


def _write_small_scenario(tmp_path):
    import yaml

    data = {
        "name": "tiny",
        "seed": 3,
        "duration_s": 150,
        "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
        "llms": [llm("gpt-4", slots=32), llm("mistral-7b", price_in_per_mtok=0.2,
                                             price_out_per_mtok=0.2, slots=32)],
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 300},
        "policies": ["random", "cheapest"],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_prints_intervals_and_paired_differences(tmp_path):
    path = _write_small_scenario(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(path), "--seeds", "2", "--baseline", "cheapest",
                              "--out", str(out), "--no-report"])
    assert res.exit_code == 0, res.output
    assert "±" in res.output
    assert "paired difference vs cheapest" in res.output
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary.height == 4
    assert set(summary["baseline"].to_list()) == {"cheapest"}
    assert "p95_wait_s__diff_ci_low" in summary.columns


def test_cli_rejects_an_unknown_baseline_before_running(tmp_path):
    path = _write_small_scenario(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(path), "--baseline", "oracle", "--out", str(out)])
    assert res.exit_code == 2
    assert "--baseline" in res.output and "random, cheapest" in res.output
    assert not out.exists()
