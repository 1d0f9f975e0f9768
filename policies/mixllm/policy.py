"""The `mixllm` policy: MixLLM (Wang et al., NAACL 2025, arXiv 2502.18482) as one router.

Parts, each switchable for ablation through params:

- query embeddings: the workload's features, or tag-enhanced ones (`tags`, needs prompt
  texts and torch; `policies.mixllm.encoder`);
- per-LLM quality and length predictors (`predictor`: random forest, MLP or kNN), fitted on
  the training rows before the run, predictions for every row made in batch
  (`policies.mixllm.predictors`);
- the meta decision score with the LinUCB uncertainty bonus (`uncertainty`) and the
  latency penalty (`penalty`) (`policies.mixllm.decision`);
- online learning from user feedback (`online`), in batches: a critic, either the
  neighbours posterior of each LLM's quality (`policies.mixllm.neighbours`, the default) or
  the feedback network's ridge posterior of the offline prediction's error, or both
  (`online_critic_kind`), and with `online_pg` > 0 the feedback network's policy-gradient
  actor (`policies.mixllm.online`);
- LLM addition (warm-start predictors, high initial uncertainty) and removal, without
  retraining the other LLMs;
- top-k: send the query to the k best-scored LLMs (`top_k`); the user keeps the primary
  (best-scored) answer, with `keep: best_judged` the answer the scenario's judge scores
  highest (a noisy scorer a real deployment can run), or with `keep: best_realised` the best
  realised answer, which no real router can know: an upper bound, labelled so in reports.
  The cost recorded is the sum over the k answers (and, best-judged, the judge's price of
  each, which the predicted cost of an answer then includes).

Decision time is a handful of O(#LLMs) numpy operations on precomputed rows; the LinUCB
matrices and the feedback network are updated every `update_every` items.

Default knobs were chosen on RouterBench's training rows only (the test split never):

- kNN predictors (random forests and MLPs were no better in cross-validation and cost
  minutes of setup), same-task neighbours first (`task_weight` 2), and k chosen in `setup`
  by 5-fold cross-validated Brier score over the fit rows (`predictors.choose_knn_k`; 200 on
  RouterBench).
- lambda_ = 8: `python benchmarks/bench_mixllm.py --part tune` (5-fold CV over the
  train+validation rows, uncongested, feedback on 30% of answers as in
  scenarios/routerbench_steady.yaml) picks the lambda with the best CV quality whose CV cost
  is within 24% of gpt-4's, a point under the 25% target. lambda is not the paper's 1.4
  because the cost term here is in units of one reference-LLM query (see
  `decision.cost_scale`), not normalised per query.
- The latency penalty keeps the paper's pseudocode values (beta 0.1, gamma 0.1, xi 0.8,
  tau 30 s), as does alpha 0.01.
- Online learning is off by default (on RouterBench it gains in AIQ, and at the default
  point's cost only a little, below). When on, the critic is the neighbours
  posterior (prior worth the kNN's k answers, neighbourhoods of 200 workload rows), each
  reward also imputes the LLMs not chosen (`online_impute`, each imputed answer worth one
  observed answer), and the policy gradient's weight is 0.
  `bench_mixllm.py --part online [--workload synthetic]` fits offline on a share of the
  training rows, streams the rest with binary feedback on every answer, then scores the
  test split; online minus offline-only at the same cost (the offline hull at the online
  point's cost), mean (standard error) over random subsets (30 for the issue's 30% rows,
  10 for the others). "200 + imputed" is the default; "k + imputed" the same with
  neighbourhoods of the kNN's k rows; the other columns were measured with neighbourhoods
  of k rows and without imputation (syn.: synthetic; RB: RouterBench; * the issue's
  protocol):

  | fitted offline | 200 + imputed | k + imputed | nbrs | ridge | both | ceiling (AIQ) |
  |---|---|---|---|---|---|---|
  | syn. 5% | +1.49 (.29) | +0.91 (.26) | +1.26 (.23) | +1.52 (.35) | +2.04 (.48) | +5.17 (.43) |
  | syn. 10% | +1.03 (.24) | +0.64 (.17) | +0.84 (.13) | +0.38 (.23) | +0.65 (.27) | +3.30 (.14) |
  | syn. 30% * | +0.76 (.14) | +0.42 (.07) | +0.49 (.08) | -0.06 (.11) | +0.18 (.10) | +1.37 (.11) |
  | RB 5% | +1.05 (.50) | +0.45 (.21) | +0.58 (.40) | +1.87 (.55) | +2.17 (.49) | +3.66 (.51) |
  | RB 10% | +0.34 (.28) | -0.16 (.28) | -0.27 (.20) | +0.48 (.27) | +0.33 (.32) | +1.54 (.26) |
  | RB 30% * | +0.24 (.11) | +0.02 (.08) | -0.13 (.10) | +0.02 (.15) | -0.09 (.15) | +0.72 (.14) |

  RB 30% over 60 subsets (seeds 30-59 added as a replication): +0.12 (.07), and over 120
  (seeds 60-119 run once more, +0.14 (.07) alone): +0.13 (.05); against k + imputed,
  paired over 60, +0.22 (.06). The full-information refit gains +0.80 (.06) at the online
  point's cost there (120 subsets), and +1.57 (.11) at synthetic 30%: the default gets
  about 15% of what any learner from the RouterBench stream could, and about half on the
  synthetic one.

  The neighbourhood of 200 rows was chosen on held-out training rows (`--holdout-share
  0.2`, 30% fitted; paired at equal cost): against k rows, +0.15 +- 0.08 on RouterBench
  (60 subsets) and +0.15 +- 0.13 on the synthetic workload (30); against twice k rows,
  +0.07 +- 0.05 and +0.00 +- 0.15; 300 and 400 rows were no better on RouterBench. Around
  twice k, a prior worth 2k or k/2 answers and an answer correlation over 2k fit rows were
  worse on both workloads. On a workload much smaller or larger than these (3,150 and 6,000
  rows), set `online_neighbours`.

  The ceiling refits offline with every model's answer to the streamed queries (full
  information, which bandit feedback never gives). Bandit feedback shows the chosen LLM's
  answer only: an offline refit on exactly those answers loses AIQ 0.54 +- 0.18 on
  RouterBench at 30%, and one on a uniformly random LLM's answer per query gains +0.06 +-
  0.12 (`--part bandit`). Imputation recovers part of what the others' answers are worth: on
  RouterBench at 30%, with neighbourhoods of k rows, it lifts the online policy's AIQ 5-50%
  from +0.01 +- 0.10 to +0.25 +- 0.08 over offline-only (paired against the same critic
  without it: +0.24 +- 0.05 AIQ, +0.15 +- 0.07 at equal cost). Imputed answers worth one
  observed answer each were chosen over answers worth the squared correlation of the two
  LLMs' answers near the query (`online_impute_worth: r2`) on held-out training rows
  (`--holdout-share 0.2`, 30 subsets, paired against no imputation: AIQ +0.13 +- 0.07 and
  +0.20 +- 0.11 at equal cost, against +0.06 +- 0.03 and +0.07 +- 0.07 for r2). With little
  offline data, r2 dilutes the real answers less (synthetic 5%: +1.16 +- 0.21). The
  neighbours critic is the default because it is the one that gains under the issue's
  protocol on the synthetic workload; the ridge critic pools evidence per task and along the
  context globally, so it wins with very little offline data and under a shift to tasks
  absent from training (scenarios/domain_shift.yaml, 5 seeds, paired against online off,
  mean [95% CI]: the default critic +0.7 [-0.3, +1.8] quality points at 3.4 [0.6, 6.2]
  points less cost (with neighbourhoods of k rows, +0.5 [-0.1, +1.1] at 1.1 [-0.8, 3.0]
  less); ridge +0.3 [-0.9, +1.5] at 5.2 [2.8, 7.5] less; both, without imputation, +0.3
  [-0.7, +1.4] at 5.1 [1.8, 8.4] less). Imputation skips queries of task families absent
  from the fit rows: their nearest fit rows are of other families (imputing them anyway
  moved domain_shift's online cost to 1.5 [0.1, 2.9] points more). The actor (online_pg 1)
  hurt at RouterBench 30% (AIQ -1.41 +- 0.50; at 5% +2.33 +- 0.54 at equal cost).

- top_k 1, keep primary. `bench_mixllm.py --part topk` (RouterBench test split, frontier
  hull quality at 25% of gpt-4's cost): k=1 97.2%; k=2 keeping the primary 94.4% (only more
  cost), the best-judged 100.7% (the scenario judge, free here; sd 0.4 over judge seeds), the
  best realised 102.4% (upper bound); k=3 93.5 / 102.6 / 105.0%. With a judge priced like a
  gpt-3.5 call per answer (judge.cost_usd), top-2 cannot get down to 25%; at 50%: 101.4%
  against 99.0% for one answer.

benchmarks/bench_mixllm.py prints the CV tuning, the frontier, the online-learning
comparison, the ablations and top-k.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from policies.base import PARAMS_CONFIG, BasePolicy
from policies.mixllm.decision import (
    MAX_PENALTY_EXPONENT,
    LinUCBBank,
    cost_scale,
    cost_weight,
    quality_weight,
)
from policies.mixllm.neighbours import AnswerCorrelation, NeighbourPosterior, nearest_rows
from policies.mixllm.online import FeedbackScoreNet, OnlineConfig
from policies.mixllm.predictors import (
    KNN_K_GRID,
    PredictorConfig,
    choose_knn_k,
    fit_model_predictor,
    query_design,
)
from policies.registry import register
from sim.errors import PolicyError, RouteSimError
from sim.scenario import EncoderSpec
from sim.types import ClusterView, Decision, Feedback, LLMInfo, PolicyContext, Query

try:  # the C function behind np.count_nonzero: its Python wrapper costs 6x the count
    from numpy._core.multiarray import count_nonzero as _count_nonzero
except ImportError:  # numpy < 2
    _count_nonzero = np.count_nonzero


class MixLLMParams(BaseModel):
    """Knobs of the mixllm policy (unknown keys are errors)."""

    model_config = PARAMS_CONFIG

    # meta decision score
    lambda_: float = Field(default=8.0, gt=0, description="quality vs cost trade-off")
    alpha: float = Field(default=0.01, ge=0, description="weight of the uncertainty bonus")
    beta: float = Field(default=0.1, ge=0, description="scale of the latency penalty")
    gamma: float = Field(default=0.1, ge=0, description="growth rate of the latency penalty")
    xi: float = Field(default=0.8, ge=0, description="share of tau at which the penalty is beta")
    tau_s: float = Field(default=30.0, gt=0, description="users' tolerable wait, seconds")
    # switches (ablations)
    tags: bool = False
    uncertainty: bool = True
    penalty: bool = True
    admission: bool = Field(
        default=True,
        description="skip deployments that would reject the request (down or queue full); "
        "off: only down ones are skipped, the score alone decides (as in the paper) and a "
        "full queue rejects",
    )
    online: bool = False  # see the module docstring: on RouterBench at 30%, AIQ only
    # predictors
    predictor: Literal["random_forest", "mlp", "knn"] = "knn"
    n_estimators: int = Field(default=100, ge=1)
    min_samples_leaf: int = Field(default=5, ge=1)
    knn_k: int | None = Field(
        default=None, ge=1, description="kNN neighbours; None: chosen by 5-fold CV Brier"
    )
    mlp_hidden: int = Field(default=64, ge=1)
    task_weight: float = Field(
        default=2.0, ge=0, description="scale of the task one-hot input (> 1.42: kNN "
        "takes same-task neighbours first)"
    )
    fit_on: Literal["train", "train_and_validation"] = "train_and_validation"
    # tag-enhanced encoder
    encoder: EncoderSpec = EncoderSpec()
    tag_epochs: int | None = Field(default=None, ge=1)
    # uncertainty / online learning
    context_dim: int = Field(default=16, ge=1, le=256, description="PCA dims of x")
    update_every: int = Field(default=128, ge=1, description="batch size of online updates")
    online_lr: float = Field(default=0.01, gt=0)
    online_temperature: float = Field(default=0.03, gt=0)
    online_heads: int = Field(default=8, ge=2)
    online_eps: float = Field(default=0.01, gt=0)
    online_prior_n: float | None = Field(
        default=None, gt=0, description="observations the offline prediction is worth; "
        "None: the kNN's k (the answers each prediction averages), 100 for other predictors"
    )
    online_critic: float = Field(
        default=1.0, ge=0, description="0 turns the critic off; scales the ridge critic's updates"
    )
    online_critic_kind: Literal["neighbours", "ridge", "both"] = Field(
        default="neighbours", description="neighbours: posterior of each LLM's quality over "
        "a query's nearest workload rows (policies.mixllm.neighbours); ridge: a linear "
        "correction on the low-dimensional context (policies.mixllm.online); both: the "
        "ridge-corrected prediction is the neighbours posterior's prior"
    )
    online_neighbours: int = Field(
        default=200, ge=1, description="workload rows in a query's neighbourhood for the "
        "neighbours critic (all of them on a workload of fewer rows)"
    )
    online_impute: bool = Field(
        default=True, description="the neighbours critic also learns, from each reward, "
        "the expected answers of the LLMs not chosen (policies.mixllm.neighbours."
        "AnswerCorrelation, over the nearest k fit rows: the kNN's k, 100 for other "
        "predictors)"
    )
    online_impute_worth: Literal["r2", "one"] = Field(
        default="one", description="what an imputed answer counts as: r2, the squared "
        "correlation of the two LLMs' answers near the query (an uncorrelated LLM's "
        "estimate is left alone); one, a whole observed answer"
    )
    online_context_prior: float = Field(
        default=10.0, ge=1, description="the ridge critic's prior is this many times stronger on "
        "the embedding context than on the task one-hot"
    )
    online_pg: float = Field(
        default=0.0, ge=0, description="weight of the policy gradient (actor); see the docstring"
    )
    # LLM changes
    warm_start_n: int = Field(default=50, ge=0, description="training rows for a new LLM")
    new_llm_explore: float = Field(
        default=25.0, ge=1, description="a new LLM starts with A = I / this (more uncertain)"
    )
    # top-k
    top_k: int = Field(default=1, ge=1)
    keep: Literal["primary", "best_judged", "best_realised"] = "primary"


# Fitted predictions shared between policy instances of one process (benchmarks and sweeps
# set up many configurations on the same data): key -> (quality, length) for all rows.
_PREDICTION_CACHE: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_CACHE_ENTRIES = 256
_KNN_K_CACHE: dict[str, int] = {}
# Largest table of per-row context products the uncertainty bonus may precompute (bytes);
# beyond it (many rows, large context_dim) the bonus is computed from the context directly.
_QUAD_TABLE_BYTES = 64 * 2**20


def _quadratic_table(u: np.ndarray) -> tuple[np.ndarray | None, tuple | None]:
    """Per row, the upper triangle of u u^T with off-diagonal entries doubled, so that
    x^T M x = M[triu] @ table[row] for any symmetric M (one product per decision instead of
    two); (None, None) when the table would exceed _QUAD_TABLE_BYTES."""
    n, d = u.shape
    tri = np.triu_indices(d)
    if n * len(tri[0]) * 8 > _QUAD_TABLE_BYTES:
        return None, None
    table = u[:, tri[0]] * u[:, tri[1]]
    table[:, tri[0] != tri[1]] *= 2.0
    return table, tri


def _digest(*arrays: np.ndarray, extra: str = "") -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()


_TAGS_NEED_TEXTS = (
    "tags: true needs query texts, and this workload has none (a synthetic workload carries "
    "features only); set tags: false or use a data file with prompts"
)


@register
class MixLLMPolicy(BasePolicy):
    """MixLLM: predicted quality and cost, LinUCB bonus, latency penalty, online learning."""

    name: ClassVar[str] = "mixllm"
    Params: ClassVar[type[BaseModel]] = MixLLMParams
    needs_training_rows: ClassVar[bool] = True
    # The knob `reports.frontier` sweeps for the quality/cost frontier.
    tradeoff_param: ClassVar[str] = "lambda_"
    tradeoff_grid: ClassVar[tuple[float, ...]] = (
        0.01, 0.03, 0.1, 0.2, 0.3, 0.6, 1.0, 1.4, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0,
        10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 70.0, 100.0, 300.0,
    )

    @classmethod
    def workload_conflict(cls, params: BaseModel, *, has_texts: bool) -> tuple[str, str] | None:
        if params.tags and not has_texts:
            return "tags", _TAGS_NEED_TEXTS
        return None

    # ------------------------------------------------------------------------------ setup
    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        p: MixLLMParams = self.params
        self._lambda = p.lambda_
        self._qw = quality_weight(p.lambda_)
        self._cw = cost_weight(p.lambda_)
        self._use_unc = p.uncertainty and p.alpha > 0
        self._use_pen = p.penalty and p.beta > 0
        self._admission = p.admission
        self._online = p.online
        self._beta = p.beta
        self._top_k = p.top_k
        self._keep = p.keep
        self._update_every = p.update_every
        # beta * exp(gamma * (w - xi * tau)) = beta * exp(gamma * w - gamma * xi * tau)
        self._gamma = p.gamma
        self._pen_shift = p.gamma * p.xi * p.tau_s
        self._pen0 = p.beta * float(np.exp(-self._pen_shift))
        # A wait beyond this cap already gives pen0 * e^(MAX_PENALTY_EXPONENT); capping it
        # keeps exp() from overflowing.
        cap = MAX_PENALTY_EXPONENT + self._pen_shift
        # gamma 0: the penalty is the constant beta whatever the wait; a cap of 0 keeps an
        # infinite wait (a down deployment) from making 0 * inf = NaN.
        self._wait_cap = cap / p.gamma if p.gamma > 0 else 0.0
        self._seed = int(ctx.rng.integers(2**31 - 1))
        self._rng = np.random.default_rng(ctx.rng.integers(2**63 - 1))
        self._net_seed = int(ctx.rng.integers(2**63 - 1))

        train = ctx.train
        fit_mask = np.ones(len(train.rows), dtype=bool)
        if p.fit_on == "train":
            fit_mask = ~train.valid_mask
        fit_idx = np.flatnonzero(fit_mask)
        if len(fit_idx) == 0:
            raise PolicyError(
                "mixllm needs training rows with ground truth to fit its predictors; the "
                "workload has none (fit_on=" + repr(p.fit_on) + "; the rows arrivals sample "
                "from, workload.split, are never training rows)",
                field="workload.split" if len(train.rows) == 0 else "mixllm.params.fit_on",
            )
        self._fit_idx = fit_idx  # indices into ctx.train arrays
        self._fit_rows = train.rows[fit_idx]  # workload rows

        features = self._query_features(ctx, train.rows[~train.valid_mask])
        n_tasks = len(ctx.task_names)
        self._x = query_design(features, ctx.task, n_tasks, p.task_weight)
        self.knn_k = p.knn_k
        cols = sorted({x.model_col for x in ctx.llms})
        if p.predictor == "knn" and p.knn_k is None and cols:
            self.knn_k = self._cv_knn_k(self._x[self._fit_rows], train.quality[fit_idx][:, cols])
        self._pred_cfg = PredictorConfig(
            kind=p.predictor,
            n_estimators=p.n_estimators,
            min_samples_leaf=p.min_samples_leaf,
            knn_k=self.knn_k or 100,
            mlp_hidden=p.mlp_hidden,
            seed=self._seed,
        )
        self._x_digest = _digest(self._x)

        n, m = len(ctx.features), len(ctx.workload_models)
        self.q_hat = np.full((n, m), np.nan, dtype=np.float64)
        self.len_hat = np.full((n, m), np.nan, dtype=np.float64)
        self._fitted: set[int] = set()
        self._in_tok = ctx.input_tokens.astype(np.float64)
        for col in sorted({x.model_col for x in ctx.llms}):
            self._fit_column(col, fit_idx)

        self._cost_unit: float | None = None  # set with the first LLM
        self._cost_mult = 1e-6
        self._unit_is_ref = False
        self._set_cost_unit(list(ctx.llms))

        # Low-dimensional context for LinUCB and the feedback network: PCA of the inputs
        # (fitted on the fit rows) plus a constant, unit-normalised; then the task one-hot.
        self._u = _pca_context(self._x, self._fit_rows, p.context_dim)
        self._u2, self._tri = _quadratic_table(self._u) if self._use_unc else (None, None)
        onehot = np.zeros((n, n_tasks))
        onehot[np.arange(n), ctx.task.astype(np.int64)] = 1.0
        self._z = np.hstack([self._u, onehot])

        self._llms0 = tuple(ctx.llms)
        # kNN: each prediction averages k answers; other predictors: a nominal 100.
        self._online_prior_n = p.online_prior_n or float(self.knn_k or 100)
        # Critic priors of model columns fitted after setup (LLMs added with few rows).
        self._col_prior: dict[int, float] = {}
        self._priced: dict[str, LLMInfo] = {}  # deployments whose prices changed
        self._nbr_lists = None
        if p.online and p.online_critic > 0 and p.online_critic_kind != "ridge":
            self._nbr_lists = _neighbour_lists(self._x, p.online_neighbours)
        self._correlation: AnswerCorrelation | None = None
        self._corr_cols = np.asarray(cols, dtype=np.int64)  # the columns it covers
        if self._nbr_lists is not None and p.online_impute and cols:
            self._correlation = _answer_correlation(
                self._x, self._fit_rows, train.quality[fit_idx][:, cols], self.knn_k or 100)
            # A query whose nearest fit rows are mostly of other task families (one of a
            # family the fit rows lack, or barely have): their answers say nothing known
            # about how LLMs agree on it.
            own = ctx.task[self._fit_rows][self._correlation.neighbours] == ctx.task[:, None]
            self._corr_rows = own.mean(axis=1) >= 0.5
        self._reset_online()

    def _set_cost_unit(self, llms: list[LLMInfo]) -> None:
        """Fix the cost unit: the reference LLM's mean predicted cost per query over the fit
        rows (the unit of the cost % metric), or, until the reference is known, the highest
        predicted cost among `llms` (rows' maximum, averaged). A unit set without the
        reference is provisional: the reference replaces it when it joins, once; after that
        the unit never changes (a price change keeps it, so lambda keeps its meaning)."""
        if self._unit_is_ref or not llms:
            return
        ref = [x for x in llms if x.name == self.ctx.reference_llm]
        if not ref and self._cost_unit is not None:
            return
        chosen = ref or llms
        cols = np.array([x.model_col for x in chosen])
        pin = np.array([x.price_in_per_mtok for x in chosen])
        pout = np.array([x.price_out_per_mtok for x in chosen])
        rows = self._fit_rows
        costs = (self._in_tok[rows, None] * pin + self.len_hat[rows][:, cols] * pout) / 1e6
        self._cost_unit = cost_scale(costs)
        self._cost_mult = 1e-6 / self._cost_unit
        self._unit_is_ref = bool(ref)
        self._names = None  # the bound cost arrays are in the old unit

    def _cv_knn_k(self, x: np.ndarray, quality: np.ndarray) -> int:
        """k by 5-fold CV Brier on the fit rows, folds fixed (k is a property of the data, not
        of the run seed); cached, as sweeps set up many policies."""
        key = _digest(x, quality, extra="knn_k|" + str(KNN_K_GRID))
        hit = _KNN_K_CACHE.get(key)
        if hit is None:
            hit = _KNN_K_CACHE[key] = choose_knn_k(x, quality)[0]
        return hit

    def _reset_online(self) -> None:
        """LinUCB matrices, the feedback network and the feedback queue as after setup
        (the initial LLMs only; predictors are kept)."""
        p: MixLLMParams = self.params
        ctx = self.ctx
        self._bank = LinUCBBank(self._u, capacity=max(4, 2 * len(self._llms0)))
        self._slot: dict[str, int] = {}
        self._info: dict[str, LLMInfo] = {}
        for llm in self._llms0:
            self._slot[llm.name] = self._bank.add_slot(1.0)
            # At the prices in force (a price change outlives a reset of what was learned).
            self._info[llm.name] = self._priced.get(llm.name, llm)
        self._net = FeedbackScoreNet(
            len(ctx.workload_models),
            self._z.shape[1],
            OnlineConfig(
                n_heads=p.online_heads,
                lr=p.online_lr,
                temperature=p.online_temperature,
                eps=p.online_eps,
                prior_n=self._online_prior_n,
                prior_scale=(p.online_context_prior,) * self._u.shape[1]
                + (1.0,) * (self._z.shape[1] - self._u.shape[1]),
                critic_weight=p.online_critic if p.online_critic_kind != "neighbours" else 0.0,
                pg_weight=p.online_pg,
            ),
            np.random.default_rng(self._net_seed),
            z_norm_max=float(np.sqrt(2.0)),  # |u| = 1 plus a one-hot
        )
        for col, prior in self._col_prior.items():
            self._net.set_prior(col, prior)
        self._net_version = -1
        # The network only corrects scores when one of its parts learns; without it a
        # decision skips the correction entirely.
        self._net_on = self._online and (
            p.online_pg > 0 or (p.online_critic > 0 and p.online_critic_kind != "neighbours")
        )
        # Quality estimates the decisions use: the offline predictions, moved by the
        # neighbours critic as feedback arrives.
        self._q_live = self.q_hat.copy()
        self._posterior = None
        if self._nbr_lists is not None:
            self._posterior = NeighbourPosterior(self._nbr_lists, self.q_hat.shape[1])
        # "both": the ridge corrects the offline prediction, and the corrected prediction is
        # the prior of the neighbours posterior, so the correction enters each estimate with
        # the prior's weight prior_n / (prior_n + answers seen near the query): it fades
        # where local evidence takes over instead of counting that evidence twice.
        self._both = self._net_on and self._posterior is not None
        self._fb_rows: list[int] = []
        self._fb_names: list[str] = []
        self._fb_rewards: list[float] = []
        self._view: ClusterView | None = None
        self._names: tuple[str, ...] | None = None
        self._ainv_version = -1

    # ------------------------------------------------------------------ frontier sweeps
    @property
    def tradeoff_value(self) -> float:
        """The lambda in use (the frontier marks it as this policy's default point)."""
        return self._lambda

    def set_tradeoff(self, value: float, *, reset: bool = True) -> None:
        """Use lambda = `value` from now on. With `reset` (what frontier sweeps want: every
        point starts alike) the online state (LinUCB matrices, feedback network) restarts as
        after setup; without it, what was learned is kept."""
        if not value > 0:
            raise PolicyError(f"lambda_ must be > 0, got {value!r}", field="mixllm.params.lambda_")
        self._lambda = float(value)
        self._qw = quality_weight(self._lambda)
        self._cw = cost_weight(self._lambda)
        if reset:
            self._reset_online()
        else:
            self._names = None  # rebind: the static scores depend on lambda

    def refit_columns(self, fit_idx_by_column: Mapping[int, np.ndarray]) -> None:
        """Refit the predictors of some workload model columns, each on its own training
        rows (indices into `ctx.train`), as if only those answers had been logged: e.g. the
        answers a router's own choices revealed. The kNN's k and the cost unit stay as set
        up (so lambda keeps its meaning); the online state restarts."""
        n = len(self.ctx.train.rows)
        for col, idx in fit_idx_by_column.items():
            idx = np.asarray(idx, dtype=np.int64)
            if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
                raise PolicyError(
                    f"model column {col}: {idx.size} row(s), each must index one of the "
                    f"{n} training rows", field="mixllm.refit_columns")
            self._fit_column(int(col), np.sort(idx))
        # Its tables hold every fit row's answers, which these columns now must not know.
        if set(fit_idx_by_column) & set(self._corr_cols.tolist()):
            self._correlation = None
        self._reset_online()

    def _query_features(self, ctx: PolicyContext, train_rows: np.ndarray) -> np.ndarray:
        p: MixLLMParams = self.params
        if not p.tags:
            return ctx.features
        if ctx.texts is None:
            # Tags are learned from query texts; silently running without them would make a
            # tags-on ablation identical to tags-off.
            raise PolicyError(_TAGS_NEED_TEXTS, field="mixllm.params.tags")
        from policies.mixllm.encoder import tag_enhanced_embeddings

        eval_names = [ctx.task_names[t] for t in ctx.task]
        kwargs = {} if p.tag_epochs is None else {"epochs": p.tag_epochs}
        try:
            return tag_enhanced_embeddings(
                list(ctx.texts),
                eval_names,
                encoder=p.encoder,
                train_rows=train_rows,
                seed=self._seed,
                cache_dir=ctx.cache_dir,
                **kwargs,
            )
        except RouteSimError as exc:
            if not (exc.field or "").startswith("workload.encoder"):
                raise
            # The tag encoder is this policy's own `encoder` param, not the workload's: the
            # shared message would send the user to the wrong setting.
            fixed = exc.message.replace("workload.encoder", "mixllm.params.encoder")
            raise PolicyError(
                f"tags: true fine-tunes a text encoder, which failed: {fixed}; or set tags: "
                f"false", field=(exc.field or "").replace("workload.", "mixllm.params.", 1),
            ) from None

    def _fit_column(self, col: int, fit_idx: np.ndarray, *, prior: tuple | None = None) -> None:
        """Fit (or fetch from the cache) the predictors of workload column `col`."""
        ctx = self.ctx
        rows = ctx.train.rows[fit_idx]
        y_q = ctx.train.quality[fit_idx, col]
        y_len = ctx.train.output_tokens[fit_idx, col]
        pq, plen = prior if prior is not None else (0.5, 100.0)
        key = _digest(
            rows, y_q, y_len, extra=f"{self._x_digest}|{self._pred_cfg}|{col}|{pq}|{plen}"
        )
        hit = _PREDICTION_CACHE.get(key)
        if hit is None:
            pred = fit_model_predictor(
                ctx.workload_models[col], self._x[rows], y_q, y_len, self._pred_cfg,
                seed=self._seed + col, prior_quality=pq, prior_length=plen,
            )
            hit = pred.predict(self._x)
            _PREDICTION_CACHE[key] = hit
            while len(_PREDICTION_CACHE) > _CACHE_ENTRIES:
                _PREDICTION_CACHE.popitem(last=False)
        else:
            _PREDICTION_CACHE.move_to_end(key)
        self.q_hat[:, col] = hit[0]
        self.len_hat[:, col] = hit[1]
        self._fitted.add(col)

    # ----------------------------------------------------------------------------- route
    def _bind(self, view: ClusterView) -> None:
        """Bind to the view's deployments (adding any the engine did not announce)."""
        for i, name in enumerate(view.names):
            if name not in self._slot:
                self.on_llm_added(
                    LLMInfo(
                        name, view.models[i], int(view.model_cols[i]),
                        float(view.price_in_per_mtok[i]), float(view.price_out_per_mtok[i]),
                    )
                )
        self._bind_arrays(
            view.names, view.model_cols, view.price_in_per_mtok, view.price_out_per_mtok
        )
        self._view = view

    def _bind_known(self) -> None:
        """Bind to the deployments announced so far (before any view was seen)."""
        infos = [self._info[nm] for nm in self._slot]
        self._bind_arrays(
            tuple(x.name for x in infos),
            [x.model_col for x in infos],
            [x.price_in_per_mtok for x in infos],
            [x.price_out_per_mtok for x in infos],
        )
        self._view = None

    def _bind_arrays(self, names, cols, pin, pout) -> None:
        """Precompute, for every workload row, the candidates' quality, cost and static score
        in this order; redone when the set of LLMs or a price changes."""
        self._names = tuple(names)
        cols = np.array(cols, dtype=np.int64)
        self._cols = cols
        self._slots = np.array([self._slot[nm] for nm in self._names], dtype=np.int64)
        self._slots_l = self._slots.tolist()
        self._pin = np.array(pin, dtype=np.float64)
        self._pout = np.array(pout, dtype=np.float64)
        self._qc = np.ascontiguousarray(self._q_live[:, cols])  # (n, L) predicted quality
        self._cc = self._costs(np.arange(len(self._in_tok)))  # (n, L) normalised cost
        self._base = self._qw * self._qc - self._cw * self._cc  # (n, L) static score
        n = len(cols)
        self._n_cand = n
        self._zeros = np.zeros(n)
        p: MixLLMParams = self.params
        # The penalty with every wait at 0 (an idle cluster): beta * exp(-gamma * xi * tau).
        self._pen_idle = np.full(n, p.beta * np.exp(-self._pen_shift))
        # The penalty's constants as arrays: a Python float operand costs a numpy ufunc more
        # than the arithmetic on a few candidates.
        self._pen_consts = (np.full(n, self._wait_cap), np.full(n, self._gamma),
                            np.full(n, self._pen0))
        self._ainv_version = -1
        self._net_version = -1
        if self._both:
            priors = np.array([self._col_prior.get(int(c), self._online_prior_n) for c in cols])
            self._wprior = priors / (priors + self._posterior.count[:, cols])  # (n, L)

    def _costs(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), L) predicted cost / cost unit at the bound prices; with best-judged
        fan-outs every answer is judged, so an answer's cost includes the judge's."""
        inp = self._in_tok[rows, None]
        out = self.len_hat[rows][:, self._cols]
        usd_e6 = inp * self._pin + out * self._pout
        if self._top_k > 1 and self._keep == "best_judged":
            judge = self.ctx.judge
            usd_e6 = usd_e6 + (judge.cost_usd * 1e6 + (inp + out) * judge.price_in_per_mtok)
        return usd_e6 * self._cost_mult

    def _scaled_ainv(self) -> np.ndarray:
        """alpha^2 * A_l^-1 of the bound candidates, so that the bonuses are the square roots
        of one matrix product: with the table of context products, the (L, p) upper
        triangles (M @ u2[row]); without it, one (L * d, d) stack, ((M @ x).reshape(L, d)
        @ x). Either is faster than a batched (L, d, d) product."""
        if self._ainv_version != self._bank.version:
            m = self._bank.ainv[self._slots] * (self.params.alpha**2)
            if self._tri is not None:
                self._ainv = np.ascontiguousarray(m[:, self._tri[0], self._tri[1]])
            else:
                self._ainv = m.reshape(-1, m.shape[-1])
            self._ainv_version = self._bank.version
        return self._ainv

    def _net_rows(self) -> np.ndarray:
        """The feedback network's mean weights for the bound candidates (cached)."""
        if self._net_version != self._net.version:
            self._wcols = self._net.mean_w[self._cols]
            self._net_version = self._net.version
        return self._wcols

    def route(self, query: Query, view: ClusterView) -> Decision:
        if view.names is not self._names or view is not self._view:
            self._bind(view)
        r = query.row
        if self._net_on:
            wcols = self._wcols if self._net_version == self._net.version else self._net_rows()
            d = np.dot(wcols, self._z[r])
            if self._both:
                d *= self._wprior[r]
            q = self._qc[r] + d
            d *= self._qw
            score = self._base[r] + d
        else:
            q = self._qc[r].copy()  # the live estimates move with later feedback
            score = self._base[r]
        if self._use_unc:
            m = self._ainv if self._ainv_version == self._bank.version else self._scaled_ainv()
            # np.dot: for these small operands it is faster than @ (no ufunc machinery). The
            # forms stay positive: A^-1 is positive definite with eigenvalues >= 1 / (1 /
            # prior_scale + the LLM's observations) and |x| = 1, far above the rounding of
            # the sum of d (d + 1) / 2 products.
            if self._u2 is not None:
                unc = np.dot(m, self._u2[r])
            else:
                x = self._u[r]
                unc = np.dot(np.dot(m, x).reshape(self._n_cand, -1), x)
            np.sqrt(unc, out=unc)
            score = score + unc
        else:
            unc = self._zeros
            score = score.copy()
        if self._use_pen:
            w = view.est_wait_s
            if _count_nonzero(w):
                # beta * exp(gamma * w - gamma * xi * tau) = pen0 * exp(gamma * min(w, cap))
                pen = np.minimum(w, self._pen_consts[0])
                pen *= self._pen_consts[1]
                np.exp(pen, out=pen)
                pen *= self._pen_consts[2]
            else:
                pen = self._pen_idle
            score -= pen
        else:
            pen = self._zeros
        acc = view.accepting if self._admission else view.up
        if _count_nonzero(acc) == len(acc):
            best = int(score.argmax())
        else:
            best = int(np.where(acc, score, -np.inf).argmax())
            if not acc[best]:  # nothing accepts: the best score anyway (the engine rejects)
                best = int(score.argmax())
        extra: tuple[str, ...] = ()
        if self._top_k > 1:
            extra = self._extras(score, acc, best, r)
        if self._use_unc:
            bank = self._bank
            bank.observe(self._slots_l[best], r)
            if bank.pending >= self._update_every:
                bank.flush()
        return Decision(
            llm=self._names[best],
            scores=score,
            terms={"quality_pred": q, "cost_pred_ref_queries": self._cc[r],
                   "uncertainty_bonus": unc, "latency_penalty": pen},
            extra=extra,
            # One answer is kept whatever the rule: saying so keeps a judge from being billed
            # for a fan-out that did not happen.
            keep=self._keep if extra else "primary",
        )

    def _extras(self, score: np.ndarray, acc: np.ndarray, best: int, row: int) -> tuple[str, ...]:
        """The next best accepting candidates after `best`, for top-k fan-out (they serve
        the query too, so their LinUCB matrices see it)."""
        masked = np.where(acc, score, -np.inf)
        masked[best] = -np.inf
        order = [int(j) for j in np.argsort(-masked, kind="stable")[: self.params.top_k - 1]]
        order = [j for j in order if np.isfinite(masked[j])]
        if self._use_unc:
            for j in order:
                self._bank.observe(self._slots_l[j], row)
        return tuple(self._names[j] for j in order)

    # -------------------------------------------------------------------------- feedback
    def feedback(self, fb: Feedback) -> None:
        if not self.params.online or fb.llm not in self._slot:
            return
        self._fb_rows.append(fb.row)
        self._fb_names.append(fb.llm)
        self._fb_rewards.append(float(fb.reward))
        if len(self._fb_rows) >= self.params.update_every:
            self.apply_feedback()

    def apply_feedback(self) -> None:
        """Apply the queued feedback as one batched critic/actor step (the actor's softmax policy
        of the step is over the current candidates' quality and cost terms)."""
        if not self._fb_rows:
            return
        if self._names is None:
            self._bind_known()
        index = {nm: i for i, nm in enumerate(self._names)}
        keep = [i for i, nm in enumerate(self._fb_names) if nm in index]
        rows = np.array([self._fb_rows[i] for i in keep], dtype=np.int64)
        chosen = np.array([index[self._fb_names[i]] for i in keep], dtype=np.int64)
        reward = np.array([self._fb_rewards[i] for i in keep])
        self._fb_rows.clear()
        self._fb_names.clear()
        self._fb_rewards.clear()
        if len(rows) == 0:
            return
        if self._net_on:
            # The network learns the offline prediction's error (with the neighbours critic
            # alongside, that error is its prior's; see _both).
            self._net.update(
                self._z[rows], self._cols, chosen, self._base[rows],
                self.q_hat[rows, self._cols[chosen]], reward, self._qw,
            )
        if self._posterior is not None:
            cols, weight = self._cols[chosen], None
            if self._correlation is not None:
                rows, cols, reward, weight = self._with_imputed(rows, cols, reward)
            for col in self._posterior.observe(rows, cols, reward, weight):
                self._refresh_quality(int(col))

    def _with_imputed(self, rows: np.ndarray, cols: np.ndarray, reward: np.ndarray):
        """The batch plus, for each reward of a column the answer correlation covers, the
        expected answers of its other columns on the same row (imputed observations), and
        what each observation is worth (1 for a real one)."""
        cover = self._corr_cols
        pos = np.minimum(np.searchsorted(cover, cols), len(cover) - 1)
        hit = np.flatnonzero((cover[pos] == cols) & self._corr_rows[rows])
        if len(hit) == 0 or len(cover) < 2:
            return rows, cols, reward, None
        r = rows[hit]
        r2 = self.params.online_impute_worth == "r2"
        imputed, worth = self._correlation.expected(
            r, pos[hit], reward[hit], self.q_hat[r][:, cover], with_worth=r2)
        others = np.ones(imputed.shape, dtype=bool)
        others[np.arange(len(hit)), pos[hit]] = False
        b, c = np.nonzero(others)
        return (np.concatenate([rows, r[b]]), np.concatenate([cols, cover[c]]),
                np.concatenate([reward, imputed[b, c]]),
                np.concatenate([np.ones(len(rows)), worth[b, c] if r2 else np.ones(len(b))]))

    def _refresh_quality(self, col: int) -> None:
        """Model column `col`'s live quality from the neighbours posterior, pushed into the
        bound candidates' quality and static score arrays."""
        prior_n = self._col_prior.get(col, self._online_prior_n)
        q = self._posterior.posterior(col, self.q_hat[:, col], prior_n)
        self._q_live[:, col] = q
        for j in np.flatnonzero(self._cols == col):
            self._qc[:, j] = q
            self._base[:, j] = self._qw * q - self._cw * self._cc[:, j]
            if self._both:
                self._wprior[:, j] = prior_n / (prior_n + self._posterior.count[:, col])

    # ---------------------------------------------------------------------- LLM changes
    def on_llm_added(self, llm: LLMInfo) -> None:
        """Predictors for a new model from `warm_start_n` training rows (or a prior) and a
        LinUCB matrix A = I / new_llm_explore, so it is explored; others are untouched."""
        if llm.name in self._slot:
            return
        p: MixLLMParams = self.params
        col = llm.model_col
        if col not in self._fitted:
            known = sorted(self._fitted)
            fit_rows = self._fit_rows
            prior_q = float(np.nanmean(self.q_hat[fit_rows][:, known])) if known else 0.5
            prior_len = float(np.nanmean(self.len_hat[fit_rows][:, known])) if known else 100.0
            n_ws = min(p.warm_start_n, len(self._fit_idx))
            ws = np.sort(self._rng.choice(self._fit_idx, n_ws, replace=False))
            self._fit_column(col, ws, prior=(prior_q, prior_len))
            # Its prediction averages at most n_ws answers (a constant prior: about one), so
            # the critic lets feedback outweigh it sooner than for the initial LLMs.
            self._col_prior[col] = float(min(self._online_prior_n, max(1, n_ws)))
            self._net.set_prior(col, self._col_prior[col])
            self._q_live[:, col] = self.q_hat[:, col]
            if self._posterior is not None:
                self._posterior.forget(col)
        self._slot[llm.name] = self._bank.add_slot(p.new_llm_explore)
        self._info[llm.name] = llm
        self._set_cost_unit([llm])  # the first LLM of an empty start, or the reference
        self._names = None  # rebind on the next decision

    def on_llm_removed(self, name: str) -> None:
        """Forget the deployment; the other LLMs' predictors and matrices stay as they are."""
        self._slot.pop(name, None)
        self._info.pop(name, None)
        self._names = None

    def on_price_changed(self, llm: LLMInfo) -> None:
        """Rebind on the next decision: the bound cost and static score arrays were priced at
        the old list prices. The cost unit stays as at setup, so lambda keeps its meaning."""
        if llm.name not in self._slot:
            return
        # _bind_known (feedback before any view) prices from _info, so it must be current.
        self._info[llm.name] = self._priced[llm.name] = llm
        self._names = None


# Neighbour tables cost O(n^2 d) to build and sweeps set up many policies on one workload:
# kept per process, the most recently used first to go last.
_NEIGHBOUR_CACHE: OrderedDict[str, object] = OrderedDict()
_NEIGHBOUR_CACHE_ENTRIES = 8


def _cached_table(key: str, build):
    hit = _NEIGHBOUR_CACHE.get(key)
    if hit is None:
        hit = _NEIGHBOUR_CACHE[key] = build()
        while len(_NEIGHBOUR_CACHE) > _NEIGHBOUR_CACHE_ENTRIES:
            _NEIGHBOUR_CACHE.popitem(last=False)
    else:
        _NEIGHBOUR_CACHE.move_to_end(key)
    return hit


def _neighbour_lists(x: np.ndarray, k: int) -> np.ndarray:
    """`nearest_rows(x, k)`, cached per process."""
    return _cached_table(_digest(x, extra=f"neighbours|{k}"), lambda: nearest_rows(x, k))


def _answer_correlation(x: np.ndarray, fit_rows: np.ndarray, answers: np.ndarray,
                        k: int) -> AnswerCorrelation:
    """`AnswerCorrelation` over each row's k nearest fit rows, cached per process."""
    return _cached_table(
        _digest(x, fit_rows, answers, extra=f"correlation|{k}"),
        lambda: AnswerCorrelation(nearest_rows(x, k, among=fit_rows), answers),
    )


def _pca_context(x: np.ndarray, fit_rows: np.ndarray, dim: int) -> np.ndarray:
    """(n, k + 1) rows [PCA projection of x, 1], unit-normalised; PCA fitted on fit_rows."""
    xf = x[fit_rows].astype(np.float64)
    mu = xf.mean(axis=0)
    k = max(1, min(dim, xf.shape[0] - 1, xf.shape[1]))
    # Right singular vectors of the centred fit rows: the top-k principal directions.
    _, _, vt = np.linalg.svd(xf - mu, full_matrices=False)
    proj = (x.astype(np.float64) - mu) @ vt[:k].T
    proj /= max(float(np.sqrt((proj[fit_rows] ** 2).sum(axis=1).mean())), 1e-12)
    u = np.hstack([proj, np.ones((x.shape[0], 1))])
    return u / np.linalg.norm(u, axis=1, keepdims=True)
