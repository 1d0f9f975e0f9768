"""Frontier sweep and RouterBench's AIQ; learned routers never see the test rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from routing_workloads import context, learnable_workload, llm_infos, reference

from policies import registry
from policies.quality_model import nondecreasing_hull
from reports.frontier import (
    POINT_COLUMNS,
    _direct_oracle,
    aiq,
    aiq_table,
    frontier_table,
    hull_quality_at,
)
from sim.offline import idle_view
from sim.types import SPLIT_TEST, Query

FAST = {"mlp": {"alpha": 1.0, "max_iter": 150}, "optllm": {"n_boot": 3}}


@pytest.fixture(scope="module")
def wl():
    return learnable_workload()


# ----------------------------------------------------------------------------- AIQ math
def test_hull_drops_dominated_and_concave_violating_points():
    cost = np.array([0.0, 25.0, 50.0, 60.0, 100.0])
    qual = np.array([50.0, 60.0, 90.0, 70.0, 100.0])
    hc, hq = nondecreasing_hull(cost, qual)
    # (25, 60) lies under the chord (0, 50)-(50, 90), which is 70 at 25; (60, 70) is
    # dominated by the cheaper (50, 90).
    assert hc.tolist() == [0.0, 50.0, 100.0]
    assert hq.tolist() == [50.0, 90.0, 100.0]


def test_aiq_matches_hand_computation():
    cost = [0.0, 25.0, 50.0, 60.0, 100.0]
    qual = [50.0, 60.0, 90.0, 70.0, 100.0]
    # Trapezoids: 50 * (50 + 90) / 2 + 50 * (90 + 100) / 2 = 3500 + 4750 = 8250 over 100.
    assert aiq(cost, qual, 0.0, 100.0) == pytest.approx(82.5)
    # A router whose cheapest point costs 20 gets 0 below 20, and stays flat after 60:
    # (40 * (60 + 80) / 2 + 40 * 80) / 100 = (2800 + 3200) / 100 = 60.
    assert aiq([20.0, 60.0], [60.0, 80.0], 0.0, 100.0) == pytest.approx(60.0)
    # A decreasing tail is replaced by a flat one: (40, 90) then (80, 70) -> flat 90.
    assert aiq([40.0, 80.0], [90.0, 70.0], 40.0, 80.0) == pytest.approx(90.0)
    assert hull_quality_at([20.0, 60.0], [60.0, 80.0], 40.0) == pytest.approx(70.0)
    assert np.isnan(hull_quality_at([20.0, 60.0], [60.0, 80.0], 10.0))


# ------------------------------------------------------------------------------ frontier
@pytest.fixture(scope="module")
def result(wl):
    llms = llm_infos()
    return frontier_table(wl, llms, reference(llms), ["knn", "threshold"], params=FAST)


def test_points_table_shape(result):
    pts = result.points
    assert dict(pts.schema) == POINT_COLUMNS
    assert set(pts.filter(pl.col("kind") == "llm")["policy"]) == {"small", "mid", "large"}
    assert pts.filter(pl.col("policy") == "large")["quality_pct"][0] == pytest.approx(100.0)
    assert pts.filter(pl.col("policy") == "large")["cost_pct"][0] == pytest.approx(100.0)
    for name in ("knn", "threshold"):
        sub = pts.filter(pl.col("policy") == name)
        assert sub["is_default"].sum() == 1
        assert len(sub) >= len(registry.get(name).tradeoff_grid)
    singles = pts.filter(pl.col("kind") == "llm")
    rand = pts.filter(pl.col("kind") == "random")
    assert rand["quality_pct"][0] == pytest.approx(singles["quality_pct"].mean())


def test_oracle_bounds_everyone_and_routers_beat_random(result):
    pts = result.points
    oracle = pts.filter(pl.col("policy") == "oracle").row(0, named=True)
    others = pts.filter(pl.col("kind") != "oracle")
    assert (others["quality_pct"] <= oracle["quality_pct"] + 1e-9).all()
    # The oracle frontier's hull lies on or above every other point at that point's cost
    # (exact; 1e-6 points of slack for the rounding of sums in a different order).
    curve = pts.filter(pl.col("policy") == "oracle_frontier")
    cc, cq = curve["cost_pct"].to_numpy(), curve["quality_pct"].to_numpy()
    for c, q in others.select("cost_pct", "quality_pct").iter_rows():
        assert hull_quality_at(cc, cq, c) >= q - 1e-6
    # Its top end is the cheapest-correct oracle point.
    top = curve.sort("quality_pct").row(-1, named=True)
    assert top["quality_pct"] == pytest.approx(oracle["quality_pct"])
    assert top["cost_pct"] == pytest.approx(oracle["cost_pct"])
    summary = result.summary
    assert summary["policy"][0] == "oracle_frontier"  # sorted by AIQ: the bound is on top
    routers = summary.filter(pl.col("kind") == "router")
    assert routers["beats_random"].all()
    zero = summary.filter(pl.col("policy") == "zero_router")["aiq_pct"][0]
    assert routers.filter(pl.col("policy") == "knn")["aiq_pct"][0] > zero


def test_direct_oracle_matches_the_registered_one(wl, result):
    llms = llm_infos()
    direct = _direct_oracle(wl, llms, reference(llms), wl.rows(SPLIT_TEST))
    reg = result.points.filter(pl.col("kind") == "oracle").row(0, named=True)
    assert direct["quality_pct"] == pytest.approx(reg["quality_pct"])
    assert direct["cost_pct"] == pytest.approx(reg["cost_pct"])


def test_oracle_bounds_everyone_with_graded_answers_too(wl):
    # Scores in [0, 1] instead of right/wrong: "cheapest answer of at least 0.5" would give
    # up the 0.92 answers for 0.85 ones, and a router paying for them beat it.
    x = wl.features
    graded = np.column_stack([np.where(x[:, 0] > 0, 0.90, 0.15),
                              np.where(x[:, 1] > 0, 0.85, 0.35),
                              np.full(wl.n, 0.92)]).astype(np.float32)
    wl2 = dataclasses.replace(wl, quality=graded)
    llms = llm_infos()
    pts = frontier_table(wl2, llms, reference(llms), ["knn"], params=FAST).points
    oracle = pts.filter(pl.col("policy") == "oracle").row(0, named=True)
    assert (pts.filter(pl.col("kind") != "oracle")["quality_pct"]
            <= oracle["quality_pct"] + 1e-9).all()
    assert oracle["quality_pct"] > 100.0  # better than the best LLM alone (large, 0.92)
    top = pts.filter(pl.col("policy") == "oracle_frontier").sort("quality_pct").row(-1, named=True)
    assert top["quality_pct"] == pytest.approx(oracle["quality_pct"])
    direct = _direct_oracle(wl2, llms, reference(llms), wl2.rows(SPLIT_TEST))
    assert direct["quality_pct"] == pytest.approx(oracle["quality_pct"])
    assert direct["cost_pct"] == pytest.approx(oracle["cost_pct"])


def test_aiq_is_over_the_single_llms_cost_range_whatever_else_is_compared(result):
    pts = result.points
    again = aiq_table(pts)
    assert again.equals(result.summary)
    singles = pts.filter(pl.col("kind") == "llm")["cost_pct"]
    lo, hi = singles.min(), singles.max()
    knn = pts.filter(pl.col("policy") == "knn")
    expected = aiq(knn["cost_pct"].to_numpy(), knn["quality_pct"].to_numpy(), lo, hi)
    got = result.summary.filter(pl.col("policy") == "knn")["aiq_pct"][0]
    assert got == pytest.approx(expected)
    # A router that spends far more than any LLM (a cascade running its whole chain) or one
    # dropped from the table moves no other router's AIQ.
    lavish = pl.DataFrame([("lavish", "router", None, None, True, 120.0, 5 * hi, 3.0)],
                          schema=pts.schema, orient="row")
    for variant in (pl.concat([pts, lavish]), pts.filter(pl.col("policy") != "mlp")):
        row = aiq_table(variant).filter(pl.col("policy") == "knn")
        assert row["aiq_pct"][0] == pytest.approx(got)


# --------------------------------------------------------------------------- honesty
@pytest.mark.parametrize("name", ["knn", "mlp", "threshold", "cascade", "optllm"])
def test_test_rows_never_influence_setup(name, wl):
    """Scrambling the test rows' ground truth changes neither the knob chosen nor any
    routing decision: defaults come from validation rows only."""
    test = wl.rows(SPLIT_TEST)
    q = wl.quality.copy()
    q[test] = 1.0 - q[test]
    tok = wl.output_tokens.copy()
    tok[test] *= 7.0
    scrambled = dataclasses.replace(wl, quality=q, output_tokens=tok)
    llms = llm_infos()
    decisions = []
    for w in (wl, scrambled):
        pol = registry.create(name, FAST.get(name, {}))
        pol.setup(context(w, llms))
        view = idle_view(llms)
        picks = [
            pol.route(
                Query(
                    id=i,
                    row=int(r),
                    arrival_s=0.0,
                    input_tokens=int(w.input_tokens[r]),
                    task=int(w.task[r]),
                ),
                view,
            ).llm
            for i, r in enumerate(test)
        ]
        decisions.append((pol.tradeoff_value, picks))
    assert decisions[0] == decisions[1]


def test_bad_reference_is_an_error(wl):
    from sim.errors import RouteSimError

    llms = llm_infos(("small", "mid"))
    with pytest.raises(RouteSimError, match="reference"):
        frontier_table(wl, llms, reference(llm_infos()), ["knn"])
    assert context(wl, llms).reference_llm == "large"


def test_a_router_setting_with_realised_picks_is_an_upper_bound_and_keeps_its_default():
    import polars as pl

    from reports.frontier import POINT_COLUMNS, aiq_table

    rows = [
        ("cheap", "llm", None, None, True, 60.0, 2.0, 1.0),
        ("dear", "llm", None, None, True, 100.0, 100.0, 1.0),
        ("random", "random", None, None, True, 80.0, 51.0, 1.0),
        ("r", "router", "lambda_", 1.0, False, 80.0, 20.0, 1.0),
        ("r", "router", "lambda_", 8.0, True, 95.0, 30.0, 1.0),
        ("top2", "upper_bound", "lambda_", 1.0, False, 90.0, 30.0, 2.0),
        ("top2", "upper_bound", "lambda_", 8.0, True, 105.0, 60.0, 2.0),
    ]
    points = pl.DataFrame(rows, schema=POINT_COLUMNS, orient="row")
    table = {r["policy"]: r for r in aiq_table(points).iter_rows(named=True)}
    assert table["top2"]["kind"] == "upper_bound" and table["top2"]["default_knob"] == 8.0
    assert table["r"]["kind"] == "router" and table["r"]["default_knob"] == 8.0
