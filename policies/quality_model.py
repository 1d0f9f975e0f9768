"""Pieces shared by the learned baseline routers (knn, mlp, threshold, cascade, optllm).

Everything here runs in `setup`, in batch, on training ground truth only:

- `split_fit_valid`: which training rows to fit on and which to tune knobs on;
- per-LLM quality predictors (cosine kNN, logistic regression, small MLP) that predict for
  every workload row at once;
- an output-token predictor (per task mean), so cost can be predicted with live prices;
- `ValidationTruth`: realised quality/cost of a routing choice on the validation rows, used to
  pick defaults (never the test rows);
- `LearnedRouter`: the bookkeeping every learned router shares (its trade-off knob, LLMs
  joining and leaving, availability masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from policies.base import BasePolicy
from sim.context import request_cost_usd
from sim.errors import PolicyError
from sim.types import ClusterView, LLMInfo, PolicyContext, TrainingSet

# Held-out share of the training rows when the workload has no validation rows.
FALLBACK_VALID_FRACTION = 0.2
# Subtracted from cosine similarities (in [-1, 1]) across tasks, so every same-task
# neighbour ranks before any other-task one.
_CROSS_TASK_PENALTY = 4.0
# Inverse L2 strengths tried for logistic models (chosen by validation Brier score).
C_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)

Predictor = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- data split
@dataclass(frozen=True)
class FitValid:
    """Indices of the rows to fit on and to tune on, both into `TrainingSet` arrays
    (`fit`, `valid`) and into the workload (`fit_rows`, `valid_rows`)."""

    fit: np.ndarray
    valid: np.ndarray
    fit_rows: np.ndarray
    valid_rows: np.ndarray


def split_fit_valid(train: TrainingSet, rng: np.random.Generator) -> FitValid:
    """Fit on the training rows, tune on the validation rows.

    A workload without validation rows gets a random `FALLBACK_VALID_FRACTION` of its
    training rows held out (drawn with `rng`), so knobs are never chosen on fitted rows.
    """
    n = len(train.rows)
    if n < 4:
        raise PolicyError(
            f"a learned router needs at least 4 training rows; the workload has {n}",
            field="workload.split",
        )
    valid = np.flatnonzero(train.valid_mask)
    fit = np.flatnonzero(~train.valid_mask)
    if len(valid) == 0 or len(fit) == 0:
        perm = rng.permutation(n)
        k = max(1, int(round(FALLBACK_VALID_FRACTION * n)))
        valid, fit = np.sort(perm[:k]), np.sort(perm[k:])
    return FitValid(fit=fit, valid=valid, fit_rows=train.rows[fit], valid_rows=train.rows[valid])


# ----------------------------------------------------------------------------- features
def design_matrix(features: np.ndarray, task: np.ndarray, n_tasks: int) -> np.ndarray:
    """Embedding plus a one-hot of the (public) task label, float32."""
    onehot = np.zeros((len(task), max(n_tasks, 1)), dtype=np.float32)
    onehot[np.arange(len(task)), task.astype(np.int64)] = 1.0
    return np.hstack([np.asarray(features, dtype=np.float32), onehot])


def nearest_neighbours(
    features: np.ndarray,
    fit_rows: np.ndarray,
    k: int,
    *,
    task: np.ndarray | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """(n, k) positions into `fit_rows` of each row's k most cosine-similar fit rows, most
    similar first. A fit row never counts as its own neighbour (so predictions on training
    rows are leave-one-out). With `task`, same-task rows come first."""
    n_fit = len(fit_rows)
    k = min(k, n_fit - 1)
    if k < 1:
        raise PolicyError(f"kNN needs at least 2 training rows; got {n_fit}", field="k")
    feats = np.asarray(features, dtype=np.float32)
    ref = feats[fit_rows]
    pos_in_fit = np.full(len(feats), -1, dtype=np.int64)
    pos_in_fit[fit_rows] = np.arange(n_fit)
    out = np.empty((len(feats), k), dtype=np.int64)
    for start in range(0, len(feats), chunk):
        stop = min(start + chunk, len(feats))
        sims = feats[start:stop] @ ref.T
        if task is not None:
            sims -= _CROSS_TASK_PENALTY * (task[start:stop, None] != task[fit_rows][None, :])
        local = np.arange(stop - start)
        self_pos = pos_in_fit[start:stop]
        is_fit = self_pos >= 0
        sims[local[is_fit], self_pos[is_fit]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(top, order, axis=1)
    return out


def knn_mean(neighbours: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Mean of `targets` (n_fit, t) over each row's first k neighbours -> (n, t)."""
    return targets[neighbours[:, :k]].mean(axis=1)


# --------------------------------------------------------------------- probability models
def _is_binary(y: np.ndarray) -> bool:
    return bool(np.all((y == 0) | (y == 1)))


def fit_logistic(X: np.ndarray, y: np.ndarray, *, C: float, seed: int) -> Predictor:
    """P(success | x) by L2 logistic regression. Fractional targets (continuous quality)
    are fitted exactly by giving each row a positive copy weighted y and a negative copy
    weighted 1 - y."""
    from sklearn.linear_model import LogisticRegression

    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    if np.all(y == y[0]):
        const = float(y[0])
        return lambda Z: np.full(len(Z), const)
    clf = LogisticRegression(C=C, max_iter=500, random_state=seed)
    with single_thread():
        if _is_binary(y):
            clf.fit(X, y.astype(np.int64))
        else:
            X2 = np.vstack([X, X])
            y2 = np.r_[np.ones(len(y), dtype=np.int64), np.zeros(len(y), dtype=np.int64)]
            clf.fit(X2, y2, sample_weight=np.r_[y, 1.0 - y])

    def predict(Z: np.ndarray) -> np.ndarray:
        with single_thread():
            return clf.predict_proba(Z)[:, 1]

    return predict


def choose_C(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    grid: Sequence[float],
    *,
    seed: int,
) -> float:
    """The inverse L2 strength in `grid` with the lowest validation Brier score."""
    if len(grid) == 1:
        return float(grid[0])
    briers = [
        float(np.mean((fit_logistic(X_fit, y_fit, C=C, seed=seed)(X_val) - y_val) ** 2))
        for C in grid
    ]
    return float(grid[int(np.argmin(briers))])


def fit_mlp(
    X: np.ndarray, Y: np.ndarray, *, hidden: int, alpha: float, seed: int, max_iter: int = 300
) -> Predictor:
    """Predicted quality in [0, 1] of every column of Y (one output per LLM, one shared
    hidden layer): a multi-label classifier for 0/1 quality, a regressor clipped to [0, 1]
    otherwise. No early stopping: on skewed labels its accuracy criterion stops before the
    outputs leave their initial values; `alpha` (L2) regularises instead."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    Y = np.clip(np.asarray(Y, dtype=np.float64), 0.0, 1.0)
    const = np.all(Y[:1] == Y, axis=0)
    vary = np.flatnonzero(~const)
    binary = _is_binary(Y)
    model = None
    if len(vary):
        target = Y[:, vary] if len(vary) > 1 else Y[:, vary[0]]
        common = dict(
            hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=max_iter, random_state=seed
        )
        with warnings.catch_warnings(), single_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if binary:
                model = MLPClassifier(**common).fit(X, target.astype(np.int64))
            else:
                model = MLPRegressor(**common).fit(X, target)

    def predict(Z: np.ndarray) -> np.ndarray:
        out = np.tile(Y[0], (len(Z), 1))
        if model is not None:
            with single_thread():
                raw = model.predict_proba(Z) if binary else model.predict(Z)
            raw = np.asarray(raw, dtype=np.float64)
            if len(vary) == 1:
                raw = raw[:, 1] if binary else raw
            out[:, vary] = np.clip(raw.reshape(len(Z), len(vary)), 0.0, 1.0)
        return out

    return predict


def single_thread():
    """Limit BLAS/OpenMP to one thread: these matrices are small, and on a shared machine
    many BLAS threads per process slow small fits down by an order of magnitude."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# ------------------------------------------------------------------------ output tokens
def task_mean_tokens(
    task: np.ndarray, fit_rows: np.ndarray, fit_tokens: np.ndarray, n_tasks: int
) -> np.ndarray:
    """(n, m) predicted output tokens: the mean over fit rows of the same task, per model
    column; a task without fit rows gets the model's overall mean. Output length depends
    mostly on the task (one letter for multiple choice, a program for code)."""
    fit_task = task[fit_rows].astype(np.int64)
    overall = fit_tokens.mean(axis=0)
    table = np.tile(overall, (max(n_tasks, 1), 1))
    for t in np.unique(fit_task):
        table[t] = fit_tokens[fit_task == t].mean(axis=0)
    return table[task.astype(np.int64)].astype(np.float64)


# ----------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ValidationTruth:
    """Realised quality and cost of each LLM (columns, in `names` order) on the validation
    rows, and the reference LLM's totals, to score a routing choice as % of the reference."""

    names: tuple[str, ...]
    quality: np.ndarray  # (n_valid, k)
    cost: np.ndarray  # (n_valid, k) USD at the prices known at setup
    ref_quality: float
    ref_cost: float

    def outcome(self, choice: np.ndarray) -> tuple[float, float]:
        """(quality %, cost %) of answering validation row i with LLM `choice[i]`."""
        i = np.arange(len(choice))
        return self.pct(self.quality[i, choice].sum(), self.cost[i, choice].sum())

    def pct(self, quality_sum: float, cost_sum: float) -> tuple[float, float]:
        q = 100.0 * quality_sum / self.ref_quality if self.ref_quality > 0 else float("nan")
        c = 100.0 * cost_sum / self.ref_cost if self.ref_cost > 0 else float("nan")
        return float(q), float(c)


def validation_truth(
    ctx: PolicyContext, split: FitValid, llms: Sequence[LLMInfo], reference: LLMInfo
) -> ValidationTruth:
    cols = np.array([x.model_col for x in llms], dtype=np.int64)
    tok = ctx.train.output_tokens[split.valid][:, cols]
    inp = ctx.input_tokens[split.valid_rows][:, None]
    pin = np.array([x.price_in_per_mtok for x in llms])
    pout = np.array([x.price_out_per_mtok for x in llms])
    ref_tok = ctx.train.output_tokens[split.valid, reference.model_col]
    ref_cost = request_cost_usd(
        ctx.input_tokens[split.valid_rows],
        ref_tok,
        reference.price_in_per_mtok,
        reference.price_out_per_mtok,
    )
    return ValidationTruth(
        names=tuple(x.name for x in llms),
        quality=ctx.train.quality[split.valid][:, cols].astype(np.float64),
        cost=request_cost_usd(inp, tok, pin, pout),
        ref_quality=float(ctx.train.quality[split.valid, reference.model_col].sum()),
        ref_cost=float(np.sum(ref_cost)),
    )


def choose_default(points: Sequence[tuple[float, float]], target_quality_pct: float) -> int:
    """Index of the cheapest (quality %, cost %) point reaching `target_quality_pct`; when
    none does, the one with the highest quality. Ties go to the earlier point."""
    qs = np.array([p[0] for p in points])
    cs = np.array([p[1] for p in points])
    ok = np.flatnonzero(qs >= target_quality_pct)
    if len(ok):
        return int(ok[np.argmin(cs[ok])])
    return int(np.argmax(qs))


def resolve_reference(ctx: PolicyContext, mean_cost: Callable[[LLMInfo], float]) -> LLMInfo:
    """The reference LLM among the initial ones; if it joins later, the costliest one."""
    for x in ctx.llms:
        if x.name == ctx.reference_llm:
            return x
    return max(ctx.llms, key=mean_cost)


def available(view: ClusterView) -> np.ndarray:
    """Deployments worth choosing: accepting ones; if none, up ones; if none, all (the
    engine then records the rejection)."""
    acc = view.accepting
    if acc.any():
        return acc
    if view.up.any():
        return view.up.copy()
    return np.ones(len(view.names), dtype=bool)


# ------------------------------------------------------------------------ frontier hull
def nondecreasing_hull(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (cost, quality) of the non-decreasing concave hull of a set of points, by
    increasing cost: the lowest curve that is concave, never decreases with cost, and lies on
    or above every point from the cheapest point on (mixing two routers at random reaches any
    point on the segment between them, and paying more is never forced to lose quality)."""
    cost = np.asarray(cost, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    ok = np.isfinite(cost) & np.isfinite(quality)
    cost, quality = cost[ok], quality[ok]
    if len(cost) == 0:
        return cost, quality
    order = np.lexsort((-quality, cost))
    c, q = cost[order], quality[order]
    # A point no better than some cheaper one never supports a non-decreasing hull.
    best_before = np.maximum.accumulate(np.r_[-np.inf, q[:-1]])
    c, q = c[q > best_before], q[q > best_before]
    hc: list[float] = []
    hq: list[float] = []
    for x, y in zip(c, q, strict=True):
        # Drop the last vertex while it lies on or below the chord to the new point.
        while len(hc) >= 2 and (
            (hc[-1] - hc[-2]) * (y - hq[-2]) - (hq[-1] - hq[-2]) * (x - hc[-2]) >= 0
        ):
            hc.pop()
            hq.pop()
        hc.append(float(x))
        hq.append(float(y))
    return np.array(hc), np.array(hq)


def hull_mean_quality(cost: np.ndarray, quality: np.ndarray, lo: float, hi: float) -> float:
    """Mean over costs in [lo, hi] of the non-decreasing hull of the points: 0 below the
    cheapest point, linear between hull vertices, flat after the last one."""
    hc, hq = nondecreasing_hull(cost, quality)
    if len(hc) == 0:
        return float("nan")
    if hi <= lo:
        return float(np.interp(lo, hc, hq)) if lo >= hc[0] else 0.0
    a = max(lo, hc[0])
    if a >= hi:
        return 0.0
    inner = hc[(hc > a) & (hc < hi)]
    xs = np.r_[a, inner, hi]
    ys = np.interp(xs, hc, hq)
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / (hi - lo)


# ----------------------------------------------------------------------------- base class
class LearnedRouter(BasePolicy):
    """Bookkeeping shared by the learned routers.

    Subclasses declare their one trade-off knob (`tradeoff_param`, a Params field that may be
    None = "choose on validation", and `tradeoff_grid`, the values the frontier sweeps) and
    implement `_fit` (called once in `setup`) and `_apply_tradeoff(value)`. After `setup`,
    `tradeoff_value` holds the knob in force; `set_tradeoff` changes it without refitting.
    """

    needs_training_rows: ClassVar[bool] = True

    tradeoff_param: ClassVar[str] = ""
    tradeoff_grid: ClassVar[tuple[float, ...]] = ()

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        self.split = split_fit_valid(ctx.train, ctx.rng)
        self.llms: dict[str, LLMInfo] = {x.name: x for x in ctx.llms}
        self.tok_hat = task_mean_tokens(
            ctx.task,
            self.split.fit_rows,
            ctx.train.output_tokens[self.split.fit],
            len(ctx.task_names),
        )
        self.reference = resolve_reference(ctx, self._mean_fit_cost)
        self.tradeoff_value = float("nan")
        self._fit(ctx)
        value = getattr(self.params, self.tradeoff_param)
        if value is None:
            value = self._choose_default_tradeoff()
        self.set_tradeoff(float(value))

    def _validation_costs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(validation rows, model columns of ctx.llms, predicted cost per row and LLM)."""
        llms = self.ctx.llms
        rows = self.split.valid_rows
        cols = np.array([x.model_col for x in llms])
        c_hat = request_cost_usd(
            self.ctx.input_tokens[rows][:, None],
            self.tok_hat[rows][:, cols],
            np.array([x.price_in_per_mtok for x in llms]),
            np.array([x.price_out_per_mtok for x in llms]),
        )
        return rows, cols, c_hat

    def set_tradeoff(self, value: float) -> None:
        """Put the knob at `value` (the frontier sweep calls this instead of refitting)."""
        from pydantic import ValidationError

        try:
            self.params = self.Params.model_validate(
                {**self.params.model_dump(), self.tradeoff_param: value}
            )
        except ValidationError as exc:
            raise PolicyError(
                f"{exc.errors()[0]['msg']} (got {value!r})",
                field=f"{self.name}.params.{self.tradeoff_param}",
            ) from None
        self.tradeoff_value = float(value)
        self._apply_tradeoff(float(value))

    def on_llm_added(self, llm: LLMInfo) -> None:
        self.llms[llm.name] = llm

    def on_llm_removed(self, name: str) -> None:
        self.llms.pop(name, None)

    def on_price_changed(self, llm: LLMInfo) -> None:
        """Keep `llms` at the prices in force (subclasses re-derive what they chose from
        them); `reference` and cost units fixed at setup stay, so the knob keeps its meaning."""
        if llm.name in self.llms:
            self.llms[llm.name] = llm

    # -- helpers for subclasses
    def _mean_fit_cost(self, llm: LLMInfo) -> float:
        rows = self.split.fit_rows
        return float(
            np.mean(
                request_cost_usd(
                    self.ctx.input_tokens[rows],
                    self.tok_hat[rows, llm.model_col],
                    llm.price_in_per_mtok,
                    llm.price_out_per_mtok,
                )
            )
        )

    def _validation_truth(self) -> ValidationTruth:
        return validation_truth(self.ctx, self.split, self.ctx.llms, self.reference)

    def _choose_default_tradeoff(self) -> float:
        """The grid value chosen on validation rows by `choose_default`."""
        truth = self._validation_truth()
        points = [self._validation_point(v, truth) for v in self.tradeoff_grid]
        return float(self.tradeoff_grid[choose_default(points, self.params.valid_target_pct)])

    # -- subclass hooks
    def _fit(self, ctx: PolicyContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_tradeoff(self, value: float) -> None:
        return None

    def _validation_point(self, value: float, truth: ValidationTruth) -> tuple[float, float]:
        raise NotImplementedError  # pragma: no cover - abstract
