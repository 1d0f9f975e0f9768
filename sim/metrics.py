"""Summaries of one run: quality/cost vs the reference LLM, waits, SLO, shares, saturation.

Definitions (over requests that arrived after warm-up):
- quality % = sum of realised quality (0 for a request not completed) / sum of the reference
  LLM's ground-truth quality on the same queries;
- cost % = total cost / cost of answering the same queries with the reference LLM;
so a router cannot look good by dropping hard queries.
- waits (mean, p50/p95/p99) are over the admitted requests: every request not rejected
  (completed, abandoned, failed, and in flight at the horizon with its wait so far; see
  `admitted_waits`). A rejected request never queued, so it has no wait: it is not counted
  as a 0 s wait, but it is not in these figures either; rejections show in the rejected
  share and in SLO attainment, which counts them as misses (capacity planning goes further
  and counts them as infinite waits);
- SLO attainment = share of measured requests completed with wait <= slo.p95_wait_s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from sim.record import OUTCOMES
from sim.scenario import Scenario

SUMMARY_KEYS = (
    "scenario",
    "policy",
    "seed",
    "arrived",
    "completed",
    "rejected",
    "abandoned",
    "failed",
    "in_flight",
    "quality_pct_of_reference",
    "cost_pct_of_reference",
    "total_cost_usd",
    "mean_wait_s",
    "p50_wait_s",
    "p95_wait_s",
    "p99_wait_s",
    "p50_latency_s",
    "p95_latency_s",
    "p99_latency_s",
    "slo_attainment",
    "rejected_or_abandoned_share",
    "route_share",
    "saturation",
)


def admitted_waits(requests: pl.DataFrame) -> np.ndarray:
    """Waits of the requests that were not rejected, in flight ones with their wait so far (a
    lower bound): the one definition behind the summary's wait figures, the planner's (which
    adds rejections as infinite waits) and the report's wait CDF."""
    return requests.filter(pl.col("outcome") != "rejected")["wait_s"].to_numpy()


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def saturation_labels(timeline: pl.DataFrame, scenario: Scenario,
                      rejected_by_llm: dict[str, int]) -> dict[str, str]:
    """Per LLM over the arrival period after warm-up, cut into windows of
    max(60 s, 1/12 of the period) so a 10-minute spike is not averaged away:

    - overloaded: it rejected work for load (`rejected_by_llm`: jobs, fan-out copies and
      escalations included, turned away because its queue was full or its rate limit hit;
      rejections while it was down in an outage, or removed, say nothing about load), or
      in some window its queue grew by more than its capacity (demand above service rate,
      a backlog building);
    - backlogged: in some window a queue was present in more than half of the samples;
    - stable: otherwise.
    """
    out: dict[str, str] = {}
    if timeline.is_empty():
        return out
    t0, t1 = scenario.warmup_s, scenario.duration_s
    width = max(60.0, (t1 - t0) / 12.0)
    tl = timeline.filter((pl.col("t_s") >= t0) & (pl.col("t_s") < t1))
    n_win = max(1, int((t1 - t0) // width))  # a last partial window joins the one before
    for llm in timeline["llm"].unique(maintain_order=True).to_list():
        s = tl.filter(pl.col("llm") == llm)
        label = "overloaded" if rejected_by_llm.get(llm, 0) > 0 else "stable"
        if s.is_empty() or label == "overloaded":
            out[llm] = label
            continue
        t = s["t_s"].to_numpy()
        q = s["queue_len"].to_numpy()
        cap = np.maximum(s["capacity"].to_numpy(), 1)
        win = np.minimum(((t - t0) // width).astype(np.int64), n_win - 1)
        for w in np.unique(win):
            m = win == w
            qw = q[m]
            if qw.size > 1 and qw.max() - qw[0] > cap[m].max():
                label = "overloaded"
                break
            if float((qw > 0).mean()) > 0.5:
                label = "backlogged"
        out[llm] = label
    return out


def summarize(
    requests: pl.DataFrame, timeline: pl.DataFrame, scenario: Scenario, policy: str, seed: int
) -> dict[str, Any]:
    """The summary.json of one run (the keys of SUMMARY_KEYS)."""
    # Only the columns used here: the full frame is ~50 columns and 1M rows can be large.
    m = requests.select(
        "arrival_s", "outcome", "quality", "ref_quality", "cost_usd", "ref_cost_usd",
        "wait_s", "latency_s", "llm",
    ).filter(pl.col("arrival_s") >= scenario.warmup_s)
    n = m.height
    counts = {o: int((m["outcome"] == o).sum()) for o in OUTCOMES}
    quality = m["quality"].fill_nan(0.0).fill_null(0.0).sum()
    ref_q = float(m["ref_quality"].sum())
    cost = float(m["cost_usd"].sum())
    ref_c = float(m["ref_cost_usd"].sum())
    wait = admitted_waits(m)
    done = m.filter(pl.col("outcome") == "completed")
    lat = done["latency_s"].to_numpy()
    slo = scenario.slo.p95_wait_s
    met = int((done["wait_s"] <= slo).sum())
    shares = {}
    routed = m.filter(pl.col("llm").is_not_null())
    if routed.height:
        vc = routed["llm"].value_counts()
        shares = {r["llm"]: r["count"] / routed.height for r in vc.iter_rows(named=True)}
    # Load rejections per job (the timeline's cumulative count, kept after warm-up only):
    # a fan-out copy or escalation turned away counts although its request completed.
    rej_by = (
        {
            r["llm"]: int(r["load_rejected"])
            for r in timeline.group_by("llm").agg(pl.col("load_rejected").max())
            .iter_rows(named=True)
        }
        if not timeline.is_empty()
        else {}
    )
    return {
        "scenario": scenario.name,
        "policy": policy,
        "seed": seed,
        "arrived": n,
        **counts,
        "quality_pct_of_reference": 100.0 * float(quality) / ref_q if ref_q > 0 else None,
        "cost_pct_of_reference": 100.0 * cost / ref_c if ref_c > 0 else None,
        "total_cost_usd": cost,
        "mean_wait_s": float(wait.mean()) if wait.size else None,
        "p50_wait_s": _pct(wait, 50),
        "p95_wait_s": _pct(wait, 95),
        "p99_wait_s": _pct(wait, 99),
        "p50_latency_s": _pct(lat, 50),
        "p95_latency_s": _pct(lat, 95),
        "p99_latency_s": _pct(lat, 99),
        "slo_attainment": met / n if n else None,
        "rejected_or_abandoned_share": (counts["rejected"] + counts["abandoned"]) / n
        if n
        else None,
        "route_share": dict(sorted(shares.items())),
        "saturation": saturation_labels(timeline, scenario, rej_by),
    }
