"""Property tests over random small scenarios: conservation and determinism.

Random rates, LLM counts, capacities, outages, add/remove events, price changes, slowdowns
and patience. Every request must end in exactly one outcome, and the same seed must give
identical outputs.
"""

from __future__ import annotations

from collections import Counter
from unittest import mock

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import llm
from policies import registry
from policies.base import BasePolicy
from sim import cluster
from sim.cluster import QUEUED
from sim.engine import Simulation, prepare_inputs
from sim.metrics import summarize
from sim.record import REJECT_REASONS
from sim.runner import build_workload
from sim.scenario import parse_scenario
from sim.types import ClusterView, Decision

NAMES = ["gpt-4", "gpt-3.5-turbo", "mixtral-8x7b", "mistral-7b", "yi-34b"]


@st.composite
def scenarios(draw):
    n_llms = draw(st.integers(1, 4))
    names = NAMES[:n_llms]
    duration = draw(st.floats(50, 300))
    llms = [
        llm(n, replicas=draw(st.integers(1, 3)), slots=draw(st.integers(1, 4)),
            max_queue=draw(st.integers(0, 30)), decode_tps=draw(st.floats(5, 200)),
            batching_slowdown=draw(st.floats(0, 0.3)),
            price_in_per_mtok=draw(st.floats(0.1, 10)))
        for n in names
    ]
    events = []
    if draw(st.booleans()):
        events.append({"at_s": draw(st.floats(0, duration, exclude_max=True)),
                       "outage": {"llm": names[0], "duration_s": draw(st.floats(1, 100))}})
    if draw(st.booleans()):
        events.append({"at_s": draw(st.floats(0, duration, exclude_max=True)),
                       "add_llm": llm("llama-3.1-70b", price_in_per_mtok=0.9,
                                      price_out_per_mtok=0.9, slots=2)})
    if n_llms > 1 and draw(st.booleans()):
        events.append({"at_s": draw(st.floats(0, duration, exclude_max=True)),
                       "remove_llm": names[-1]})
    if draw(st.booleans()):
        events.append({"at_s": draw(st.floats(0, duration, exclude_max=True)),
                       "price_change": {"llm": names[0], "price_in_per_mtok": 1.0}})
    if draw(st.booleans()):
        events.append({"at_s": draw(st.floats(0, duration, exclude_max=True)),
                       "slowdown": {"llm": names[0], "factor": draw(st.floats(0.5, 5)),
                                    "duration_s": 20.0}})
    patience = draw(st.one_of(st.none(), st.floats(0.5, 60)))
    drain = draw(st.one_of(st.none(), st.floats(0, 100)))
    data = {
        "name": "prop",
        "seed": draw(st.integers(0, 10_000)),
        "duration_s": duration,
        "arrivals": {"kind": "poisson", "rate_per_s": draw(st.floats(0.2, 8))},
        "llms": llms,
        "events": events,
        "workload": {"source": "synthetic", "reference_llm": names[0], "n_queries": 200},
        "users": {"patience_s": None if patience is None else {"kind": "exponential",
                                                               "mean": patience}},
        "feedback": {"probability": draw(st.floats(0, 1))},
        "run": {"drain_s": drain, "max_retries": draw(st.integers(0, 3)),
                "sample_every_s": 5.0},
    }
    return parse_scenario(data), draw(st.sampled_from(["random", "least_loaded", "cheapest"]))


def simulation(sc, policy, cls=Simulation):
    """A simulation of `sc` (its own seed) with `policy`, and its inputs."""
    inputs = prepare_inputs(sc, build_workload(sc, sc.seed), sc.seed)
    return cls(sc, policy, inputs, seed=sc.seed), inputs


def run_once(sc, policy_name):
    sim, inputs = simulation(sc, registry.create(policy_name))
    return sim.run(), inputs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_conservation_every_request_one_outcome(case):
    sc, policy = case
    res, inputs = run_once(sc, policy)
    req = res.requests
    assert req.height == inputs.arrival_s.size
    counts = req["outcome"].value_counts()
    total = int(counts["count"].sum())
    assert total == req.height
    s = summarize(req, res.timeline, sc, policy, sc.seed)
    assert s["arrived"] == (s["completed"] + s["rejected"] + s["abandoned"] + s["failed"]
                            + s["in_flight"])
    done = req.filter(pl.col("outcome") == "completed")
    # Completed requests have a realised quality, a service start after arrival and an end
    # after their start; waits are never negative.
    assert done["quality"].is_nan().sum() == 0
    assert (done["start_s"] >= done["arrival_s"] - 1e-9).all()
    assert (done["end_s"] >= done["start_s"]).all()
    assert (req["wait_s"] >= -1e-9).all()
    # in_flight only when the run was cut by drain_s
    if sc.run.drain_s is None:
        assert s["in_flight"] == 0
    # Failures only through outages
    if not any(e.outage for e in sc.events):
        assert s["failed"] == 0
    # Nothing completed, nothing paid (these policies never escalate, so a request's one
    # call is paid only if it completed).
    assert (req.filter(pl.col("outcome") != "completed")["cost_usd"] == 0).all()
    # A rejected request says why; no other request has a reason.
    rejected = req["outcome"] == "rejected"
    assert req.filter(rejected)["reject_reason"].is_in(list(REJECT_REASONS)).all()
    assert req.filter(~rejected)["reject_reason"].is_null().all()
    if not any(e.outage for e in sc.events):
        assert (req.filter(rejected)["reject_reason"] != "down").all()
    # These policies send one copy and never escalate, and a rejection ends its request: the
    # timeline's per-job count of load rejections equals the requests rejected for load
    # after warm-up and before the end of arrivals (removed LLMs included).
    load = req.filter(
        rejected
        & pl.col("reject_reason").is_in(["queue_full", "rate_limited"])
        & (pl.col("end_s") >= sc.warmup_s)
        & (pl.col("end_s") < sc.duration_s)
    )
    final = res.timeline.group_by("llm").agg(pl.col("load_rejected").max())
    assert int(final["load_rejected"].sum()) == load.height


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_same_seed_identical_outputs(case):
    sc, policy = case
    a, _ = run_once(sc, policy)
    b, _ = run_once(sc, policy)
    assert a.requests.equals(b.requests, null_equal=True)
    assert a.timeline.equals(b.timeline)
    assert a.events.equals(b.events)


class FanOutAndEscalate(BasePolicy):
    """Fan-outs of 1 to 3 copies under every keep rule, and escalations after an answer:
    the paths where one request has several jobs. Its draws come from its own seeded
    generator, so a run is reproducible."""

    name = "fan_out_and_escalate"

    def __init__(self, seed: int):
        super().__init__()
        self.rng = np.random.default_rng(seed)

    def route(self, query, view):
        names = list(view.names)
        k = int(self.rng.choice([1, 1, 2, 3]))
        pick = [names[int(i)] for i in self.rng.integers(len(names), size=k)]
        keep = str(self.rng.choice(["primary", "best_judged", "best_realised"]))
        return Decision(pick[0], extra=tuple(pick[1:]), keep=keep)

    def on_answer(self, query, answer, view):
        if self.rng.random() < 0.3:
            return Decision(view.names[int(self.rng.integers(len(view.names)))])
        return None


class CheckedSimulation(Simulation):
    """Counts how often each request is finished and where service starts happen."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.finished = Counter()
        self.start_not_now = 0

    def _finish(self, rid, *a, **kw):
        self.finished[rid] += 1
        super()._finish(rid, *a, **kw)

    def _start(self, job, r, now):
        self.start_not_now += now != self.env.now
        super()._start(job, r, now)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 10_000))
def test_requests_with_several_jobs_keep_time_and_waits_consistent(case, policy_seed):
    sc, _ = case
    sim, inputs = simulation(sc, FanOutAndEscalate(policy_seed), CheckedSimulation)
    res = sim.run()
    req = res.requests
    assert sim.start_not_now == 0  # no job starts at a time other than the clock's
    ended = req.filter(pl.col("outcome") != "in_flight")
    assert sorted(sim.finished) == ended["request_id"].to_list()
    assert set(sim.finished.values()) <= {1}  # finished once each
    eps = 1e-9
    # Waiting is time spent queued: never more than the request has been in the system.
    age = pl.when(pl.col("outcome") == "in_flight").then(res.end_s).otherwise(pl.col("end_s"))
    assert req.filter(pl.col("wait_s") > age - pl.col("arrival_s") + eps).height == 0
    # Patience is spent only while queued, and what is left carries over to retries and
    # escalations: nobody waits longer than their patience.
    assert (req["wait_s"].to_numpy() <= inputs.users.patience_s + eps).all()
    done = req.filter(pl.col("outcome") == "completed")
    # The kept answer was served before the request's end (a fan-out kept by a rule over all
    # answers ends when its last copy does, and an escalation may end later still).
    assert (done["end_s"] >= done["start_s"] + done["service_s"] - eps).all()
    # An arrival is handled at its own time, exactly.
    assert (done["start_s"] >= done["arrival_s"]).all()


class ViewChecking(FanOutAndEscalate):
    """At every call, checks the view against one built afresh from the cluster's state (the
    engine writes only the entries of deployments that changed, lazily), that no queued
    job's deadline has passed and no feedback that is due is held back (both are lazy too),
    and that every queued job is in its deployment's deadline heap (which is compacted)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.sim = None
        self.checks = 0
        self.hook_checks = 0
        self.feedbacks = 0

    def _check(self, view, *, hook: bool = False) -> None:
        cl = self.sim.cluster
        ps = cl.present
        fresh = ClusterView(
            names=tuple(d.name for d in ps), models=tuple(d.spec.model_name for d in ps),
            model_cols=np.array([d.col for d in ps]),
            price_in_per_mtok=np.array([d.price_in for d in ps]),
            price_out_per_mtok=np.array([d.price_out for d in ps]),
            up=np.array([d.n_up > 0 for d in ps]),
            capacity=np.array([d.n_up * d.spec.slots for d in ps]),
            busy=np.array([sum(d.active) for d in ps]),
            queue_len=np.array([sum(j.state == QUEUED for j in d.queue) for d in ps]),
            max_queue=np.array([d.spec.max_queue for d in ps]),
            mean_service_s=np.array([d.mean_service_s for d in ps]),
            speed_factor=np.array([d.speed_factor for d in ps]),
        )
        assert view.names == fresh.names and view.models == fresh.models
        for f in ("model_cols", "price_in_per_mtok", "price_out_per_mtok", "up", "capacity",
                  "busy", "queue_len", "max_queue", "mean_service_s", "speed_factor",
                  "est_wait_s", "load", "accepting"):
            np.testing.assert_array_equal(getattr(view, f), getattr(fresh, f), err_msg=f)
        now = self.sim.env.now
        assert all(j.deadline > now for d in ps for j in d.queue if j.state == QUEUED)
        for d in ps:
            in_heap = {id(e[2]) for e in d.qheap}
            assert all(id(j) in in_heap for j in d.queue
                       if j.state == QUEUED and j.deadline < np.inf)
        if hook:  # hooks get no view: one a policy kept must be current all the same
            self.hook_checks += 1
            return
        assert view.now == now
        fb = self.sim._fb_heap
        assert not fb or fb[0][0] > now
        self.checks += 1

    def route(self, query, view):
        self._check(view)
        return super().route(query, view)

    def on_answer(self, query, answer, view):
        self._check(view)
        return super().on_answer(query, answer, view)

    def feedback(self, fb):
        self.feedbacks += 1

    def on_llm_added(self, llm):
        self._check(self.sim.cluster.view, hook=True)

    def on_llm_removed(self, name):
        self._check(self.sim.cluster.view, hook=True)

    def on_price_changed(self, llm):
        self._check(self.sim.cluster.view, hook=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 10_000))
def test_policies_see_the_exact_cluster_state(case, policy_seed):
    sc, _ = case
    policy = ViewChecking(policy_seed)
    sim, inputs = simulation(sc, policy)
    policy.sim = sim
    # Compact deadline heaps as soon as they hold any entry of a job that left the queue.
    with mock.patch.object(cluster, "HEAP_SLACK", 0):
        res = sim.run()
    assert policy.checks >= inputs.arrival_s.size
    # (A run without drain_s ends once drained, which can be before its last events.)
    hooks = res.events.filter(pl.col("kind").is_in(["add_llm", "remove_llm", "price_change"]))
    assert policy.hook_checks == hooks.height
