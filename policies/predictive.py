"""RouterBench-style predictive routers: `knn` and `mlp`.

Hu et al. 2024 (RouterBench, arXiv 2403.12031) route with one quality predictor per LLM on
the query embedding and a fixed quality-cost trade-off. Here, per query and deployment j:

    score_j = q_hat_j - c_hat_j / (willingness_to_pay * C_ref)

with q_hat the predicted quality of j's model, c_hat the predicted USD cost at j's live
prices (per-task mean output tokens), and C_ref the reference LLM's mean predicted cost per
query on the training rows (a fixed unit, so willingness_to_pay = w means "pay up to w
reference-LLM queries' worth of money per unit of expected quality"). More willingness to pay
never picks a cheaper LLM for a query. No latency or load awareness: only deployments that
would reject the request are skipped.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from policies.base import PARAMS_CONFIG
from policies.quality_model import (
    LearnedRouter,
    ValidationTruth,
    available,
    design_matrix,
    fit_mlp,
    knn_mean,
    nearest_neighbours,
)
from policies.registry import register
from sim.context import request_cost_usd
from sim.types import ClusterView, Decision, LLMInfo, PolicyContext, Query

# Log-spaced so the sweep covers "always the cheapest" to "always the best predicted".
WTP_GRID: tuple[float, ...] = (
    0.01,
    0.03,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    300.0,
    1000.0,
)
KNN_K_GRID: tuple[int, ...] = (5, 10, 20, 40, 80, 160)
MLP_ALPHA_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)


class _PredictiveRouter(LearnedRouter):
    """Argmax of predicted quality minus priced predicted cost; subclasses fill `q_hat`."""

    tradeoff_param: ClassVar[str] = "willingness_to_pay"
    tradeoff_grid: ClassVar[tuple[float, ...]] = WTP_GRID

    def _fit(self, ctx: PolicyContext) -> None:
        self.q_hat = np.full((len(ctx.features), len(ctx.workload_models)), np.nan)
        self._prepare(ctx)
        self._fit_columns(sorted({x.model_col for x in ctx.llms}))
        self.cost_unit = max(self._mean_fit_cost(self.reference), 1e-12)

    def _apply_tradeoff(self, value: float) -> None:
        self._cost_weight = 1.0 / (value * self.cost_unit)

    def route(self, query: Query, view: ClusterView) -> Decision:
        cols = view.model_cols
        q = self.q_hat[query.row, cols]
        c = request_cost_usd(
            query.input_tokens,
            self.tok_hat[query.row, cols],
            view.price_in_per_mtok,
            view.price_out_per_mtok,
        )
        score = q - self._cost_weight * c
        j = _argmax_available(score, available(view))
        return Decision(llm=view.names[j], scores=score,
                        terms={"quality_pred": q, "cost_pred_usd": c})

    def on_llm_added(self, llm: LLMInfo) -> None:
        super().on_llm_added(llm)
        if np.isnan(self.q_hat[0, llm.model_col]):
            self._fit_columns([llm.model_col])

    def _validation_point(self, value: float, truth: ValidationTruth) -> tuple[float, float]:
        rows, cols, c_hat = self._validation_costs()
        score = self.q_hat[rows][:, cols] - c_hat / (value * self.cost_unit)
        return truth.outcome(np.argmax(score, axis=1))

    # -- subclass hooks
    def _prepare(self, ctx: PolicyContext) -> None:
        return None

    def _fit_columns(self, cols: list[int]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _argmax_available(score: np.ndarray, ok: np.ndarray) -> int:
    """Best score among `ok`; a model never fitted (NaN) ranks below every fitted one."""
    masked = np.where(ok, score, -np.inf)
    j = int(np.argmax(masked))
    if np.isnan(masked[j]):  # argmax returns the first NaN: rank NaNs last instead
        j = int(np.argmax(np.where(np.isnan(masked), -1e300, masked)))
    return j


class KNNParams(BaseModel):
    model_config = PARAMS_CONFIG

    willingness_to_pay: float | None = Field(default=None, gt=0)  # None: chosen on validation
    k: int | None = Field(default=None, ge=1)  # neighbours; None: chosen on validation
    same_task: bool = True  # neighbours from the query's own task first
    valid_target_pct: float = Field(default=95.0, gt=0)  # default knob: cheapest reaching it


@register
class KNNRouter(_PredictiveRouter):
    """Per-LLM quality = mean quality of the k most similar training queries (cosine)."""

    name: ClassVar[str] = "knn"
    Params: ClassVar[type[BaseModel]] = KNNParams

    def _prepare(self, ctx: PolicyContext) -> None:
        kmax = self.params.k or max(KNN_K_GRID)
        task = ctx.task if self.params.same_task else None
        self._neighbours = nearest_neighbours(ctx.features, self.split.fit_rows, kmax, task=task)
        self.k = self.params.k or self._choose_k(ctx)

    def _choose_k(self, ctx: PolicyContext) -> int:
        """k with the lowest validation Brier score over the initial LLMs."""
        cols = sorted({x.model_col for x in ctx.llms})
        targets = ctx.train.quality[self.split.fit][:, cols]
        truth = ctx.train.quality[self.split.valid][:, cols]
        nb = self._neighbours[self.split.valid_rows]
        ks = [k for k in KNN_K_GRID if k <= nb.shape[1]] or [nb.shape[1]]
        briers = [float(np.mean((knn_mean(nb, targets, k) - truth) ** 2)) for k in ks]
        return ks[int(np.argmin(briers))]

    def _fit_columns(self, cols: list[int]) -> None:
        targets = self.ctx.train.quality[self.split.fit][:, cols]
        self.q_hat[:, cols] = knn_mean(self._neighbours, targets, self.k)


class MLPParams(BaseModel):
    model_config = PARAMS_CONFIG

    willingness_to_pay: float | None = Field(default=None, gt=0)  # None: chosen on validation
    hidden: int = Field(default=128, ge=1)  # units of the one shared hidden layer
    alpha: float | None = Field(default=None, ge=0)  # L2 penalty; None: chosen on validation
    max_iter: int = Field(default=300, ge=1)
    valid_target_pct: float = Field(default=95.0, gt=0)


@register
class MLPRouter(_PredictiveRouter):
    """Per-LLM quality from one MLP on the embedding plus the task one-hot: one shared
    hidden layer, one sigmoid output per workload model (all fitted at setup, so an LLM
    added later is already predicted)."""

    name: ClassVar[str] = "mlp"
    Params: ClassVar[type[BaseModel]] = MLPParams

    def _prepare(self, ctx: PolicyContext) -> None:
        X = design_matrix(ctx.features, ctx.task, len(ctx.task_names))
        seed = int(ctx.rng.integers(2**31 - 1))
        Y = ctx.train.quality[self.split.fit]
        cols = sorted({x.model_col for x in ctx.llms})
        X_val = X[self.split.valid_rows]
        Y_val = ctx.train.quality[self.split.valid][:, cols]
        best = np.inf
        for alpha in (self.params.alpha,) if self.params.alpha is not None else MLP_ALPHA_GRID:
            predict = fit_mlp(
                X[self.split.fit_rows],
                Y,
                hidden=self.params.hidden,
                alpha=alpha,
                seed=seed,
                max_iter=self.params.max_iter,
            )
            brier = float(np.mean((predict(X_val)[:, cols] - Y_val) ** 2))
            if brier < best:
                best, self.alpha, chosen = brier, alpha, predict
        self.q_hat[:] = chosen(X)

    def _fit_columns(self, cols: list[int]) -> None:
        return None  # every column was fitted in `_prepare`
