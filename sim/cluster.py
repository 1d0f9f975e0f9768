"""LLM deployments: replicas x slots, one FCFS queue each, token-speed service times.

State that policies may observe lives in the arrays of one `ClusterView` (compact over the
deployments currently in the cluster), mutated in place. Queue, busy and service-time
changes only mark their deployment stale; `sync_view` writes the stale entries, and the
engine calls it before every policy call, so a policy always sees the exact state while a
deployment that changes several times between two decisions is written once. The cluster
knows nothing about policies: it starts, queues and finishes jobs.

Batching model: a replica decodes up to `slots` sequences at once; a sequence's decode speed
is decode_tps / (1 + batching_slowdown * (k - 1)), with k the sequences on that replica when
it starts (fixed for its lifetime: an approximation of continuous batching that keeps one
completion per job instead of re-timing every running job on each arrival).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from sim.scenario import LLMSpec
from sim.types import ClusterView, Workload

# Job states
QUEUED, RUNNING, DONE, CANCELLED = 0, 1, 2, 3

# A deadline heap is compacted when it holds more than 2 x queued + this many entries.
HEAP_SLACK = 64


class Job:
    """One LLM call of a request (a request has several with retries, cascades or top-k)."""

    __slots__ = (
        "rid",
        "dep",
        "replica",
        "enq_s",
        "start_s",
        "deadline",
        "state",
        "cost_usd",
        "service_s",
        "ttft_s",
        "primary",
        "token",
        "round",
        "answer",
        "reject_reason",
        "price_in",
        "price_out",
        "work_left",
        "seg_start",
        "seg_factor",
        "final",
    )

    def __init__(self, rid: int, dep: Deployment, enq_s: float, deadline: float, primary: bool):
        self.rid = rid
        self.dep = dep
        self.replica = -1
        self.enq_s = enq_s
        self.start_s = float("nan")
        self.deadline = deadline
        self.state = QUEUED
        self.cost_usd = 0.0
        self.service_s = 0.0
        self.ttft_s = 0.0
        self.primary = primary
        self.token = 0
        # Key of the job's noise (sim.engine.Inputs): the routing round (not Query.attempt,
        # which counts LLM calls) and its place in the decision (0 = primary).
        self.round = 0
        self.answer = 0
        # Service still to do at speed factor 1, from seg_start on, running at seg_factor
        # since then: a slowdown that starts or ends re-times the job from here.
        self.work_left = 0.0
        self.seg_start = float("nan")
        self.seg_factor = 1.0
        self.reject_reason = -1  # a sim.record REJECT_* code once rejected
        self.final = False  # its decision said no escalation follows: the answer is not judged
        # Billed at the list prices in force when the call was routed (the prices the policy
        # decided on; for a request's first call, those of its reference cost), not at
        # service start.
        self.price_in = dep.price_in
        self.price_out = dep.price_out


class Deployment:
    """Mutable state of one LLM deployment."""

    __slots__ = (
        "spec",
        "idx",
        "name",
        "col",
        "up",
        "active",
        "running",
        "queue",
        "qheap",
        "n_queued",
        "speed_factor",
        "price_in",
        "price_out",
        "bucket",
        "bucket_t",
        "present",
        "vi",
        "mean_service_s",
        "busy",
        "down",
        "slowdowns",
        "n_up",
        "stale",
    )

    def __init__(self, spec: LLMSpec, idx: int, col: int, mean_service_s: float):
        self.spec = spec
        self.idx = idx  # index among every deployment of the run (recorded `llm` codes)
        self.name = spec.name
        self.col = col  # workload model column
        self.up = [True] * spec.replicas
        self.down = [0] * spec.replicas  # outages in force per replica (they can overlap)
        self.n_up = spec.replicas
        self.slowdowns: dict[int, float] = {}  # event index -> factor, while in force
        self.active = [0] * spec.replicas
        self.running: list[set[Job]] = [set() for _ in range(spec.replicas)]
        self.queue: deque[Job] = deque()
        self.qheap: list[tuple[float, int, Job]] = []  # (deadline, seq, job) lazy abandonment
        self.n_queued = 0
        self.speed_factor = 1.0  # service-time multiplier (slowdown events)
        self.price_in = spec.price_in_per_mtok
        self.price_out = spec.price_out_per_mtok
        # Token bucket: a burst of max(1, rate) so limits below 1/s still admit requests.
        self.bucket = max(1.0, spec.rate_limit_per_s or 0.0)
        self.bucket_t = 0.0
        self.present = False
        self.vi = -1  # index in the current ClusterView
        self.mean_service_s = mean_service_s
        self.busy = 0  # sum of active
        self.stale = False  # its ClusterView entries lag its state (see Cluster.sync_view)

    @property
    def up_replicas(self) -> int:
        return self.n_up

    def free_replica(self) -> int:
        """The up replica with the fewest running sequences and a free slot, or -1."""
        best_k = self.spec.slots
        if self.busy >= self.n_up * best_k:  # full (down replicas run nothing)
            return -1
        best = -1
        for r, k in enumerate(self.active):
            if k < best_k and self.up[r]:
                best, best_k = r, k
        return best

    def take_rate_token(self, now: float) -> bool:
        rate = self.spec.rate_limit_per_s
        if rate is None:
            return True
        self.bucket = min(max(1.0, rate), self.bucket + (now - self.bucket_t) * rate)
        self.bucket_t = now
        if self.bucket >= 1.0:
            self.bucket -= 1.0
            return True
        return False


def expected_service_s(spec: LLMSpec, mean_in: float, mean_out: float) -> float:
    """Service time of an average request on an idle replica (initial wait estimates)."""
    if spec.service is not None:
        return spec.service.mean_s
    return spec.first_token_s + mean_in / spec.prefill_tps + mean_out / spec.decode_tps


class Cluster:
    """All deployments of one run and the `ClusterView` over the present ones."""

    def __init__(self, specs: Sequence[LLMSpec], workload: Workload, initial: Sequence[str]):
        mean_in = float(workload.input_tokens.mean()) if workload.n else 0.0
        self.deployments: list[Deployment] = []
        for i, spec in enumerate(specs):
            col = workload.models.index(spec.model_name)
            mean_out = float(workload.output_tokens[:, col].mean()) if workload.n else 0.0
            self.deployments.append(
                Deployment(spec, i, col, expected_service_s(spec, mean_in, mean_out))
            )
        self.by_name = {d.name: d for d in self.deployments}
        for name in initial:
            self.by_name[name].present = True
        self.present: list[Deployment] = []
        self.view: ClusterView
        self._stale: list[Deployment] = []
        # No queued job's deadline is earlier (a lower bound: entries of jobs that left the
        # queue count until they are popped), so an expiry check before it does nothing.
        self.next_deadline = float("inf")
        self.rebuild_view(now=0.0)

    def rebuild_view(self, now: float) -> None:
        """Recreate the compact view after a membership change (rare)."""
        self.present = [d for d in self.deployments if d.present]
        for d in self._stale:  # the new view is built from the state itself
            d.stale = False
        self._stale.clear()
        for i, d in enumerate(self.present):
            d.vi = i
        for d in self.deployments:
            if not d.present:
                d.vi = -1
        ps = self.present
        codes = [d.idx for d in ps]
        # Candidates are every deployment of the run, in order (decision rows written whole).
        self.view_is_all = codes == list(range(len(self.deployments)))
        self.view_codes: np.ndarray | slice = (
            slice(0, len(codes)) if codes == list(range(len(codes)))
            else np.array(codes, dtype=np.int64)
        )
        self.view = ClusterView(
            names=tuple(d.name for d in ps),
            models=tuple(d.spec.model_name for d in ps),
            model_cols=np.array([d.col for d in ps], dtype=np.int64),
            price_in_per_mtok=np.array([d.price_in for d in ps], dtype=float),
            price_out_per_mtok=np.array([d.price_out for d in ps], dtype=float),
            up=np.array([d.up_replicas > 0 for d in ps], dtype=bool),
            capacity=np.array([d.up_replicas * d.spec.slots for d in ps], dtype=np.int64),
            busy=np.array([sum(d.active) for d in ps], dtype=np.int64),
            queue_len=np.array([d.n_queued for d in ps], dtype=np.int64),
            max_queue=np.array([d.spec.max_queue for d in ps], dtype=np.int64),
            mean_service_s=np.array([d.mean_service_s for d in ps], dtype=float),
            prefill_tps=np.array([d.spec.prefill_tps for d in ps], dtype=float),
            decode_tps=np.array([d.spec.decode_tps for d in ps], dtype=float),
            speed_factor=np.array([d.speed_factor for d in ps], dtype=float),
            now=now,
        )
        v = self.view
        # The entries sync_view writes, as memoryviews of the view's arrays: half the cost
        # of numpy's scalar writes.
        self._view_mv = tuple(
            memoryview(a) for a in (v.queue_len, v.busy, v.mean_service_s, v.est_wait_s,
                                    v.load, v.accepting)
        )

    def refresh_capacity(self, d: Deployment) -> None:
        if d.vi >= 0:
            self.view.up[d.vi] = d.up_replicas > 0
            self.view.capacity[d.vi] = d.up_replicas * d.spec.slots
            self._refresh(d)

    def _mark(self, d: Deployment) -> None:
        if not d.stale and d.vi >= 0:
            d.stale = True
            self._stale.append(d)

    def sync_view(self) -> None:
        """Write the view entries of every deployment whose state changed since the last
        call (queue length, busy slots, service-time estimate and the derived entries)."""
        if self._stale:
            queue_len, busy, mean_service_s = self._view_mv[:3]
            for d in self._stale:
                d.stale = False
                i = d.vi
                queue_len[i] = d.n_queued
                busy[i] = d.busy
                mean_service_s[i] = d.mean_service_s
                self._refresh(d)
            self._stale.clear()

    def _refresh(self, d: Deployment) -> None:
        """The view's derived entries for d, from Python-side state (no numpy reads)."""
        _, _, _, est_wait_s, load, accepting = self._view_mv
        i = d.vi
        ups = d.n_up
        if ups:
            cap = ups * d.spec.slots
            ahead = d.n_queued + d.busy - cap + 1
            est_wait_s[i] = ahead * d.mean_service_s / cap if ahead > 0 else 0.0
            load[i] = (d.busy + d.n_queued) / cap
            accepting[i] = d.busy < cap or d.n_queued < d.spec.max_queue
        else:
            est_wait_s[i] = math.inf
            load[i] = math.inf
            accepting[i] = False

    def set_speed_factor(self, d: Deployment, factor: float) -> None:
        """A slowdown starts or ends: the view shows it at once, and the service-time
        estimate is rescaled instead of waiting for slow jobs to finish."""
        if d.speed_factor > 0:
            d.mean_service_s *= factor / d.speed_factor
        d.speed_factor = factor
        if d.vi >= 0:
            self.view.speed_factor[d.vi] = factor
            self.view.mean_service_s[d.vi] = d.mean_service_s
            self._refresh(d)

    def refresh_prices(self, d: Deployment) -> None:
        if d.vi >= 0:
            self.view.price_in_per_mtok[d.vi] = d.price_in
            self.view.price_out_per_mtok[d.vi] = d.price_out

    # ------------------------------------------------------------------------- queueing
    def enqueue(self, job: Job, seq: int) -> None:
        d = job.dep
        d.queue.append(job)
        d.n_queued += 1
        if not d.stale:
            self._mark(d)
        if job.deadline != float("inf"):
            h = d.qheap
            if len(h) > 2 * d.n_queued + HEAP_SLACK:
                # Started and abandoned jobs leave their entries behind (skipped when popped
                # at their deadline); dropping them keeps the heap near the queue's size.
                # (deadline, seq) orders entries totally, so the pops come out as before.
                h[:] = [e for e in h if e[2].state == QUEUED]
                heapq.heapify(h)
            heapq.heappush(h, (job.deadline, seq, job))
            if job.deadline < self.next_deadline:
                self.next_deadline = job.deadline

    def leave_queue(self, job: Job) -> None:
        """Bookkeeping for a job that leaves the queue (started, abandoned or re-offered)."""
        d = job.dep
        d.n_queued -= 1
        if not d.stale:
            self._mark(d)

    def set_active(self, d: Deployment, replica: int, delta: int) -> None:
        d.active[replica] += delta
        d.busy += delta
        if not d.stale:
            self._mark(d)

    def job_done(self, d: Deployment, replica: int, service_s: float) -> None:
        """A job on `replica` finished after `service_s`: its slot is free, and d's running
        service-time estimate, an EWMA over completed jobs, moves (a router learns a
        duration only once it has elapsed)."""
        d.active[replica] -= 1
        d.busy -= 1
        d.mean_service_s += 0.02 * (service_s - d.mean_service_s)
        if not d.stale:
            self._mark(d)
