"""Quality-cost frontiers of routers and RouterBench's AIQ, uncongested.

For a workload, its LLMs and a reference LLM, every named policy is set up on the training
and validation rows and evaluated on the test rows with `sim.offline.evaluate_offline` (the
same route path the simulator uses, on an idle cluster). A policy with a trade-off knob
(class attributes `tradeoff_param` and `tradeoff_grid`) is evaluated at every grid value
and at the default it chose on validation; others give one point. Next to them: each LLM
alone, uniform random routing (its exact expectation: the mean of the single-LLM points),
the oracle (per query the cheapest LLM that is right: one point, an upper bound that reads
ground truth) and the oracle frontier (the best quality reachable at each cost with ground
truth: the curve that bounds every router at every cost, see `oracle_frontier`).

AIQ ("average improvement in quality", Hu et al. 2024, RouterBench, arXiv 2403.12031,
section 3): with R~ the non-decreasing convex hull of a router's (cost, quality) points,

    AIQ = 1 / (c_max - c_min) * integral_{c_min}^{c_max} R~(c) dc

where [c_min, c_max] is the cost range of the single LLMs (the cheapest alone to the dearest
alone): a property of the workload and its LLMs, so a router's AIQ does not change with the
other routers in the table (a cascade running its whole chain costs more than any one LLM,
and a range widened to it would move everyone's AIQ). R~ is 0 below the router's cheapest
point (it cannot spend less; the RouterBench code integrates from the router's first hull
point too), linear between hull vertices (randomly mixing two settings reaches any point
between them) and flat after its best point. Quality and cost are % of the reference LLM on
the same rows, so AIQ is in quality-% units. RouterBench's "zero router" (mixing the LLMs
without looking at the query) is the hull of the single-LLM points; a router is only useful
if it beats it.

No plotting here: the CLI and HTML reports read the tables this module returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from policies import registry
from policies.base import BasePolicy
from policies.quality_model import hull_mean_quality, nondecreasing_hull
from sim.context import context_for, request_cost_usd
from sim.errors import RouteSimError
from sim.offline import evaluate_offline
from sim.scenario import JudgeSpec
from sim.types import (
    SPLIT_TEST,
    ClusterView,
    Decision,
    LLMInfo,
    PolicyContext,
    Query,
    Workload,
)

LEARNED_ROUTERS: tuple[str, ...] = ("knn", "mlp", "threshold", "cascade", "optllm")
POINT_COLUMNS = {
    "policy": pl.String,
    # router | policy | llm | random | oracle | upper_bound (a router setting that kept
    # fan-out answers by realised quality: ground truth, like the oracle)
    "kind": pl.String,
    "knob": pl.String,
    "knob_value": pl.Float64,
    "is_default": pl.Boolean,
    "quality_pct": pl.Float64,
    "cost_pct": pl.Float64,
    "mean_attempts": pl.Float64,
}


@dataclass(frozen=True)
class FrontierResult:
    """`points`: one row per evaluated setting; `summary`: one row per policy with its AIQ."""

    points: pl.DataFrame
    summary: pl.DataFrame


# ------------------------------------------------------------------------------ AIQ math
def aiq(cost: Sequence[float], quality: Sequence[float], c_min: float, c_max: float) -> float:
    """RouterBench's AIQ of one router's points over the cost range [c_min, c_max]."""
    return hull_mean_quality(np.asarray(cost), np.asarray(quality), c_min, c_max)


def hull_quality_at(cost: Sequence[float], quality: Sequence[float], at: float) -> float:
    """The router's hull quality at cost `at`; NaN when every point of it costs more."""
    hc, hq = nondecreasing_hull(np.asarray(cost), np.asarray(quality))
    # Relative slack: the same total summed in another order differs in the last bits.
    if len(hc) == 0 or at < hc[0] - 1e-9 * max(1.0, abs(hc[0])):
        return float("nan")
    return float(np.interp(at, hc, hq))


# ---------------------------------------------------------------------------- evaluation
class SingleLLM(BasePolicy):
    """Sends every query to one deployment (a single-LLM point of the frontier)."""

    name: ClassVar[str] = "one_llm"

    def __init__(self, llm: str):
        super().__init__()
        self.llm = llm

    def route(self, query: Query, view: ClusterView) -> Decision:
        return Decision(llm=self.llm)


def policy_context(
    workload: Workload,
    llms: Sequence[LLMInfo],
    reference: LLMInfo,
    *,
    seed: int,
    with_ground_truth: bool = False,
    judge: JudgeSpec | None = None,
) -> PolicyContext:
    """What `setup` gets: public columns of every row, ground truth of training rows only
    (of every row for upper-bound policies)."""
    return context_for(
        workload, llms, reference_llm=reference.name, rng=np.random.default_rng(seed),
        with_ground_truth=with_ground_truth,
        judge=(judge or JudgeSpec()).info(),
    )


def _point(policy, kind, knob, value, is_default, res) -> dict[str, Any]:
    return {
        "policy": policy,
        "kind": kind,
        "knob": knob,
        "knob_value": None if value is None else float(value),
        "is_default": is_default,
        "quality_pct": res.quality_pct,
        "cost_pct": res.cost_pct,
        "mean_attempts": float(np.mean(res.attempts)) if len(res.attempts) else float("nan"),
    }


def sweep_policy(
    name: str,
    workload: Workload,
    llms: Sequence[LLMInfo],
    reference: LLMInfo,
    rows: np.ndarray,
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    judge: JudgeSpec | None = None,
) -> list[dict[str, Any]]:
    """Points of one registered policy: each value of its knob (plus the default it chose
    on validation), or one point when it has no knob."""
    cls = registry.get(name)
    params = dict(params or {})

    def fresh(extra: Mapping[str, Any] | None = None):
        pol = registry.create(name, {**params, **(extra or {})})
        pol.setup(
            policy_context(
                workload,
                llms,
                reference,
                seed=seed,
                with_ground_truth=bool(getattr(cls, "uses_ground_truth", False)),
                judge=judge,
            )
        )
        return pol

    def run(pol):
        return evaluate_offline(
            pol, workload, llms, rows, reference=reference, judge=judge, seed=seed,
        )

    def kind_of(res, default_kind: str) -> str:
        # Fan-out answers kept by realised quality are ground truth: an upper bound.
        return "upper_bound" if res.realised_picks > 0 else default_kind

    pol = fresh()
    knob = getattr(cls, "tradeoff_param", "") or ""
    grid = tuple(getattr(cls, "tradeoff_grid", ()) or ())
    kind = "oracle" if getattr(cls, "uses_ground_truth", False) else "policy"
    if not knob or not grid:
        res = run(pol)
        return [_point(name, kind_of(res, kind), None, None, True, res)]
    default = getattr(pol, "tradeoff_value", None)
    values = sorted(set(grid) | ({float(default)} if default is not None else set()))
    out = []
    for v in values:
        if hasattr(pol, "set_tradeoff"):
            pol.set_tradeoff(v)
        else:
            pol = fresh({knob: v})
        res = run(pol)
        out.append(_point(name, kind_of(res, "router"), knob, v,
                          default is not None and v == default, res))
    return out


def _truth(workload, llms, reference, rows):
    """Realised quality and cost (n_rows, n_llms), and the reference's totals."""
    cols = np.array([x.model_col for x in llms])
    q = workload.quality[rows][:, cols].astype(np.float64)
    c = request_cost_usd(
        workload.input_tokens[rows][:, None],
        workload.output_tokens[rows][:, cols],
        np.array([x.price_in_per_mtok for x in llms]),
        np.array([x.price_out_per_mtok for x in llms]),
    )
    ref_q = float(workload.quality[rows, reference.model_col].sum())
    ref_c = float(
        request_cost_usd(
            workload.input_tokens[rows],
            workload.output_tokens[rows, reference.model_col],
            reference.price_in_per_mtok,
            reference.price_out_per_mtok,
        ).sum()
    )
    if not (ref_q > 0 and ref_c > 0):
        raise RouteSimError(
            f"reference LLM {reference.name!r} has total quality {ref_q} and cost {ref_c} USD "
            f"on the {len(rows)} evaluated rows; both must be positive to express others "
            "as % of it",
            field="reference",
        )
    return q, c, ref_q, ref_c


def _direct_oracle(workload, llms, reference, rows) -> dict[str, Any]:
    """Oracle from ground truth when no `oracle` policy is registered: per query the
    cheapest LLM with the best quality (right/wrong answers: the cheapest right one, else the
    cheapest)."""
    q, c, ref_q, ref_c = _truth(workload, llms, reference, rows)
    best = q >= q.max(axis=1, keepdims=True)
    pick = np.argmin(np.where(best, c, np.inf), axis=1)
    i = np.arange(len(rows))
    return {
        "policy": "oracle",
        "kind": "oracle",
        "knob": None,
        "knob_value": None,
        "is_default": True,
        "quality_pct": float(100 * q[i, pick].sum() / ref_q),
        "cost_pct": float(100 * c[i, pick].sum() / ref_c),
        "mean_attempts": 1.0,
    }


def oracle_frontier(workload, llms, reference, rows) -> list[dict[str, Any]]:
    """The best quality reachable at each cost with ground truth, exactly.

    Any router's outcome on a query is at most the quality of an LLM it called, at no less
    than that LLM's cost, so its totals are dominated by some assignment of one LLM per
    query; the upper hull of all assignments' totals is found greedily (the LP relaxation
    of the multiple-choice knapsack): start every query at its cheapest LLM, then take the
    steps along each query's own non-decreasing hull in order of decreasing marginal
    quality per dollar. The vertices bound every router at every cost, and their AIQ bounds
    every router's AIQ. `knob_value` is the marginal quality % per cost % of the step
    ending at that vertex; the last vertex is the `oracle` point (per query the best answer,
    the cheapest among equals)."""
    q, c, ref_q, ref_c = _truth(workload, llms, reference, rows)
    base_q = base_c = 0.0
    dq: list[np.ndarray] = []
    dc: list[np.ndarray] = []
    for i in range(len(rows)):
        hc, hq = nondecreasing_hull(c[i], q[i])
        base_c += hc[0]
        base_q += hq[0]
        dc.append(np.diff(hc))
        dq.append(np.diff(hq))
    step_c, step_q = np.concatenate(dc), np.concatenate(dq)
    slope = (step_q / ref_q) / (step_c / ref_c)  # quality % per cost %
    order = np.argsort(-slope, kind="stable")
    cum_c = 100.0 * (base_c + np.cumsum(step_c[order])) / ref_c
    cum_q = 100.0 * (base_q + np.cumsum(step_q[order])) / ref_q
    # Consecutive steps of equal slope are collinear: keep the last vertex of each run.
    s_sorted = slope[order]
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True] if len(order) else np.array([])
    vertices = [(None, 100.0 * base_q / ref_q, 100.0 * base_c / ref_c)]
    vertices += [
        (float(s_sorted[k]), float(cum_q[k]), float(cum_c[k])) for k in np.flatnonzero(last_of_run)
    ]
    return [
        {
            "policy": "oracle_frontier",
            "kind": "oracle",
            "knob": "marginal_gain",
            "knob_value": g,
            "is_default": False,
            "quality_pct": qp,
            "cost_pct": cp,
            "mean_attempts": 1.0,
        }
        for g, qp, cp in vertices
    ]


def frontier_points(
    workload: Workload,
    llms: Sequence[LLMInfo],
    reference: LLMInfo,
    policies: Sequence[str] = LEARNED_ROUTERS,
    *,
    rows: np.ndarray | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    judge: JudgeSpec | None = None,
) -> pl.DataFrame:
    """Every evaluated (policy, knob value) point on `rows` (default: the test split), plus
    the single LLMs, random (expected) and the oracle. `params` maps a policy name to its
    params. Columns: `POINT_COLUMNS`."""
    rows = workload.rows(SPLIT_TEST) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise RouteSimError(
            f"workload {workload.name!r} has no rows to evaluate on (split 'test' is empty)",
            field="rows",
        )
    names = [x.name for x in llms]
    if reference.name not in names:
        raise RouteSimError(
            f"reference LLM {reference.name!r} is not one of the LLMs: {', '.join(names)}",
            field="reference",
        )
    params = params or {}
    out: list[dict[str, Any]] = []
    for x in llms:
        res = evaluate_offline(SingleLLM(x.name), workload, llms, rows, reference=reference)
        out.append(_point(x.name, "llm", None, None, True, res))
    singles = out[: len(llms)]
    out.append(
        {
            "policy": "random",
            "kind": "random",
            "knob": None,
            "knob_value": None,
            "is_default": True,
            "quality_pct": float(np.mean([p["quality_pct"] for p in singles])),
            "cost_pct": float(np.mean([p["cost_pct"] for p in singles])),
            "mean_attempts": 1.0,
        }
    )
    for name in policies:
        if name in ("random", "oracle"):
            continue  # always present: random as its exact expectation, oracle below
        out.extend(
            sweep_policy(
                name,
                workload,
                llms,
                reference,
                rows,
                params=params.get(name),
                seed=seed,
                judge=judge,
            )
        )
    if "oracle" in registry.names():
        out.extend(
            sweep_policy(
                "oracle", workload, llms, reference, rows, seed=seed, params=params.get("oracle")
            )
        )
    else:
        out.append(_direct_oracle(workload, llms, reference, rows))
    out.extend(oracle_frontier(workload, llms, reference, rows))
    return pl.DataFrame(out, schema=POINT_COLUMNS)


def aiq_table(points: pl.DataFrame) -> pl.DataFrame:
    """One row per policy (each router, the zero router, random, the oracle): its AIQ over
    the single LLMs' cost range (see the module docstring), its default point, and its hull
    quality at random's cost (`beats_random`: that quality exceeds random's)."""
    singles = points.filter(pl.col("kind") == "llm")["cost_pct"]
    c_min, c_max = float(singles.min()), float(singles.max())
    rand = points.filter(pl.col("kind") == "random").row(0, named=True)
    groups: list[tuple[str, str, pl.DataFrame]] = [
        ("zero_router", "zero_router", points.filter(pl.col("kind") == "llm"))
    ]
    for name in points.filter(pl.col("kind") != "llm")["policy"].unique(maintain_order=True):
        sub = points.filter(pl.col("policy") == name)
        kinds = set(sub["kind"].to_list())
        groups.append((name, "upper_bound" if "upper_bound" in kinds else sub["kind"][0], sub))
    rows = []
    for name, kind, sub in groups:
        cost = sub["cost_pct"].to_numpy()
        qual = sub["quality_pct"].to_numpy()
        default = sub.filter(pl.col("is_default") & (pl.lit(kind) != "zero_router"))
        at_rand = hull_quality_at(cost, qual, rand["cost_pct"])
        rows.append(
            {
                "policy": name,
                "kind": kind,
                "aiq_pct": aiq(cost, qual, c_min, c_max),
                "n_points": len(sub),
                "default_knob": default["knob_value"][0]
                if len(default) and kind in ("router", "upper_bound")
                else None,
                "default_quality_pct": float(default["quality_pct"][0]) if len(default) else None,
                "default_cost_pct": float(default["cost_pct"][0]) if len(default) else None,
                "quality_at_random_cost_pct": at_rand,
                "beats_random": bool(at_rand > rand["quality_pct"])
                if np.isfinite(at_rand)
                else None,
            }
        )
    return pl.DataFrame(rows).sort("aiq_pct", descending=True)


def frontier_table(
    workload: Workload,
    llms: Sequence[LLMInfo],
    reference: LLMInfo,
    policies: Sequence[str] = LEARNED_ROUTERS,
    **kwargs: Any,
) -> FrontierResult:
    """`frontier_points` and its `aiq_table`, for the CLI and the HTML report."""
    points = frontier_points(workload, llms, reference, policies, **kwargs)
    return FrontierResult(points=points, summary=aiq_table(points))
