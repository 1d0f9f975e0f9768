"""Capacity planning: the cheapest replica counts of the self-hosted LLMs that meet a p95 wait
SLO (and optionally a quality floor) under a scenario's load with a given router.

Self-hosted LLMs are those with `replica_cost_per_hour > 0`; the others (APIs) keep their
configuration. Cost per hour = replica-hours of the self-hosted LLMs + per-token spend as
billed in the simulation (per measured hour). Replicas count for the whole hour, including
those of an LLM that joins or leaves mid-run: the plan prices running the configuration,
not the scenario's timeline. The search:

1. Pilot: one simulation with every self-hosted LLM at `max_replicas` gives the router's
   unconstrained route shares, per LLM and per time window, and the token counts of the
   queries each LLM gets.
2. Analytic start: per LLM, the fewest replicas for which an M/M/c queue (servers =
   replicas x slots, service time at a full batch, which is what a queued request meets)
   keeps the share of requests waiting longer than the SLO at or below 5%, window by window
   (reports.erlang).
3. Verify and refine by simulation with replications (the same seeds for every
   configuration: common random numbers): add a replica to the bottleneck until the SLO and
   the quality floor hold, then move to a feasible configuration one replica away with a
   lower cost per hour (removals first, then a replica moved between LLMs, then one added;
   a move that adds replica cost is tried only where that cost is below the per-token spend
   it may displace: a router that follows load sends traffic to the new replica), until
   none is cheaper. The plan is a local minimum of cost over these moves, checked by
   simulation ("minimal" in plan.json; not a global search).

Upper bounds: a router that sees ground truth (the oracle) or keeps fan-out answers by
realised quality sizes a cluster for traffic no deployable router would send. Such a plan is
still computed, but it is labelled an upper bound in its message, plan.json
(`upper_bound`, `upper_bound_reason`) and plan.html.

SLO check: the mean over replications of the p95 wait (as in summary.json, in flight
requests with their wait so far included, except that a rejected request counts as an
infinitely long wait, so shedding load cannot buy the SLO) is at most the target. Every
self-hosted LLM keeps at least one replica (the scenario's set of LLMs is given; sizing does
not remove an LLM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from reports.erlang import replicas_for
from sim.compare import t_interval
from sim.engine import Inputs, Simulation, prepare_inputs
from sim.errors import RouteSimError
from sim.metrics import admitted_waits, summarize
from sim.record import write_json, write_text
from sim.runner import build_workload, resolve_policies, scenario_policy_entry
from sim.scenario import LLMSpec, PolicySpec, Scenario, dump_scenario

QUANTILE = 0.95
WINDOW_S = 60.0  # arrival-rate windows of the analytic estimate
DEFAULT_MAX_EVALUATIONS = 60

Config = tuple[int, ...]  # replicas per self-hosted LLM, in `Planner.llms` order


@dataclass
class Evaluation:
    """One configuration simulated over every seed."""

    config: Config
    stage: str
    p95_by_seed: list[float]
    quality_by_seed: list[float]
    api_cost_per_hour_by_seed: list[float]
    replica_cost_per_hour: float
    per_llm: dict[str, dict[str, float]]  # mean over seeds: utilisation, late_share, share...
    slo: float
    quality_floor: float | None
    realised_picks: int = 0  # fan-outs kept by realised quality, summed over seeds

    @property
    def p95_wait_s(self) -> float:
        return float(np.mean(self.p95_by_seed))

    @property
    def p95_ci(self) -> tuple[float, float]:
        _, lo, hi = t_interval(self.p95_by_seed)
        return lo, hi

    @property
    def quality_pct(self) -> float:
        return float(np.mean(self.quality_by_seed))

    @property
    def api_cost_per_hour(self) -> float:
        return float(np.mean(self.api_cost_per_hour_by_seed))

    @property
    def cost_per_hour(self) -> float:
        return self.replica_cost_per_hour + self.api_cost_per_hour

    @property
    def meets_slo(self) -> bool:
        return self.p95_wait_s <= self.slo

    @property
    def meets_quality(self) -> bool:
        return self.quality_floor is None or self.quality_pct >= self.quality_floor

    @property
    def feasible(self) -> bool:
        return self.meets_slo and self.meets_quality

    @property
    def bottleneck(self) -> str | None:
        """The self-hosted LLM with the largest share of late requests (ties: busiest)."""
        if not self.per_llm:
            return None
        return max(self.per_llm, key=lambda k: (self.per_llm[k]["late_share"],
                                                self.per_llm[k]["utilisation"]))


@dataclass
class Plan:
    """Outcome of a search: the chosen configuration and everything tried."""

    planner: Planner
    chosen: Evaluation
    feasible: bool
    minimal: bool
    analytic: dict[str, dict[str, Any]]
    tried: list[Evaluation] = field(default_factory=list)
    message: str = ""

    @property
    def upper_bound_reason(self) -> str | None:
        """Why the plan's quality and route shares are out of a deployable router's reach,
        or None when they are not."""
        if self.planner.uses_ground_truth:
            return f"{self.planner.policy.display} routes with the answers' true quality"
        picks = sum(e.realised_picks for e in self.tried)
        if picks:
            return (f"{self.planner.policy.display} kept {picks} fan-out answer(s) by realised "
                    "quality")
        return None

    @property
    def upper_bound(self) -> bool:
        return self.upper_bound_reason is not None

    def replicas(self, ev: Evaluation | None = None) -> dict[str, int]:
        ev = ev or self.chosen
        return dict(zip(self.planner.llms, ev.config, strict=True))

    def removal_checks(self) -> dict[str, Evaluation]:
        """Evaluations of the plan minus one replica of each LLM (those that were run)."""
        out = {}
        for i, name in enumerate(self.planner.llms):
            cfg = list(self.chosen.config)
            if cfg[i] <= 1:
                continue
            cfg[i] -= 1
            ev = self.planner.cache.get(tuple(cfg))
            if ev is not None:
                out[name] = ev
        return out

    def as_json(self) -> dict[str, Any]:
        p = self.planner
        ev = self.chosen
        lo, hi = ev.p95_ci
        return _finite({
            "scenario": p.scenario.name,
            "policy": p.policy.display,
            "slo_p95_wait_s": p.slo,
            "quality_floor_pct": p.quality_floor,
            "seeds": p.seeds,
            "max_replicas": p.max_replicas,
            "feasible": self.feasible,
            "minimal": self.minimal,
            "upper_bound": self.upper_bound,
            "upper_bound_reason": self.upper_bound_reason,
            "message": self.message,
            "replicas": self.replicas(),
            "cost_per_hour": ev.cost_per_hour,
            "replica_cost_per_hour": ev.replica_cost_per_hour,
            "api_cost_per_hour": ev.api_cost_per_hour,
            "p95_wait_s": ev.p95_wait_s,
            "p95_wait_ci95_s": [_none_nan(lo), _none_nan(hi)],
            "p95_wait_by_seed_s": ev.p95_by_seed,
            "meets_slo": ev.meets_slo,
            "meets_quality_floor": ev.meets_quality,
            "quality_pct_of_reference": ev.quality_pct,
            "bottleneck": ev.bottleneck,
            "per_llm": ev.per_llm,
            "analytic": self.analytic,
            "removal_checks": {
                k: {"p95_wait_s": e.p95_wait_s, "quality_pct_of_reference": e.quality_pct,
                    "meets_slo": e.meets_slo, "feasible": e.feasible,
                    "cost_per_hour": e.cost_per_hour}
                for k, e in self.removal_checks().items()
            },
            "tried": [
                {"stage": e.stage, "replicas": self.replicas(e), "cost_per_hour": e.cost_per_hour,
                 "p95_wait_s": e.p95_wait_s, "quality_pct_of_reference": e.quality_pct,
                 "meets_slo": e.meets_slo, "feasible": e.feasible, "bottleneck": e.bottleneck}
                for e in self.tried
            ],
        })


def _none_nan(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _finite(obj: Any) -> Any:
    """JSON-safe copy: inf and NaN become null (an infinite p95 wait means more than 5% of
    requests were rejected)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def with_replicas(scenario: Scenario, replicas: Mapping[str, int]) -> Scenario:
    """The scenario with the given replica counts (initial LLMs and added ones)."""
    llms = [s.model_copy(update={"replicas": replicas[s.name]}) if s.name in replicas else s
            for s in scenario.llms]
    events = []
    for e in scenario.events:
        if e.add_llm is not None and e.add_llm.name in replicas:
            e = e.model_copy(update={"add_llm": e.add_llm.model_copy(
                update={"replicas": replicas[e.add_llm.name]})})
        events.append(e)
    return scenario.model_copy(update={"llms": llms, "events": events})


def self_hosted(scenario: Scenario) -> list[LLMSpec]:
    return [s for s in scenario.all_llms() if s.replica_cost_per_hour > 0]


def policy_spec(scenario: Scenario, name: str) -> PolicySpec:
    """The scenario's entry for `name` (label or policy name, with its params) or a bare
    spec; validated against the registry."""
    index, spec = scenario_policy_entry(scenario, name)
    try:
        return resolve_policies(scenario, [spec])[0]
    except RouteSimError as exc:
        if index is None or not (exc.field or "").startswith("--policy"):
            raise
        # The params are the scenario's: point at its entry, not at the --policy option.
        raise type(exc)(exc.message, source=exc.source,
                        field=f"policies.{index}" + exc.field[len("--policy"):]) from None


class Planner:
    """Evaluates configurations by simulation (cached) and searches for the cheapest
    feasible one (a local minimum over single-replica moves)."""

    def __init__(
        self,
        scenario: Scenario,
        policy: str,
        slo_p95_wait_s: float,
        *,
        max_replicas: int = 16,
        quality_floor: float | None = None,
        seeds: int | Sequence[int] = 3,
        max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ):
        if slo_p95_wait_s <= 0 or not math.isfinite(slo_p95_wait_s):
            raise RouteSimError(f"must be a positive number of seconds, got {slo_p95_wait_s!r}",
                                field="--slo-p95-wait")
        if max_replicas < 1:
            raise RouteSimError(f"must be at least 1, got {max_replicas}", field="--max-replicas")
        if quality_floor is not None and not (0 < quality_floor <= 1000):
            raise RouteSimError(
                f"is a quality % of the reference LLM, > 0; got {quality_floor!r}",
                field="--quality-floor",
            )
        hosted = self_hosted(scenario)
        if not hosted:
            raise RouteSimError(
                "no self-hosted LLM to size: give the LLMs to plan a replica_cost_per_hour > 0 "
                f"(LLMs: {', '.join(s.name for s in scenario.all_llms())})",
                field="llms.replica_cost_per_hour",
            )
        self.scenario = scenario.model_copy(
            update={"slo": scenario.slo.model_copy(update={"p95_wait_s": slo_p95_wait_s})}
        )
        self.policy = policy_spec(scenario, policy)
        from policies import registry

        self.uses_ground_truth = bool(
            getattr(registry.get(self.policy.name), "uses_ground_truth", False))
        self.slo = float(slo_p95_wait_s)
        self.quality_floor = quality_floor
        self.max_replicas = int(max_replicas)
        self.seeds = ([scenario.seed + k for k in range(seeds)] if isinstance(seeds, int)
                      else list(seeds))
        if not self.seeds:
            raise RouteSimError("at least one seed is needed", field="--seeds")
        self.max_evaluations = max_evaluations
        self.on_evaluation = on_evaluation
        self.specs = {s.name: s for s in hosted}
        self.llms = [s.name for s in hosted]
        self.cache: dict[Config, Evaluation] = {}
        self._inputs: dict[int, Inputs] = {}
        self.hours = (scenario.duration_s - scenario.warmup_s) / 3600.0

    # --------------------------------------------------------------------- simulation
    def _inputs_for(self, seed: int) -> Inputs:
        if seed not in self._inputs:
            wl = build_workload(self.scenario, seed)
            self._inputs[seed] = prepare_inputs(self.scenario, wl, seed)
        return self._inputs[seed]

    def _simulate(self, config: Config, seed: int):
        from policies import registry

        sc = with_replicas(self.scenario, dict(zip(self.llms, config, strict=True)))
        policy = registry.create(self.policy.name, self.policy.params)
        res = Simulation(sc, policy, self._inputs_for(seed), seed=seed).run()
        return sc, res

    def replica_cost(self, config: Config) -> float:
        return sum(n * self.specs[name].replica_cost_per_hour
                   for name, n in zip(self.llms, config, strict=True))

    def evaluate(self, config: Config, stage: str) -> Evaluation:
        """Simulate `config` on every seed (cached)."""
        config = tuple(int(x) for x in config)
        if config in self.cache:
            return self.cache[config]
        p95s, quals, api = [], [], []
        realised_picks = 0
        per_llm_acc: dict[str, dict[str, list[float]]] = {n: {} for n in self.llms}
        for seed in self.seeds:
            sc, res = self._simulate(config, seed)
            realised_picks += res.realised_picks
            summary = summarize(res.requests, res.timeline, sc, self.policy.display, seed)
            m = res.requests.filter(pl.col("arrival_s") >= sc.warmup_s)
            p95s.append(planning_p95_wait(m))
            quals.append(float(summary["quality_pct_of_reference"] or 0.0))
            api.append(float(summary["total_cost_usd"]) / self.hours if self.hours > 0 else 0.0)
            for name, stats in llm_stats(m, res.timeline, sc, self.llms, self.slo).items():
                for k, v in stats.items():
                    per_llm_acc[name].setdefault(k, []).append(v)
        per_llm = {n: {k: float(np.mean(v)) for k, v in d.items()}
                   for n, d in per_llm_acc.items()}
        for n, cfg_n in zip(self.llms, config, strict=True):
            per_llm[n]["replicas"] = cfg_n
        ev = Evaluation(config, stage, p95s, quals, api, self.replica_cost(config), per_llm,
                        self.slo, self.quality_floor, realised_picks)
        self.cache[config] = ev
        if self.on_evaluation is not None:
            self.on_evaluation(ev)
        return ev

    # ----------------------------------------------------------------------- analytic
    def analytic_start(self) -> tuple[Config, dict[str, dict[str, Any]]]:
        """Erlang C replicas per LLM from a pilot run at max replicas (first seed)."""
        top = tuple(self.max_replicas for _ in self.llms)
        sc, res = self._simulate(top, self.seeds[0])
        req = res.requests.filter(
            (pl.col("arrival_s") >= sc.warmup_s) & (pl.col("arrival_s") < sc.duration_s)
        )
        n_win = max(1, math.ceil((sc.duration_s - sc.warmup_s) / WINDOW_S))
        edges = sc.warmup_s + WINDOW_S * np.arange(n_win + 1)
        widths = np.diff(np.minimum(edges, sc.duration_s))
        start: list[int] = []
        notes: dict[str, dict[str, Any]] = {}
        total = max(req.height, 1)
        for name in self.llms:
            spec = self.specs[name]
            mine = req.filter(pl.col("llm") == name)
            counts = np.histogram(mine["arrival_s"].to_numpy(), bins=edges)[0].astype(float)
            rates = counts / np.maximum(widths, 1e-9)
            done = mine.filter(pl.col("outcome") == "completed")
            s_full = full_batch_service_s(
                spec,
                float(done["input_tokens"].mean() or 0.0) if done.height else 0.0,
                float(done["output_tokens"].mean() or 0.0) if done.height else 0.0,
            )
            r = (1 if mine.height == 0 else replicas_for(
                rates, counts, s_full, spec.slots, self.slo, quantile=QUANTILE,
                max_replicas=self.max_replicas))
            start.append(r if r is not None else self.max_replicas)
            notes[name] = {
                "route_share_pilot": mine.height / total,
                "mean_rate_per_s": float(counts.sum() / widths.sum()),
                "peak_rate_per_s": float(rates.max()) if rates.size else 0.0,
                "mean_service_full_batch_s": s_full,
                "servers_per_replica": spec.slots,
                "replicas": r,
                "enough_within_max": r is not None,
            }
        return tuple(start), notes

    # ------------------------------------------------------------------------ search
    def _budget_left(self) -> bool:
        return len(self.cache) < self.max_evaluations

    def plan(self) -> Plan:
        """Run the whole search (see the module docstring)."""
        start, notes = self.analytic_start()
        cur = self.evaluate(start, "analytic")
        # climb: one replica to the bottleneck at a time
        while not cur.feasible and self._budget_left():
            # While the SLO fails, only LLMs with late requests can fix it by growing.
            order = sorted(
                (i for i, n in enumerate(self.llms) if cur.config[i] < self.max_replicas
                 and (cur.meets_slo or cur.per_llm[n]["late_share"] > 0)),
                key=lambda i: (-cur.per_llm[self.llms[i]]["late_share"],
                               -cur.per_llm[self.llms[i]]["utilisation"]),
            )
            if not order:
                break
            cfg = list(cur.config)
            cfg[order[0]] += 1
            cur = self.evaluate(tuple(cfg), "add")
        top = tuple(self.max_replicas for _ in self.llms)
        if not cur.feasible and (top in self.cache or self._budget_left()):
            ev = self.evaluate(top, "max")
            if ev.feasible:
                cur = ev
        if not cur.feasible:
            best = min(self.cache.values(), key=lambda e: (
                not e.meets_slo, round(e.p95_wait_s, 6), -round(e.quality_pct, 6),
                e.cost_per_hour))
            what = self._what_fails(best)
            if top in self.cache:  # the most capacity there is fails too
                msg = (f"no configuration within --max-replicas {self.max_replicas} meets "
                       f"{what}; best found: {self._describe(best)}")
            else:
                msg = (f"the evaluation budget of {self.max_evaluations} configurations "
                       f"(--max-evaluations) ran out before one meeting {what} was found "
                       f"(a larger budget may find one); best found: {self._describe(best)}")
            return self._labelled(Plan(self, best, False, False, notes,
                                       list(self.cache.values()), msg))
        chosen, minimal = self._descend(cur)
        msg = (f"cheapest feasible configuration found: {self._describe(chosen)} (no single "
               "replica removed, moved or added is feasible and cheaper)")
        if not minimal:
            msg = (f"cheapest feasible configuration found: {self._describe(chosen)} "
                   f"(evaluation budget of {self.max_evaluations} configurations reached: "
                   "not every single-replica move was checked)")
        return self._labelled(Plan(self, chosen, True, minimal, notes,
                                   list(self.cache.values()), msg))

    @staticmethod
    def _labelled(plan: Plan) -> Plan:
        if plan.upper_bound:
            plan.message += (f". UPPER BOUND: {plan.upper_bound_reason}; a deployable router "
                             "sends different traffic")
        return plan

    def _descend(self, cur: Evaluation) -> tuple[Evaluation, bool]:
        """From a feasible configuration, move to a feasible neighbour with a lower cost per
        hour until none has one: removals are tried first, then a replica moved from one LLM
        to another, then one added (with a router that follows load, a replica can take
        traffic off a dearer per-token LLM), and of the first kind that has any, the cheapest
        is taken. Returns the final configuration and whether every move from it was checked
        (False: the evaluation budget ran out)."""
        while True:
            for stage, moves in (("remove", self._removals), ("swap", self._swaps),
                                 ("add_cheaper", self._additions)):
                nxt, complete = self._cheapest_better(cur, moves(cur.config), stage)
                if nxt is not None:
                    cur = nxt
                    break
                if not complete:
                    return cur, False
            else:
                return cur, True

    def _cheapest_better(self, cur: Evaluation, configs, stage: str):
        """The cheapest feasible configuration of `configs` that costs less than `cur` (or
        None), and whether every one was evaluated before the budget ran out."""
        best = None
        for cfg in configs:
            if cfg not in self.cache and not self._budget_left():
                return best, False
            ev = self.evaluate(cfg, stage)
            if ev.feasible and ev.cost_per_hour < cur.cost_per_hour and (
                    best is None or (ev.cost_per_hour, ev.p95_wait_s)
                    < (best.cost_per_hour, best.p95_wait_s)):
                best = ev
        return best, True

    def _removals(self, config: Config) -> list[Config]:
        """One replica fewer somewhere, cheapest result first (a short budget goes to the
        best moves); every LLM keeps one."""
        out = [config[:i] + (k - 1,) + config[i + 1:] for i, k in enumerate(config) if k > 1]
        return sorted(out, key=self.replica_cost)

    def _swaps(self, config: Config) -> list[Config]:
        """One replica moved from an LLM to another, where the replica-cost difference is
        below the per-token spend it could displace (otherwise it cannot lower the total)."""
        cost = [self.specs[n].replica_cost_per_hour for n in self.llms]
        spend = self.cache[config].api_cost_per_hour
        out = []
        for i in range(len(config)):
            for j in range(len(config)):
                if (j != i and config[i] > 1 and config[j] < self.max_replicas
                        and cost[j] - cost[i] < spend):
                    cfg = list(config)
                    cfg[i] -= 1
                    cfg[j] += 1
                    out.append(tuple(cfg))
        return out

    def _additions(self, config: Config) -> list[Config]:
        """One replica more, only where it costs less per hour than the per-token spend it
        could displace (otherwise it cannot lower the total)."""
        spend = self.cache[config].api_cost_per_hour
        return [config[:i] + (k + 1,) + config[i + 1:] for i, (k, n) in
                enumerate(zip(config, self.llms, strict=True))
                if k < self.max_replicas and self.specs[n].replica_cost_per_hour < spend]

    def _what_fails(self, ev: Evaluation) -> str:
        parts = [f"the SLO p95 wait <= {self.slo:g} s"]
        if self.quality_floor is not None:
            parts.append(f"the quality floor {self.quality_floor:g}%")
        return " and ".join(parts)

    def _describe(self, ev: Evaluation) -> str:
        reps = ", ".join(f"{n}={k}" for n, k in zip(self.llms, ev.config, strict=True))
        return (f"{reps}: ${ev.cost_per_hour:.2f}/h, p95 wait {ev.p95_wait_s:.2f} s, "
                f"quality {ev.quality_pct:.1f}%")


# ------------------------------------------------------------------------------ helpers
def full_batch_service_s(spec: LLMSpec, mean_in: float, mean_out: float) -> float:
    """Mean service time of a request started on a full replica (every slot busy), which is
    when queued requests start (sim/cluster.py's batching model)."""
    if spec.service is not None:
        return spec.service.mean_s
    decode = spec.decode_tps / (1.0 + spec.batching_slowdown * (spec.slots - 1))
    return spec.first_token_s + mean_in / spec.prefill_tps + mean_out / decode


def _planning_waits(measured: pl.DataFrame) -> np.ndarray:
    """The summary's admitted waits (sim.metrics.admitted_waits, in flight requests with
    their wait so far) plus one infinite wait per rejection."""
    n_rejected = int((measured["outcome"] == "rejected").sum())
    return np.concatenate([admitted_waits(measured).astype(float), np.full(n_rejected, np.inf)])


def planning_p95_wait(measured: pl.DataFrame) -> float:
    """p95 wait of the measured requests as in sim.metrics, rejections counted as infinite."""
    return _percentile(_planning_waits(measured), 100 * QUANTILE)


def _percentile(w: np.ndarray, q: float) -> float:
    """np.percentile's linear interpolation (to rounding), with infinite waits (rejections)
    allowed: a rank that falls on a finite value is that value (numpy gives NaN there when
    the next value is infinite: a + (inf - a) * 0); between a finite and an infinite one it
    is inf."""
    if not w.size:
        return 0.0
    s = np.sort(w)
    h = (s.size - 1) * q / 100.0
    lo = int(math.floor(h))
    frac = h - lo
    if frac == 0.0 or lo + 1 >= s.size:
        return float(s[lo])
    a, b = float(s[lo]), float(s[lo + 1])
    return math.inf if math.isinf(b) else a + frac * (b - a)


def llm_stats(
    measured: pl.DataFrame,
    timeline: pl.DataFrame,
    scenario: Scenario,
    names: Sequence[str],
    slo: float,
) -> dict[str, dict[str, float]]:
    """Per LLM: route share, share of its requests late (wait > SLO or rejected), its p95
    wait, and utilisation (busy / capacity over the arrival period after warm-up)."""
    out = {}
    n = max(measured.height, 1)
    tl = timeline.filter((pl.col("t_s") >= scenario.warmup_s)
                         & (pl.col("t_s") <= scenario.duration_s))
    for name in names:
        mine = measured.filter(pl.col("llm") == name)
        w = _planning_waits(mine)
        s = tl.filter(pl.col("llm") == name)
        cap = float(s["capacity"].sum()) if s.height else 0.0
        out[name] = {
            "route_share": mine.height / n,
            "late_share": float((w > slo).mean()) if w.size else 0.0,
            "p95_wait_s": _percentile(w, 100 * QUANTILE),
            "utilisation": float(s["busy"].sum()) / cap if cap > 0 else 0.0,
        }
    return out


def write_plan(plan: Plan, out_dir: Path) -> tuple[Path, Path]:
    """plan.json and plan.html under out_dir, beside the resolved config: scenario.yaml (the
    scenario as planned: its SLO and the router) and chosen.yaml (the same with the chosen
    replica counts, which `routesim run` simulates again)."""
    from reports.plan_html import plan_page

    p = plan.planner
    out_dir = Path(out_dir)
    planned = p.scenario.model_copy(update={"policies": [p.policy]})
    write_text(dump_scenario(planned), out_dir / "scenario.yaml")
    write_text(dump_scenario(with_replicas(planned, plan.replicas())), out_dir / "chosen.yaml")
    js = out_dir / "plan.json"
    write_json(plan.as_json(), js)
    page = plan_page(plan)
    return js, page.write(out_dir / "plan.html")
