"""Quality and cost of sending every query to one LLM, on the queries a run actually saw.

These are the fixed points a router's quality-cost result is judged against (the MixLLM
paper's frontier plots show them next to the routers). They ignore congestion: the answer of
LLM L to query q is L's ground-truth quality and token count on q, priced at L's list price
in force when q arrived. Same definitions as sim.metrics: percentages of the reference LLM's
quality and cost on the same measured queries (arrived after warm-up).

The ground truth is not in the run's files, so the workload is rebuilt from the saved
scenario.yaml and the seed (deterministic). A file-based workload is rebuilt with the
dependency-free hashing encoder: features do not affect quality or token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reports.rundata import ScenarioRuns
from sim.errors import RouteSimError
from sim.scenario import EncoderSpec, LLMSpec, Scenario


@dataclass(frozen=True)
class SingleLLMPoint:
    llm: str
    quality_pct: float
    cost_pct: float


def _price_at(scenario: Scenario, spec: LLMSpec, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """List prices (in, out) per request arrival time, following price_change events."""
    p_in = np.full(t.shape, spec.price_in_per_mtok, dtype=float)
    p_out = np.full(t.shape, spec.price_out_per_mtok, dtype=float)
    for e in sorted(scenario.events, key=lambda e: e.at_s):
        pc = e.price_change
        if pc is None or pc.llm != spec.name:
            continue
        later = t >= e.at_s
        if pc.price_in_per_mtok is not None:
            p_in[later] = pc.price_in_per_mtok
        if pc.price_out_per_mtok is not None:
            p_out[later] = pc.price_out_per_mtok
    return p_in, p_out


def single_llm_points(runs: ScenarioRuns) -> tuple[list[SingleLLMPoint], str]:
    """Per LLM of the scenario, mean over seeds of (quality %, cost %); and a note saying
    why points are missing, if they are."""
    from sim.runner import build_workload

    sc = runs.scenario
    if sc is None:
        return [], "single-LLM points need the run's scenario.yaml, which is missing"
    if sc.workload.source != "synthetic":
        sc = sc.model_copy(
            update={"workload": sc.workload.model_copy(update={"encoder": EncoderSpec(
                kind="hashing")})}
        )
    specs = sc.all_llms()
    acc: dict[str, list[tuple[float, float]]] = {s.name: [] for s in specs}
    cols = ["arrival_s", "row", "input_tokens", "ref_quality", "ref_cost_usd"]
    for seed in runs.seeds:
        run = next(r for r in runs.runs if r.seed == seed)
        try:
            req = run.requests(cols)
            workload = build_workload(sc, seed)
        except RouteSimError as exc:
            return [], f"single-LLM points unavailable: {exc}"
        m = req.filter(req["arrival_s"] >= sc.warmup_s)
        rows = m["row"].to_numpy()
        if rows.size == 0:
            return [], (f"single-LLM points unavailable: seed {seed} has no measured "
                        f"requests (none arrived after warmup_s={sc.warmup_s:g})")
        if rows.max() >= workload.n:
            return [], "single-LLM points unavailable: the workload rebuilt from scenario.yaml " \
                "does not match the recorded queries"
        ref_spec = sc.llm(sc.workload.reference_llm)
        ref_col = workload.models.index(ref_spec.model_name)
        recorded = m["ref_quality"].to_numpy()
        if not np.allclose(workload.quality[rows, ref_col], recorded, atol=1e-6, equal_nan=True):
            # e.g. outputs of an older routesim whose workload generator differed
            return [], "single-LLM points unavailable: the workload rebuilt from scenario.yaml " \
                "does not match the recorded queries"
        ref_q = float(recorded.sum())
        ref_c = float(m["ref_cost_usd"].sum())
        t = m["arrival_s"].to_numpy()
        tin = m["input_tokens"].to_numpy().astype(float)
        for spec in specs:
            col = workload.models.index(spec.model_name)
            q = float(workload.quality[rows, col].sum())
            p_in, p_out = _price_at(sc, spec, t)
            cost = float(((tin * p_in + workload.output_tokens[rows, col] * p_out) / 1e6).sum())
            if ref_q > 0 and ref_c > 0:
                acc[spec.name].append((100 * q / ref_q, 100 * cost / ref_c))
    points = [
        SingleLLMPoint(name, float(np.mean([v[0] for v in vals])),
                       float(np.mean([v[1] for v in vals])))
        for name, vals in acc.items()
        if vals
    ]
    return points, ""
