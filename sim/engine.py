"""Runs one (scenario, policy, seed) in a SimPy environment.

Lifecycle of a request: arrival -> policy.route -> queue at the chosen deployment (rejected
when down, full or rate-limited) -> wait (abandoned when the user's patience runs out) ->
service -> completion (quality and cost realised) -> maybe feedback after a delay.
A policy that overrides `on_answer` (a cascade) gets each single answer, judged and billed
for the judge, unless its decision said `final`; a Decision from it escalates.
A job that fails in an outage is re-offered to the policy up to `run.max_retries` times;
queued jobs of a removed deployment are re-offered (not counted as retries). A re-offer goes
to `policy.route`, unless the request has an answer in hand (an escalation failed or was
queued at the removed deployment): then `policy.on_answer` decides again on that answer,
and if it returns nothing the answer is delivered. A decision from `on_answer` may fan out
like one from `route`; a fan-out round ends the request (its answers are not escalated).
With keep="primary", a round whose primary is lost delivers the first other answer as soon
as both are known. Among events at the same time, completions come first and arrivals last
(see PRIORITY_COMPLETION).
Every request ends in exactly one recorded outcome; a rejection also records why
(`reject_reason`: down, rate_limited, queue_full or removed). An LLM call is billed at the
list prices in force when it was routed (what the policy decided on; for a request's first
call, also the prices of its reference cost), even if a price change comes while it queues.
A fan-out round in which no copy was served and a copy's user gave up is not retried: the
request is abandoned then.

The event loop is lean. Arrivals and completions, almost all of a run's events, are handled
by the environment without a SimPy Event object each (see _LeanEnvironment). Two exact
shortcuts leave no other event per request: abandonment and feedback delivery are evaluated
lazily. A queued job whose deadline passed is marked abandoned *at its deadline* the next
time anything looks at its queue (a decision, a dispatch, a timeline sample), so every
observation sees the exact state. Feedback due at time t is handed to the policy before the
first decision at or after t, which is the only moment the policy's state matters.
"""

from __future__ import annotations

import gc
import heapq
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import polars as pl
import simpy

from sim.arrivals import arrival_times
from sim.cluster import CANCELLED, DONE, QUEUED, RUNNING, Cluster, Deployment, Job
from sim.context import build_policy_context, training_set
from sim.errors import RouteSimError
from sim.feedback import draw_users
from sim.record import (
    ABANDONED,
    COMPLETED,
    FAILED,
    IN_FLIGHT,
    REJECT_DOWN,
    REJECT_QUEUE_FULL,
    REJECT_RATE_LIMITED,
    REJECT_REMOVED,
    REJECTED,
    GrowingColumns,
    RequestRecorder,
)
from sim.scenario import Scenario
from sim.types import KEEP_RULES, Answer, Decision, Feedback, LLMInfo, Query, Workload

# Among events at the same time: completions first (work that ends as an outage starts was
# done), then scenario events, recoveries and everything else, then arrivals (an arrival at
# t sees the cluster as the events at t left it; see _LeanEnvironment). Without this,
# ties went by creation order: whether an arrival at an outage's end was served depended on
# when the previous one came.
PRIORITY_COMPLETION = simpy.core.URGENT
PRIORITY_DISPATCH = simpy.core.NORMAL + 1  # a slot freed by a completion at an event's time


# A run allocates a handful of short-lived objects per request (heap entries, jobs, decisions)
# and keeps few: at the collector's default (a young-generation pass every 700 allocations)
# those passes cost about 4% of a MixLLM run and find almost nothing to free.
GC_YOUNG_THRESHOLD = 10_000


@contextmanager
def _young_objects_collected_less_often() -> Iterator[None]:
    """The young generation collected every GC_YOUNG_THRESHOLD allocations (or less often,
    if the process already asks for that) while the block runs; the process's settings are
    restored after it."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], GC_YOUNG_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class _At(simpy.events.Timeout):
    """A timeout with a priority among events at the same time (SimPy's `Timeout`, which
    always schedules at NORMAL, with the priority as an argument)."""

    def __init__(self, env: simpy.Environment, delay: float, priority: int, value=None):
        if delay < 0:
            raise ValueError(f"negative delay {delay}")
        self.env = env
        self.callbacks = []
        self._value = value
        self._delay = delay
        self._ok = True
        env.schedule(self, priority, delay)


class _LeanEnvironment(simpy.Environment):
    """SimPy's environment, with the two kinds of events that make almost all of a run's
    events handled without an Event object each, in the same order as events:

    - Arrivals are known before the run. `next_arrival_s` is the next one's time (inf:
      none); it is handled after every scheduled event at or before its time, whatever
      their priority, so it comes where an arrival event with a priority below all others
      would.
    - A job's completion is an entry (time, PRIORITY_COMPLETION, id, job, token) in SimPy's
      own queue, ordered among events by the same keys as a Timeout of that priority.
    """

    def __init__(self) -> None:
        super().__init__()
        self.next_arrival_s = math.inf
        self.on_arrival: Callable[[], None] | None = None
        self.on_complete: Callable[[Job, int], None] | None = None

    def complete_in(self, delay: float, job: Job) -> None:
        """Call `on_complete(job, token)` after `delay`, with the job's token now."""
        heapq.heappush(self._queue,
                       (self._now + delay, PRIORITY_COMPLETION, next(self._eid), job, job.token))

    def peek(self) -> float:
        return min(super().peek(), self.next_arrival_s)

    def step(self) -> None:
        q = self._queue
        t = self.next_arrival_s
        if not q or t < q[0][0]:
            if t == math.inf:
                raise simpy.core.EmptySchedule
            self._now = t
            self.next_arrival_s = math.inf
            self.on_arrival()
        elif len(q[0]) == 5:
            self._now, _, _, job, token = heapq.heappop(q)
            self.on_complete(job, token)
        else:
            super().step()


# Order matters: appending a subsystem at the end keeps existing streams unchanged.
SUBSYSTEMS = ("arrivals", "workload", "sampling", "users", "feedback", "service", "judge", "policy")


def subsystem_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One Generator per subsystem, spawned from the scenario seed."""
    children = np.random.SeedSequence(seed).spawn(len(SUBSYSTEMS))
    return {name: np.random.default_rng(s) for name, s in zip(SUBSYSTEMS, children, strict=True)}


def subsystem_seed(seed: int, name: str) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed).spawn(len(SUBSYSTEMS))[SUBSYSTEMS.index(name)]


def keyed_rng(
    stream: np.random.SeedSequence, rid: int, attempt: int, answer: int
) -> np.random.Generator:
    """The generator of one (request, attempt, answer) within a subsystem's `stream`.

    A pure function of its arguments, so the draw a job gets does not depend on what else
    happened before it in the run (common random numbers across policies). The key extends
    the subsystem's spawn key, so it never coincides with the subsystem's own sequential
    stream (which feeds the pre-drawn arrays) nor with another subsystem's keys.
    """
    return np.random.default_rng(
        np.random.SeedSequence(stream.entropy, spawn_key=(*stream.spawn_key, rid, attempt, answer))
    )


@dataclass(frozen=True, eq=False)
class Inputs:
    """Everything exogenous for one (scenario, seed): identical for every policy.

    Per-job noise (service-time overrides, judge scores) is keyed on (request id, attempt,
    answer): `attempt` is the request's routing round (0 = its first route; +1 for each
    retry after a failure or escalation, not for a re-offer after a removal, since that job
    never ran) and `answer` the job's place in its decision (0 = primary, i = i-th top-k
    extra). Note that `Query.attempt` counts LLM calls instead. The overwhelmingly common
    key (rid, 0, 0) is pre-drawn in batch; any other is drawn from `keyed_rng` on demand.
    """

    workload: Workload
    arrival_s: np.ndarray
    rows: np.ndarray
    users: object  # sim.feedback.UserDraws
    exp1: np.ndarray  # Exp(1) per request: the first answer's service-time override draw
    norm: np.ndarray  # N(0, 1) per request: the same for lognormal overrides
    judge_z: np.ndarray  # N(0, 1) per request: the judge's noise on the first answer
    service_stream: np.random.SeedSequence
    judge_stream: np.random.SeedSequence

    def service_exp1(self, rid: int, attempt: int, answer: int) -> float:
        """Exp(1) draw of one job's service-time override (exponential kind)."""
        if attempt or answer:
            return float(keyed_rng(self.service_stream, rid, attempt, answer).exponential())
        return float(self.exp1[rid])

    def service_norm(self, rid: int, attempt: int, answer: int) -> float:
        """N(0, 1) draw of one job's service-time override (lognormal kind)."""
        if attempt or answer:
            return float(keyed_rng(self.service_stream, rid, attempt, answer).standard_normal())
        return float(self.norm[rid])

    def judge_normal(self, rid: int, attempt: int, answer: int) -> float:
        """N(0, 1) draw behind the judge's score of one job's answer."""
        if attempt or answer:
            return float(keyed_rng(self.judge_stream, rid, attempt, answer).standard_normal())
        return float(self.judge_z[rid])


def prepare_inputs(scenario: Scenario, workload: Workload, seed: int) -> Inputs:
    """Arrivals, query rows, user behaviour and first-answer noise for a seed, in batch."""
    from sim.workload import sample_query_rows

    rngs = subsystem_rngs(seed)
    t = arrival_times(scenario.arrivals, scenario.duration_s, rngs["arrivals"])
    mix_changes = [(e.at_s, e.mix_change.mix) for e in scenario.events if e.mix_change is not None]
    rows = sample_query_rows(workload, scenario.workload, t, mix_changes, rngs["sampling"])
    users = draw_users(t.size, scenario.users, scenario.feedback, rngs["users"], rngs["feedback"])
    svc = rngs["service"]
    n = t.size
    return Inputs(
        workload,
        t,
        rows,
        users,
        svc.exponential(1.0, n),
        svc.standard_normal(n),
        rngs["judge"].standard_normal(n),
        subsystem_seed(seed, "service"),
        subsystem_seed(seed, "judge"),
    )


def reference_prices_at(scenario: Scenario, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference LLM's list prices in force at each time in `t` (price changes apply)."""
    ref = scenario.llm(scenario.workload.reference_llm)
    steps = [(0.0, ref.price_in_per_mtok, ref.price_out_per_mtok)]
    for e in sorted(scenario.events, key=lambda e: e.at_s):
        pc = e.price_change
        if pc is not None and pc.llm == ref.name:
            _, pin, pout = steps[-1]
            steps.append((e.at_s, pin if pc.price_in_per_mtok is None else pc.price_in_per_mtok,
                          pout if pc.price_out_per_mtok is None else pc.price_out_per_mtok))
    at = np.array([s[0] for s in steps])
    idx = np.searchsorted(at, t, side="right") - 1
    return (np.array([s[1] for s in steps])[idx], np.array([s[2] for s in steps])[idx])


@dataclass(eq=False)
class _TopK:
    pending: int
    keep: str
    results: list  # (quality, job)
    waits: dict  # answer index -> queueing time of each copy that started or gave up
    failed: bool = False
    abandoned: tuple | None = None  # (time, job) of the first copy whose user gave up
    served: bool = False  # a copy started service (the user was not left waiting)
    # Latest end among the copies: an abandonment is noticed lazily and recorded at its
    # deadline, which can precede a copy that completed before it was noticed.
    end_s: float = -math.inf
    finished: bool = False  # an answer was delivered (keep="primary"); later copies only cost
    primary_end: tuple | None = None  # (outcome, job) of the primary copy, once it ended
    primary_end_s: float = math.nan
    first_result_s: float = math.nan  # when the first answer came in


class Simulation:
    """One run. Build, then `run()`; results are columnar frames."""

    def __init__(
        self,
        scenario: Scenario,
        policy,
        inputs: Inputs,
        *,
        seed: int,
        cache_dir: str | None = None,
        progress: Callable[[float], None] | None = None,
    ):
        self.sc = scenario
        self.policy = policy
        self.inp = inputs
        self.wl = inputs.workload
        self.seed = seed
        self.progress = progress
        self.env = _LeanEnvironment()
        self.env.on_arrival = self._on_arrival
        self.env.on_complete = self._on_complete
        rngs = subsystem_rngs(seed)
        all_specs = scenario.all_llms()
        self.cluster = Cluster(all_specs, self.wl, [s.name for s in scenario.llms])
        self.names = [s.name for s in all_specs]
        n = inputs.arrival_s.size
        if n > 1 and not (np.diff(inputs.arrival_s) >= 0).all():
            # The environment takes arrivals in this order: the clock would go back.
            raise RouteSimError("arrival times must be sorted (as prepare_inputs makes them)",
                                field="inputs.arrival_s")
        self.n = n
        self.rec = RequestRecorder(n, self.names, self.wl.task_names)
        self.timeline = GrowingColumns(
            ["t_s", "llm", "queue_len", "busy", "capacity", "up_replicas", "completed",
             "load_rejected"]
        )
        self.events = GrowingColumns(["t_s", "kind", "llm", "detail"])
        self._fb_heap: list[tuple[float, int, Feedback]] = []
        self._seq = 0
        self._next = 0
        self._topk: dict[int, _TopK] = {}
        # Escalated requests: the answer in hand (quality, job, the judged Answer).
        self._answered: dict[int, tuple[float, Job, Answer]] = {}
        self._event_times = frozenset(e.at_s for e in scenario.events)
        self._in_system = 0
        self._done_count = [0] * len(all_specs)
        # Fan-outs whose kept answer was picked by its realised quality (keep="best_realised",
        # two answers or more): any makes the run an upper bound, which no real router reaches.
        self.realised_picks = 0
        self._last_sample_s = -1.0
        # Per deployment, jobs it rejected for load (full queue, rate limit) after warm-up and
        # before the end of arrivals. Counted per job, not per request: a fan-out copy or an
        # escalation it turned away is load too, even if the request completed elsewhere.
        self._load_rejected = [0] * len(all_specs)
        self._wants_answers = _overrides(policy, "on_answer")
        self._wants_feedback = _overrides(policy, "feedback")
        ref = scenario.llm(scenario.workload.reference_llm)
        self._ref = ref
        self._judge = scenario.judge.info()
        # Policy setup: public query attributes + training ground truth only.
        ctx = build_policy_context(
            self.wl,
            scenario.llms,
            reference_llm=ref.name,
            rng=rngs["policy"],
            patience_mean_s=scenario.users.patience_s.mean if scenario.users.patience_s else None,
            cache_dir=cache_dir,
            with_ground_truth=bool(getattr(policy, "uses_ground_truth", False)),
            train=training_set(self.wl, scenario.workload.split),
            judge=self._judge,
        )
        policy.setup(ctx)
        # Hot-path locals.
        c = self.rec.cols
        self._c_arr = inputs.arrival_s
        self._rows = inputs.rows
        self._in_tok = self.wl.input_tokens
        self._task = self.wl.task
        self._out_tok = self.wl.output_tokens
        self._patience = inputs.users.patience_s
        # Python lists for the per-event scalar reads (numpy scalar indexing is ~5x slower).
        self._rows_l = inputs.rows.tolist()
        self._in_tok_l = self.wl.input_tokens.tolist()
        # Scalar reads and writes through memoryviews of the same memory: half the cost of
        # numpy's scalar indexing (the columns stay numpy arrays for everything else).
        self._cols_mv = {name: memoryview(arr) for name, arr in c.items()}
        self._quality_mv = memoryview(np.ascontiguousarray(self.wl.quality))
        self._out_tok_mv = memoryview(np.ascontiguousarray(self.wl.output_tokens))
        # Per-request counters as Python lists (hot path); copied into the columns at the end.
        self._wait = [0.0] * n
        self._attempts = [0] * n
        self._arr_l = inputs.arrival_s.tolist()
        self._patience_l = inputs.users.patience_s.tolist()
        self._task_l = self.wl.task.tolist()
        self._gives_feedback_l = inputs.users.gives_feedback.tolist()
        c["arrival_s"][:] = inputs.arrival_s
        c["row"][:] = inputs.rows
        c["task"][:] = self.wl.task[inputs.rows]
        c["input_tokens"][:] = self.wl.input_tokens[inputs.rows]
        ref_col = self.wl.models.index(ref.model_name)
        c["ref_quality"][:] = self.wl.quality[inputs.rows, ref_col]
        p_in, p_out = reference_prices_at(scenario, inputs.arrival_s)
        c["ref_cost_usd"][:] = (
            c["input_tokens"] * p_in + self.wl.output_tokens[inputs.rows, ref_col] * p_out
        ) / 1e6

    # ------------------------------------------------------------------------- run loop
    def run(self) -> RunResult:
        env = self.env
        sc = self.sc
        for i, ev in enumerate(sorted(sc.events, key=lambda e: e.at_s)):
            t = env.timeout(ev.at_s, value=(i, ev))
            t.callbacks.append(self._on_event)
        if self.n:
            env.next_arrival_s = float(self._c_arr[0])
        env.process(self._sampler())
        horizon = math.inf if sc.run.drain_s is None else sc.duration_s + sc.run.drain_s
        with _young_objects_collected_less_often():
            if horizon == math.inf:
                env.run(until=self._drained())
            else:
                env.run(until=horizon)
        self._expire_all(env.now)
        # A last sample, so the cumulative columns (completed, load_rejected) end complete
        # (unless the sampler has just taken one at this time).
        if self._last_sample_s != env.now:
            self._sample(env.now)
        return self._result(env.now)

    def _drained(self):
        done = self.env.event()

        def check():
            while True:
                yield self.env.timeout(self.sc.run.sample_every_s)
                if self._next >= self.n and self._in_system == 0 and not self._topk:
                    done.succeed()
                    return

        self.env.process(check())
        return done

    def _hook(self, method: str, arg) -> None:
        """Call a cluster-change hook; they are optional for policies not built on
        BasePolicy (which has harmless defaults)."""
        fn = getattr(self.policy, method, None)
        if fn is not None:
            self.cluster.sync_view()
            fn(arg)

    def _sample(self, now: float, only=None) -> None:
        if only is None:
            self._last_sample_s = now
        for d in (only,) if only is not None else self.cluster.present:
            self.timeline.append(
                now,
                d.name,
                d.n_queued,
                d.busy,
                d.up_replicas * d.spec.slots,
                d.up_replicas,
                self._done_count[d.idx],
                self._load_rejected[d.idx],
            )

    def _sampler(self):
        env = self.env
        step = self.sc.run.sample_every_s
        while True:
            now = env.now
            self._expire_all(now)
            self._sample(now)
            if self.progress is not None:
                self.progress(now)
            yield env.timeout(step)

    # ------------------------------------------------------------------------- arrivals
    def _on_arrival(self) -> None:
        rid = self._next
        self._next += 1
        self._in_system += 1
        now = self.env.now
        if now >= self.cluster.next_deadline or (self._fb_heap and self._fb_heap[0][0] <= now):
            self._observe(now)
        self._offer(rid, 0, now)
        if self._next < self.n:
            # The arrival's own time: a delay from now (now + (t - now)) can round one ulp
            # past it, and past a later arrival at the same time (the clock went back).
            self.env.next_arrival_s = self._arr_l[self._next]

    def _query(self, rid: int, attempt: int) -> Query:
        row = self._rows_l[rid]
        return Query(
            rid, row, self._arr_l[rid], self._in_tok_l[row], self._task_l[row], attempt
        )

    def _observe(self, now: float) -> None:
        """Bring lazily evaluated state up to `now` before the policy looks at anything.
        Expiry first: an abandoned escalation finishes its request with the answer in hand,
        at its deadline, and that answer's feedback may already be due."""
        self._expire_all(now)
        if self._fb_heap and self._fb_heap[0][0] <= now:
            self._deliver_feedback(now)

    def _offer(self, rid: int, attempt: int, now: float, rnd: int = 0) -> None:
        """Ask the policy and submit its decision's job(s); `rnd` is the routing round that
        keys their noise (see `Inputs`), `attempt` the LLM calls made so far.

        A request with an answer in hand (its escalation failed in an outage or was queued
        at a removed deployment) is not routed from scratch, which would call and pay for
        the earlier rungs again: the policy's `on_answer` decides again on the answer it
        already judged, and without a new decision that answer is delivered."""
        if attempt:
            self._observe(now)
        self.cluster.sync_view()
        view = self.cluster.view
        view.now = now
        row = self._rows_l[rid]
        q = Query(rid, row, self._arr_l[rid], self._in_tok_l[row], self._task_l[row], attempt)
        held = self._answered.get(rid)
        if held is None:
            dec: Decision = self.policy.route(q, view)
        else:
            dec = self.policy.on_answer(q, held[2], view)
            if dec is None:
                self._finish(rid, COMPLETED, now, held[1], held[0])
                return
        self._submit_decision(rid, dec, now, rnd, record=attempt == 0)

    def _submit_decision(self, rid: int, dec: Decision, now: float, rnd: int,
                         *, record: bool = False) -> None:
        """Check a decision (from `route` or `on_answer`) and submit its job(s): a decision
        with `extra` LLMs is a fan-out round, kept by its `keep` rule, as offline."""
        view = self.cluster.view
        if dec.keep not in KEEP_RULES:
            raise RouteSimError(
                f"policy {getattr(self.policy, 'name', '?')!r} returned keep={dec.keep!r}; "
                f"allowed: {', '.join(map(repr, KEEP_RULES))}",
                field="decision.keep",
            )
        if dec.scores is not None and len(dec.scores) != len(view.names):
            raise RouteSimError(
                f"policy {getattr(self.policy, 'name', '?')!r} returned {len(dec.scores)} "
                f"scores for {len(view.names)} candidates; one per ClusterView.names entry",
                field="decision.scores",
            )
        if record:
            self._record_decision(rid, dec, view)
        if dec.extra:
            self._topk[rid] = _TopK(1 + len(dec.extra), dec.keep, [], {})
            self._submit(rid, dec.llm, now, rnd, 0)
            for k, name in enumerate(dec.extra, 1):
                self._submit(rid, name, now, rnd, k)
        else:
            self._submit(rid, dec.llm, now, rnd, 0, dec.final)

    def _record_decision(self, rid: int, dec: Decision, view) -> None:
        scores, terms = dec.scores, dec.terms
        if scores is None and not terms:
            return
        cand = self.cluster.view_codes
        # Every deployment of the run a candidate, in order: a whole-row write, the cheapest.
        at = rid if self.cluster.view_is_all else (rid, cand)
        mats = self.rec.terms
        if scores is not None:
            mat = mats.get("score")
            if mat is None:  # first use allocates the column block
                self.rec.decision_terms(rid, cand, "score", scores)
            else:
                mat[at] = scores
            vi = view._index.get(dec.llm)
            if vi is not None:
                try:
                    self._cols_mv["score"][rid] = scores[vi]
                except (TypeError, ValueError):
                    raise RouteSimError(
                        f"policy {getattr(self.policy, 'name', '?')!r} returned the score "
                        f"{scores[vi]!r} for {dec.llm!r}; scores must be numbers",
                        field="decision.scores",
                    ) from None
        if terms:
            for term, vals in terms.items():
                mat = mats.get(term)
                if mat is None:
                    self.rec.decision_terms(rid, cand, term, vals)
                else:
                    mat[at] = vals

    def _submit(self, rid: int, name: str, now: float, rnd: int, answer: int,
                final: bool = False) -> None:
        d = self.cluster.by_name.get(name)
        if d is None or not d.present:
            present = ", ".join(self.cluster.view.names)
            raise RouteSimError(
                f"policy {getattr(self.policy, 'name', '?')!r} chose {name!r}, which is not in "
                f"the cluster at t={now:.3f}s; choose one of: {present}",
                field="decision.llm",
            )
        self._attempts[rid] += 1
        # Patience is spent only while queued: a re-offered request keeps what is left.
        # (A fan-out's copies add their waits to the round, not to _wait, until it ends.)
        left = self._patience_l[rid] - self._wait[rid]
        job = Job(rid, d, now, now + max(0.0, left), answer == 0)
        if rnd or answer:
            job.round = rnd
            job.answer = answer
        if final:
            job.final = True
        if d.n_up == 0 or (d.spec.rate_limit_per_s is not None and not d.take_rate_token(now)):
            job.state = DONE
            if d.n_up == 0:
                job.reject_reason = REJECT_DOWN
            else:
                job.reject_reason = REJECT_RATE_LIMITED
                self._count_load_rejection(d, now)
            self._job_ended(job, REJECTED, now)
            return
        r = d.free_replica() if d.n_queued == 0 else -1
        if r >= 0:
            self._start(job, r, now)
        elif d.n_queued >= d.spec.max_queue:
            job.state = DONE
            job.reject_reason = REJECT_QUEUE_FULL
            self._count_load_rejection(d, now)
            self._job_ended(job, REJECTED, now)
        else:
            self._seq += 1
            self.cluster.enqueue(job, self._seq)

    def _start(self, job: Job, r: int, now: float) -> None:
        d = job.dep
        spec = d.spec
        rid = job.rid
        job.replica = r
        job.state = RUNNING
        job.start_s = now
        if self._topk:
            self._add_wait(job, now - job.enq_s)
        else:  # no fan-out in flight: the wait is the request's own
            self._wait[rid] += now - job.enq_s
        row = self._rows_l[rid]
        out = self._out_tok_mv[row, d.col]
        inp = self._in_tok_l[row]
        if spec.service is None:
            k = d.active[r] + 1  # sequences on the replica including this one
            ttft = spec.first_token_s + inp / spec.prefill_tps
            work = ttft + out * (1.0 + spec.batching_slowdown * (k - 1)) / spec.decode_tps
            # The first token's time is fixed at the speed in force now (a slowdown that
            # starts or ends later re-times the rest of the job, not its first token).
            ttft *= d.speed_factor
        else:
            work = self._override_service(job)
            ttft = work * d.speed_factor
        svc = work * d.speed_factor
        job.work_left, job.seg_start, job.seg_factor = work, now, d.speed_factor
        job.service_s = svc
        job.ttft_s = ttft
        job.cost_usd = (inp * job.price_in + out * job.price_out) / 1e6
        self.cluster.set_active(d, r, +1)
        d.running[r].add(job)
        self.env.complete_in(svc, job)

    def _count_load_rejection(self, d, now: float) -> None:
        if self.sc.warmup_s <= now < self.sc.duration_s:
            self._load_rejected[d.idx] += 1

    def _override_service(self, job: Job) -> float:
        o = job.dep.spec.service
        if o.kind == "deterministic":
            return o.mean_s
        if o.kind == "exponential":
            return o.mean_s * self.inp.service_exp1(job.rid, job.round, job.answer)
        z = self.inp.service_norm(job.rid, job.round, job.answer)
        s2 = math.log1p(o.cv**2)
        return math.exp(math.log(o.mean_s) - s2 / 2 + math.sqrt(s2) * z)

    # ----------------------------------------------------------------------- completion
    def _on_complete(self, job: Job, token: int) -> None:
        if job.state != RUNNING or job.token != token:
            return  # failed in an outage after this completion was scheduled
        now = self.env.now
        d = job.dep
        r = job.replica
        job.state = DONE
        d.running[r].discard(job)
        self.cluster.job_done(d, r, job.service_s)
        self._done_count[d.idx] += 1
        if now in self._event_times:
            # A scenario event at this very time (an outage, a removal) comes after this
            # completion: the freed slot is filled after it, not by a job it would then fail.
            later = _At(self.env, 0.0, PRIORITY_DISPATCH, d)
            later.callbacks.append(self._on_deferred_dispatch)
        else:
            self._dispatch(d, now)
        self._job_ended(job, COMPLETED, now)

    def _on_deferred_dispatch(self, ev) -> None:
        d = ev.value
        if d.present:
            self._dispatch(d, self.env.now)

    def _dispatch(self, d: Deployment, now: float) -> None:
        """Fill free slots of up replicas from the FCFS queue (skipping abandoned jobs)."""
        q = d.queue
        slots = d.n_up * d.spec.slots  # down replicas run nothing: busy < slots is a free one
        while q and d.busy < slots:
            r = d.free_replica()
            if r < 0:
                return
            job = q.popleft()
            if job.state != QUEUED:
                continue
            self.cluster.leave_queue(job)
            if job.deadline <= now:
                job.state = CANCELLED
                self._add_wait(job, job.deadline - job.enq_s)
                self._job_ended(job, ABANDONED, job.deadline)
                continue
            self._start(job, r, now)

    def _expire_all(self, now: float) -> None:
        cl = self.cluster
        if now < cl.next_deadline:
            return
        for d in cl.present:
            h = d.qheap
            while h and h[0][0] <= now:
                deadline, _, job = heapq.heappop(h)
                if job.state == QUEUED:
                    job.state = CANCELLED
                    cl.leave_queue(job)
                    self._add_wait(job, deadline - job.enq_s)
                    self._job_ended(job, ABANDONED, deadline)
        # After the loop: an abandonment above may have queued a retry anywhere.
        cl.next_deadline = min((d.qheap[0][0] for d in cl.present if d.qheap), default=math.inf)

    def _job_ended(self, job: Job, outcome: int, t: float) -> None:
        """Route a job's end to its request: finish it, retry, escalate or wait (top-k)."""
        rid = job.rid
        cols = self._cols_mv
        if outcome == COMPLETED:
            cols["cost_usd"][rid] += job.cost_usd
        else:
            job.service_s = float("nan")
        tk = self._topk.get(rid)
        if tk is not None:
            self._topk_job_ended(tk, job, outcome, t)
            return
        if outcome == COMPLETED:
            qual = self._quality_mv[self._rows_l[rid], job.dep.col]
            if self._wants_answers and not job.final:
                nxt, ans = self._ask_escalation(job, qual, t)
                if nxt is not None:
                    # Keep the answer in hand: if the escalation never completes, the user
                    # still gets this one (it was paid for).
                    self._answered[rid] = (qual, job, ans)
                    self._submit_decision(rid, nxt, t, job.round + 1)
                    return
            self._answered.pop(rid, None)
            self._finish(rid, COMPLETED, t, job, qual)
        elif outcome == FAILED and cols["retries"][rid] < self.sc.run.max_retries:
            cols["retries"][rid] += 1
            self._offer(rid, self._attempts[rid], t, job.round + 1)
        elif rid in self._answered:
            qual, kept, _ = self._answered.pop(rid)
            self._finish(rid, COMPLETED, t, kept, qual)
        else:
            self._finish(rid, outcome, t, job)

    def _topk_job_ended(self, tk: _TopK, job: Job, outcome: int, t: float) -> None:
        """One copy of a fan-out request ended. With keep="primary" the request finishes
        when the primary answer arrives or, if the primary is lost (rejected, failed, given
        up), when it is lost and another copy has answered, with the first other answer;
        later copies only add cost. With "best_judged" or "best_realised" it waits for
        every copy."""
        rid = job.rid
        tk.end_s = max(tk.end_s, t)
        tk.served |= not math.isnan(job.start_s)
        if outcome == COMPLETED:
            tk.results.append((self._quality_mv[self._rows_l[rid], job.dep.col], job))
            if not tk.results[1:]:
                tk.first_result_s = t
            if job.primary and tk.keep == "primary" and not tk.finished:
                tk.finished = True
                self._finish(rid, COMPLETED, t, job, tk.results[-1][0],
                             wait=job.start_s - job.enq_s)
        elif outcome == FAILED:
            tk.failed = True
            if tk.pending > 1 and t < job.deadline < math.inf:
                # The round's other copies share this deadline; if they are still queued
                # then, the retry must be offered at it, not when the lazy expiry notices.
                delay = job.deadline - t
                while t + delay < job.deadline:  # the clock must not land a float short of it
                    delay = math.nextafter(delay, math.inf)
                wake = self.env.timeout(delay)
                wake.callbacks.append(self._wake)
        elif outcome == ABANDONED and (tk.abandoned is None or job.primary):
            # The copies share one deadline, so they give up together: the request is
            # recorded as abandoned at the deployment the policy chose first.
            tk.abandoned = (t, job)
        if job.primary:
            tk.primary_end = (outcome, job)
            tk.primary_end_s = t
        tk.pending -= 1
        if (tk.keep == "primary" and not tk.finished and tk.results
                and tk.primary_end is not None):
            # The primary is lost and another copy has answered: the user gets that answer
            # as soon as both are known, not when the slowest copy ends. (An abandonment is
            # noticed lazily, so its time can precede the answer's.)
            tk.finished = True
            qual, kept = tk.results[0]
            # The user waited for the primary (until it was lost) and for the answer kept;
            # other copies, used or not, do not count.
            self._wait[rid] += max(tk.waits.get(0, 0.0), tk.waits.get(kept.answer, 0.0))
            self._finish(rid, COMPLETED, max(tk.primary_end_s, tk.first_result_s), kept, qual)
        if tk.pending or tk.finished:
            if not tk.pending:
                del self._topk[rid]
            return
        del self._topk[rid]
        if tk.results:
            # keep="primary" finished above (its primary answered, or was lost with an answer
            # in). Ties go to the earlier answer of the decision (the primary first), not to
            # whichever copy happened to finish first.
            if tk.keep == "best_realised":
                qual, kept = max(tk.results, key=lambda p: (p[0], -p[1].answer))
                if len(tk.results) > 1:
                    self.realised_picks += 1
            else:
                qual, kept = max(
                    tk.results, key=lambda p: (self._judge_score(p[1], p[0]), -p[1].answer)
                )
                if len(tk.results) > 1:  # one answer left is kept unjudged
                    self.rec.cols["cost_usd"][rid] += sum(
                        self._judge_cost(j) for _, j in tk.results
                    )
            # The user waited for every copy: the round's wait is its longest queueing.
            self._wait[rid] += max(tk.waits.values(), default=0.0)
            self._finish(rid, COMPLETED, tk.end_s, kept, qual)
            return
        self._wait[rid] += max(tk.waits.values(), default=0.0)  # copies queued at once
        cols = self.rec.cols
        answered = self._answered.pop(rid, None)  # an earlier answer in hand (escalations)
        if tk.abandoned is not None and not tk.served:
            # The user gave up waiting before any copy was served (the round's copies share
            # one deadline), so nothing is retried; noticed lazily, the end is recorded when
            # it happened.
            t_gone, gone = tk.abandoned
            if answered is not None:
                self._finish(rid, COMPLETED, t_gone, answered[1], answered[0])
            else:
                self._finish(rid, ABANDONED, t_gone, gone)
        elif tk.failed and cols["retries"][rid] < self.sc.run.max_retries:
            if answered is not None:
                self._answered[rid] = answered
            cols["retries"][rid] += 1
            self._offer(rid, self._attempts[rid], self.env.now, job.round + 1)
        elif answered is not None:
            self._finish(rid, COMPLETED, tk.end_s, answered[1], answered[0])
        else:
            # No copy answered: the request ends as its primary copy did (the LLM the policy
            # chose first and, if rejected, why), not as whichever copy ended last.
            outcome, job = tk.primary_end or (outcome, job)
            self._finish(rid, outcome, tk.end_s, job)

    def _wake(self, _ev) -> None:
        self._observe(self.env.now)

    def _add_wait(self, job: Job, dt: float) -> None:
        tk = self._topk.get(job.rid)
        if tk is None:
            self._wait[job.rid] += dt
        else:
            tk.waits[job.answer] = tk.waits.get(job.answer, 0.0) + dt

    def _judge_score(self, job: Job, qual: float) -> float:
        """The judge's score of a job's answer: realised quality plus the judge's noise,
        keyed on the job (so a cascade and a best-judged fan-out see the same verdict)."""
        noise = self.sc.judge.noise
        score = qual + (noise * self.inp.judge_normal(job.rid, job.round, job.answer)
                        if noise else 0.0)
        return min(1.0, max(0.0, score))

    def _judge_cost(self, job: Job) -> float:
        """What judging a job's answer costs: per call plus the tokens the judge reads."""
        row = self._rows_l[job.rid]
        return float(self._judge.answer_cost_usd(self._in_tok_l[row],
                                                 float(self._out_tok[row, job.dep.col])))

    def _ask_escalation(self, job: Job, qual: float, now: float) -> tuple[Decision | None, Answer]:
        self._observe(now)
        self.rec.cols["cost_usd"][job.rid] += self._judge_cost(job)  # the answer is judged
        ans = Answer(job.dep.name, self._judge_score(job, qual), job.cost_usd, now - job.enq_s)
        self.cluster.sync_view()
        view = self.cluster.view
        view.now = now
        attempts = self._attempts[job.rid]
        return self.policy.on_answer(self._query(job.rid, attempts), ans, view), ans

    def _finish(
        self,
        rid: int,
        outcome: int,
        t: float,
        job: Job,
        qual: float = float("nan"),
        wait: float | None = None,
    ) -> None:
        cols = self._cols_mv
        self._in_system -= 1
        self._answered.pop(rid, None)  # an answer in hand is delivered or superseded now
        cols["outcome"][rid] = outcome
        cols["end_s"][rid] = t
        cols["llm"][rid] = job.dep.idx
        if outcome == REJECTED:
            cols["reject_reason"][rid] = job.reject_reason
        arr = self._arr_l[rid]
        if outcome == COMPLETED:
            if wait is not None:  # a fan-out's kept copy; earlier rounds' waits are in already
                self._wait[rid] += wait
            cols["start_s"][rid] = job.start_s
            cols["service_s"][rid] = job.service_s
            cols["ttft_s"][rid] = job.start_s + job.ttft_s - arr
            cols["latency_s"][rid] = t - arr
            cols["quality"][rid] = qual
            cols["output_tokens"][rid] = self._out_tok_mv[self._rows_l[rid], job.dep.col]
            if self._gives_feedback_l[rid]:
                users = self.inp.users
                reward = users.reward(rid, qual)
                due = t + float(users.delay_s[rid])
                refined = users.spec.mode == "refined"
                cols["feedback"][rid] = round(100 * reward) if refined else int(reward)
                cols["feedback_s"][rid] = due
                if self._wants_feedback:
                    self._seq += 1
                    fb = Feedback(rid, int(self._rows_l[rid]), job.dep.name, reward, due, refined)
                    heapq.heappush(self._fb_heap, (due, self._seq, fb))

    def _deliver_feedback(self, now: float) -> None:
        h = self._fb_heap
        while h and h[0][0] <= now:
            _, _, fb = heapq.heappop(h)
            self.policy.feedback(fb)

    # --------------------------------------------------------------------------- events
    def _on_event(self, ev) -> None:
        i, e = ev.value
        now = self.env.now
        self._observe(now)
        act = e.action
        cl = self.cluster
        if act == "add_llm":
            spec = e.add_llm
            d = cl.by_name[spec.name]
            d.present = True
            cl.rebuild_view(now)
            self._hook(
                "on_llm_added", LLMInfo(spec.name, spec.model_name, d.col, d.price_in, d.price_out)
            )
            self.events.append(now, act, spec.name, f"replicas={spec.replicas}")
        elif act == "remove_llm":
            d = cl.by_name[e.remove_llm]
            # Its last timeline row: the samples cover present deployments only, and its
            # counts (load rejections) since the last tick would be lost.
            self._sample(now, only=d)
            d.present = False
            queued = [j for j in d.queue if j.state == QUEUED]
            d.queue.clear()
            d.qheap.clear()
            d.n_queued = 0
            cl.rebuild_view(now)
            self._hook("on_llm_removed", d.name)
            self.events.append(now, act, d.name, f"requeued={len(queued)}")
            for job in queued:
                job.state = CANCELLED
                self._add_wait(job, now - job.enq_s)
                if job.rid in self._topk:  # a fan-out copy is dropped, not re-offered
                    job.reject_reason = REJECT_REMOVED
                    self._job_ended(job, REJECTED, now)
                else:  # same round: the job never ran, so its noise is still unused
                    self._offer(job.rid, self._attempts[job.rid], now, job.round)
        elif act == "outage":
            o = e.outage
            d = cl.by_name[o.llm]
            n_down = min(o.replicas or d.spec.replicas, d.spec.replicas)
            # Up replicas fail first; overlapping outages stack on already-down ones, and a
            # replica is back only when every outage that hit it has ended.
            order = sorted(range(d.spec.replicas), key=lambda r: (d.down[r], -r))
            downed = order[:n_down]
            failed: list[Job] = []
            for r in downed:
                d.down[r] += 1
                if d.up[r]:
                    d.up[r] = False
                    d.n_up -= 1
                    failed.extend(sorted(d.running[r], key=lambda j: j.rid))
                    d.running[r] = set()
                    cl.set_active(d, r, -d.active[r])
            cl.refresh_capacity(d)
            self.events.append(now, act, d.name, f"replicas_down={d.spec.replicas - d.n_up}")
            back = self.env.timeout(o.duration_s, value=(d, downed))
            back.callbacks.append(self._on_recover)
            for job in failed:
                job.state = DONE
                job.token += 1
                self._job_ended(job, FAILED, now)
        elif act == "price_change":
            p = e.price_change
            d = cl.by_name[p.llm]
            if p.price_in_per_mtok is not None:
                d.price_in = p.price_in_per_mtok
            if p.price_out_per_mtok is not None:
                d.price_out = p.price_out_per_mtok
            cl.refresh_prices(d)
            # Validation only accepts a price change for a deployment present at its time;
            # the guard keeps an absent one (unknown to the policy) out of its hooks anyway.
            if d.present:
                self._hook(
                    "on_price_changed",
                    LLMInfo(d.name, d.spec.model_name, d.col, d.price_in, d.price_out),
                )
            self.events.append(now, act, d.name, f"in={d.price_in} out={d.price_out}")
        elif act == "slowdown":
            s = e.slowdown
            d = cl.by_name[s.llm]
            # Overlapping slowdowns multiply; each one's end removes only its own factor.
            d.slowdowns[i] = s.factor
            self._set_speed(d, math.prod(d.slowdowns.values()), now)
            self.events.append(now, act, d.name, f"factor={d.speed_factor:g}")
            if s.duration_s is not None:
                back = self.env.timeout(s.duration_s, value=(d, i))
                back.callbacks.append(self._on_slowdown_end)
        elif act == "mix_change":
            mix = ",".join(f"{k}:{v}" for k, v in e.mix_change.mix.items())
            self.events.append(now, act, None, mix)

    def _on_recover(self, ev) -> None:
        d, downed = ev.value
        now = self.env.now
        self._observe(now)
        for r in downed:
            d.down[r] -= 1
            d.up[r] = d.down[r] == 0
        d.n_up = sum(d.up)
        self.cluster.refresh_capacity(d)
        self.events.append(now, "recover", d.name, f"replicas_up={d.up_replicas}")
        if d.present:
            self._dispatch(d, now)

    def _on_slowdown_end(self, ev) -> None:
        d, i = ev.value
        d.slowdowns.pop(i, None)
        self._set_speed(d, math.prod(d.slowdowns.values()), self.env.now)
        self.events.append(self.env.now, "slowdown_end", d.name, f"factor={d.speed_factor:g}")

    def _set_speed(self, d, factor: float, now: float) -> None:
        """A slowdown starts or ends: new jobs and the rest of every running job go at the
        new speed. A running job's work done so far is kept and its completion re-timed
        (the old completion entry is voided by the job's token, as in an outage)."""
        if factor == d.speed_factor:
            return
        self.cluster.set_speed_factor(d, factor)
        for r in range(d.spec.replicas):
            for job in sorted(d.running[r], key=lambda j: (j.rid, j.answer)):
                job.work_left = max(0.0, job.work_left - (now - job.seg_start) / job.seg_factor)
                job.seg_start, job.seg_factor = now, factor
                job.service_s = now - job.start_s + job.work_left * factor
                job.token += 1
                self.env.complete_in(job.work_left * factor, job)

    # -------------------------------------------------------------------------- results
    def _result(self, end_s: float) -> RunResult:
        wait = self._wait
        # In flight at the end: the current round's wait so far; a fan-out's copies queue at
        # the same time, so its round counts its longest-waiting copy once.
        waiting: dict[int, float] = {}
        outcome, llm = self.rec.cols["outcome"], self.rec.cols["llm"]
        for d in self.cluster.deployments:
            for job in d.queue:
                if job.state == QUEUED:
                    waiting[job.rid] = max(waiting.get(job.rid, 0.0), end_s - job.enq_s)
            # In flight: where it is queued or served (a fan-out: its primary copy, if that
            # is still out), so route shares count the backlog of a slow deployment too.
            for job in [j for j in d.queue if j.state == QUEUED] + [
                    j for r in d.running for j in r]:
                if outcome[job.rid] == IN_FLIGHT and (llm[job.rid] < 0 or job.primary):
                    llm[job.rid] = d.idx
        for rid, tk in self._topk.items():
            if tk.finished:  # delivered: later copies are not the user's wait
                waiting.pop(rid, None)
            elif tk.waits:
                waiting[rid] = max(waiting.get(rid, 0.0), *tk.waits.values())
        for rid, w in waiting.items():
            wait[rid] += w
        self.rec.cols["wait_s"][:] = wait
        self.rec.cols["attempts"][:] = self._attempts
        requests = self.rec.frame()
        timeline = self.timeline.frame(
            {
                "t_s": pl.Float64,
                "llm": pl.Utf8,
                "queue_len": pl.Int64,
                "busy": pl.Int64,
                "capacity": pl.Int64,
                "up_replicas": pl.Int64,
                "completed": pl.Int64,
                "load_rejected": pl.Int64,
            }
        )
        events = self.events.frame(
            {"t_s": pl.Float64, "kind": pl.Utf8, "llm": pl.Utf8, "detail": pl.Utf8}
        )
        return RunResult(requests, timeline, events, end_s, self.realised_picks)


@dataclass(frozen=True, eq=False)
class RunResult:
    requests: pl.DataFrame
    timeline: pl.DataFrame
    events: pl.DataFrame
    end_s: float
    realised_picks: int = 0  # see Simulation.realised_picks


def _overrides(policy, method: str) -> bool:
    """Whether the policy implements `method` itself (not the harmless base default)."""
    fn = getattr(type(policy), method, None)
    return fn is not None and not getattr(fn, "__qualname__", "").startswith("BasePolicy.")
