"""Core data types shared by the engine, the policies and the reports.

Everything a policy may see is here: `Query` (no ground truth), `ClusterView` (read-only
state of the deployments), `PolicyContext` (what a policy gets once, before the run) and the
data it answers with (`Decision`). Ground truth lives in `Workload` and reaches a policy only
through `PolicyContext.ground_truth`, which the engine fills only for policies that declare
`uses_ground_truth = True` (the oracle, an upper bound). A decision can also lean on ground
truth by keeping a fan-out's best realised answer (`Decision.keep`); runs that do are labelled
upper bounds too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

SPLIT_TRAIN = 0
SPLIT_TEST = 1
SPLIT_VALID = 2
SPLIT_NAMES = {"train": SPLIT_TRAIN, "test": SPLIT_TEST, "validation": SPLIT_VALID}


@dataclass(frozen=True, eq=False)
class Workload:
    """A pool of queries with hidden per-model ground truth, all columnar.

    Row i is one distinct query. Columns of `quality` / `output_tokens` follow `models`
    (workload model names; a scenario LLM refers to one through `LLMSpec.model`).
    `features` is the embedding (or embedding stand-in) policies learn from; it is computed
    for every row before the run so no encoder runs per request.
    """

    name: str
    models: tuple[str, ...]
    features: np.ndarray  # (n, d) float32, L2-normalised rows
    task: np.ndarray  # (n,) int16 index into task_names (public: eval_name / task family)
    task_names: tuple[str, ...]
    input_tokens: np.ndarray  # (n,) int32
    quality: np.ndarray  # (n, m) float32 in [0, 1]; ground truth, hidden from policies
    output_tokens: np.ndarray  # (n, m) float32; ground truth, hidden from policies
    split: np.ndarray  # (n,) int8: SPLIT_TRAIN / SPLIT_TEST / SPLIT_VALID
    texts: tuple[str, ...] | None = None  # prompt texts when the workload has them

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(model) from None

    def rows(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.split == split)


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Ground truth of the training and validation rows only: what a learned router may fit
    and tune on. Fit on `rows[~valid_mask]`, choose knobs on `rows[valid_mask]`; test rows
    are never here."""

    rows: np.ndarray  # (n_train,) indices into the workload
    models: tuple[str, ...]
    quality: np.ndarray  # (n_train, m)
    output_tokens: np.ndarray  # (n_train, m)
    valid_mask: np.ndarray  # (n_train,) bool: True for validation rows

    def column(self, model: str) -> int:
        return self.models.index(model)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Per-row truth for every model: given only to upper-bound policies (oracle)."""

    models: tuple[str, ...]
    quality: np.ndarray  # (n, m)
    output_tokens: np.ndarray  # (n, m)


@dataclass(frozen=True)
class JudgeInfo:
    """The answer scorer a policy will meet (the scenario's `judge`): its noise sd and what
    judging one answer costs. A deployment knows its scorer's calibration and price."""

    noise: float = 0.5
    cost_usd: float = 0.0  # per judged answer
    price_in_per_mtok: float = 0.0  # per million tokens read: the query and the answer

    def answer_cost_usd(self, input_tokens, output_tokens):
        """What judging one answer costs (scalars or numpy arrays)."""
        return self.cost_usd + (input_tokens + output_tokens) * (self.price_in_per_mtok / 1e6)


@dataclass(frozen=True, eq=False)
class LLMInfo:
    """What a policy knows about one deployment: its name, model and list prices."""

    name: str
    model: str
    model_col: int  # column of `model` in the workload (features/predictions are per model)
    price_in_per_mtok: float
    price_out_per_mtok: float


@dataclass(frozen=True, eq=False)
class PolicyContext:
    """Handed once to `Policy.setup` before the run.

    `features`, `task` and `input_tokens` cover every workload row (they are public query
    attributes); `train` holds ground truth for training rows only.
    """

    llms: tuple[LLMInfo, ...]
    workload_models: tuple[str, ...]
    features: np.ndarray
    task: np.ndarray
    task_names: tuple[str, ...]
    input_tokens: np.ndarray
    train: TrainingSet
    texts: tuple[str, ...] | None
    reference_llm: str
    patience_mean_s: float | None  # users' mean tolerable wait, if the scenario has one
    rng: np.random.Generator
    cache_dir: str | None = None
    ground_truth: GroundTruth | None = None
    judge: JudgeInfo = JudgeInfo()


@dataclass(slots=True)
class Query:
    """One request as a policy sees it: no ground truth, only public attributes."""

    id: int  # request id (unique per run)
    row: int  # workload row: index into PolicyContext.features and precomputed predictions
    arrival_s: float
    input_tokens: int
    task: int
    attempt: int = 0  # 0 for the first offer; >0 when re-offered after failure or removal


# How a fan-out's answer is kept (Decision.keep).
KEEP_RULES = ("primary", "best_judged", "best_realised")


@dataclass(slots=True)
class Decision:
    """A policy's answer for one query, as data.

    `llm` is the chosen deployment name. `scores`, when given, is one score per
    `ClusterView.names` entry (recorded as `score__<llm>`); `terms` maps a term name (e.g.
    "quality_pred", "cost_pred_usd": units in the name) to per-candidate arrays aligned the
    same way (recorded as `<term>__<llm>`). `extra` sends the same query also to these deployments
    (top-k); `keep` (one of KEEP_RULES) says which answer the user receives: "primary" (the
    `llm` answer), "best_judged" (the answer the scenario's judge scores highest: realised
    quality plus the judge's noise, the scorer cascades use; a rule a real router can run)
    or "best_realised" (the best of all answers, which no router knows before judging: a run
    that used it is an upper bound, labelled so in reports). `final=True` says the policy
    will not escalate after this call's answer (a cascade's last rung): the answer is
    delivered as it is, neither judged (nor billed for the judge) nor shown to `on_answer`.
    """

    llm: str
    scores: np.ndarray | None = None
    terms: Mapping[str, np.ndarray] | None = None
    extra: tuple[str, ...] = ()
    keep: str = "primary"
    final: bool = False


@dataclass(slots=True)
class Answer:
    """What the router learns when an attempt completes (for cascades).

    `judge_score` is a noisy scorer's view of the answer's quality in [0, 1] (FrugalGPT's
    answer scorer): the realised quality plus the scenario's `judge.noise`, clipped.
    """

    llm: str
    judge_score: float
    cost_usd: float
    latency_s: float


@dataclass(slots=True)
class Feedback:
    """One user's reaction, delivered to `Policy.feedback` after its delay."""

    query_id: int
    row: int
    llm: str
    reward: float  # binary: 0.0 / 1.0; refined: continuous in [0, 1]
    time_s: float
    refined: bool = False


@dataclass(eq=False)
class ClusterView:
    """Read-only, cheap view of the deployments at decision time.

    Arrays are aligned with `names` (deployments currently in the cluster, including ones in
    an outage). The engine brings every array up to date in place before each policy call
    (writing only the entries of deployments whose state changed), so a decision reads them
    for free. They are exact only during a policy call: policies must not keep reading them
    later, nor write to them.

    - `est_wait_s`: expected queueing delay for a request sent now: the work ahead of it
      (queued plus busy beyond capacity, plus itself) times the mean service time, spread
      over the up capacity; inf when the deployment is down.
    - `load`: (busy + queued) / capacity, a tie-breaker when waits are all zero.
    - `accepting`: up and a free slot or room in the queue (a request sent now would not
      be rejected, rate limits aside).
    """

    names: tuple[str, ...]
    models: tuple[str, ...]
    model_cols: np.ndarray  # int: workload column per deployment
    price_in_per_mtok: np.ndarray
    price_out_per_mtok: np.ndarray
    up: np.ndarray  # bool: at least one replica up (routable)
    capacity: np.ndarray  # int: up replicas x slots
    busy: np.ndarray  # int: sequences in service
    queue_len: np.ndarray  # int: requests waiting
    max_queue: np.ndarray  # int
    mean_service_s: np.ndarray  # float: running estimate of service time
    now: float = 0.0
    prefill_tps: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    decode_tps: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    # service-time multiplier in force (slowdown events; 1.0 = nominal speed)
    speed_factor: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    est_wait_s: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    load: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    accepting: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {n: i for i, n in enumerate(self.names)}
        n = len(self.names)
        if self.prefill_tps is None:
            self.prefill_tps = np.full(n, np.nan)
        if self.decode_tps is None:
            self.decode_tps = np.full(n, np.nan)
        if self.speed_factor is None:
            self.speed_factor = np.ones(n)
        self.est_wait_s = np.zeros(n)
        self.load = np.zeros(n)
        self.accepting = np.zeros(n, dtype=bool)
        for i in range(n):
            self.refresh(i)

    def index(self, name: str) -> int:
        return self._index[name]

    def refresh(self, i: int) -> None:
        """Recompute the derived entries of deployment i from the view's own arrays (the
        engine writes them from its state instead: `sim.cluster.Cluster.sync_view`)."""
        cap = int(self.capacity[i])
        q = int(self.queue_len[i])
        b = int(self.busy[i])
        up = bool(self.up[i])
        if up:
            ahead = q + b - cap + 1
            self.est_wait_s[i] = (ahead * float(self.mean_service_s[i]) / cap) if ahead > 0 \
                else 0.0
            self.load[i] = (b + q) / cap
        else:
            self.est_wait_s[i] = np.inf
            self.load[i] = np.inf
        self.accepting[i] = up and (b < cap or q < int(self.max_queue[i]))
