"""Per-LLM predictors of response quality and response length (MixLLM's "lightweight
prediction models").

Each workload model gets its own pair of regressors (quality in [0, 1], output tokens), fitted
on the training rows only, so adding or removing an LLM never retrains the others. The
paper uses random forests, MLPs or kNN; all three are here, chosen by `PredictorConfig.kind`.
Predictions for every workload row are made in one batch before the run (`predict`), so a
routing decision only indexes arrays.

Inputs are the query embedding concatenated with a one-hot of the query's public task label
(RouterBench's eval_name / the synthetic task family), scaled by `task_weight`: the label is
public, cheap and strongly predictive of both correctness and answer length. With unit
embeddings, a task weight above sqrt(2) makes every same-task row a closer cosine neighbour
than any other-task row (the dot products differ by task_weight^2 > 2), so kNN averages
answers to the query's own task first.

kNN's k is chosen by `choose_knn_k`: cross-validated Brier score of the quality predictions
over the fit rows, every LLM at once (the kNN router baseline does the same on its
validation rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

PredictorKind = Literal["random_forest", "mlp", "knn"]


@dataclass(frozen=True)
class PredictorConfig:
    """Hyper-parameters of the per-LLM regressors (the same for every LLM)."""

    kind: PredictorKind = "random_forest"
    n_estimators: int = 100  # random forest
    min_samples_leaf: int = 5  # random forest: leaves average >= this many answers
    max_features: float = 0.3  # random forest: share of inputs tried per split
    knn_k: int = 25  # kNN: neighbours averaged (cosine distance)
    mlp_hidden: int = 64  # MLP: one hidden layer of this width
    seed: int = 0


def query_design(
    features: np.ndarray, task: np.ndarray, n_tasks: int, task_weight: float = 1.0
) -> np.ndarray:
    """(n, d + n_tasks) float32 inputs: the embedding, then the task one-hot x task_weight."""
    onehot = np.zeros((features.shape[0], n_tasks), dtype=np.float32)
    if n_tasks and task_weight > 0:
        onehot[np.arange(features.shape[0]), task.astype(np.int64)] = task_weight
    return np.hstack([features.astype(np.float32, copy=False), onehot])


@dataclass
class ModelPredictor:
    """The fitted quality and length regressors of one workload model."""

    model: str
    quality: object | None  # fitted sklearn regressor, or None for a constant prior
    length: object | None
    n_train: int
    prior_quality: float  # used when there is no regressor (no data)
    prior_length: float
    length_scale: float = 1.0  # MLP length targets are divided by this while fitting

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quality in [0, 1], output tokens >= 1) for every row of `x`, as float32."""
        n = x.shape[0]
        if self.quality is None:
            q = np.full(n, self.prior_quality)
        else:
            q = self.quality.predict(x)
        if self.length is None:
            ln = np.full(n, self.prior_length)
        else:
            ln = self.length.predict(x) * self.length_scale
        return (
            np.clip(q, 0.0, 1.0).astype(np.float32),
            np.maximum(ln, 1.0).astype(np.float32),
        )


# k tried by `choose_knn_k` (capped at the fit rows of a fold).
KNN_K_GRID: tuple[int, ...] = (25, 50, 100, 150, 200, 300, 400)


def choose_knn_k(
    x: np.ndarray,
    quality: np.ndarray,
    grid: tuple[int, ...] = KNN_K_GRID,
    *,
    folds: int = 5,
    seed: int = 0,
) -> tuple[int, dict[int, float]]:
    """The k of `grid` with the lowest `folds`-fold cross-validated Brier score of the kNN
    quality predictions (cosine neighbours of `x`, every column of `quality` at once), and
    the score of every k tried. Rows are dealt to folds at random (seeded)."""
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    if n < 2 * folds or quality.shape[1] == 0:
        return max(1, min(grid[0], n - 1)), {}
    fold = np.random.default_rng(seed).permutation(n) % folds
    kmax = min(max(grid), int(np.bincount(fold).min() * (folds - 1)))
    ks = sorted({min(k, kmax) for k in grid})
    sq = {k: 0.0 for k in ks}
    y = quality.astype(np.float64)
    for f in range(folds):
        fit, held = fold != f, fold == f
        nn = NearestNeighbors(n_neighbors=kmax, metric="cosine", algorithm="brute")
        nn.fit(x[fit])
        idx = nn.kneighbors(x[held], return_distance=False)  # nearest first
        yf, yh = y[fit], y[held]
        for j in range(y.shape[1]):  # one model at a time: (n_held, kmax) arrays only
            # Running means over the first k neighbours, for every k at once.
            csum = np.cumsum(yf[idx, j], axis=1)
            for k in ks:
                sq[k] += float(((csum[:, k - 1] / k - yh[:, j]) ** 2).sum())
    brier = {k: v / (n * y.shape[1]) for k, v in sq.items()}
    best = min(ks, key=lambda k: (brier[k], k))
    return best, brier


def _make_regressor(cfg: PredictorConfig, n_rows: int, seed: int):
    if cfg.kind == "random_forest":
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(
            n_estimators=cfg.n_estimators,
            min_samples_leaf=min(cfg.min_samples_leaf, max(1, n_rows // 4)),
            max_features=cfg.max_features,
            random_state=seed,
            n_jobs=1,
        )
    if cfg.kind == "knn":
        from sklearn.neighbors import KNeighborsRegressor

        return KNeighborsRegressor(
            n_neighbors=max(1, min(cfg.knn_k, n_rows)), metric="cosine", algorithm="brute"
        )
    from sklearn.neural_network import MLPRegressor

    return MLPRegressor(
        hidden_layer_sizes=(cfg.mlp_hidden,),
        alpha=1e-3,
        learning_rate_init=1e-3,
        max_iter=300,
        early_stopping=n_rows >= 50,
        n_iter_no_change=15,
        random_state=seed,
    )


def fit_model_predictor(
    model: str,
    x: np.ndarray,
    quality: np.ndarray,
    output_tokens: np.ndarray,
    cfg: PredictorConfig,
    *,
    seed: int,
    prior_quality: float = 0.5,
    prior_length: float = 100.0,
) -> ModelPredictor:
    """Fit one model's quality and length regressors on training rows `x`.

    With fewer than 2 rows the predictor is the constant prior (`prior_quality`,
    `prior_length`), e.g. for an LLM added with no warm-start data.
    """
    n = x.shape[0]
    if n < 2:
        return ModelPredictor(model, None, None, n, prior_quality, prior_length)
    qual = _make_regressor(cfg, n, seed)
    qual.fit(x, quality.astype(np.float64))
    length = _make_regressor(cfg, n, seed + 1)
    scale = 1.0
    target = output_tokens.astype(np.float64)
    if cfg.kind == "mlp":
        # An MLP with a small weight decay fits targets of order 1 far better than raw
        # token counts in the hundreds.
        scale = max(float(target.mean()), 1.0)
        target = target / scale
    length.fit(x, target)
    return ModelPredictor(
        model=model,
        quality=qual,
        length=length,
        n_train=n,
        prior_quality=float(quality.mean()),
        prior_length=float(output_tokens.mean()),
        length_scale=scale,
    )
