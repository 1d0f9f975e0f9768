"""OptLLM-style router: `optllm`.

Liu et al. 2024 (OptLLM, "Optimal assignment of queries to large language models", arXiv
2405.15130) predict each LLM's success on a query with uncertainty (classifiers trained on
bootstrap resamples) and then optimise cost against predicted success ("predict then
optimise"). Here, per LLM: `n_boot` L2 logistic regressions on bootstrap resamples of the
training rows (embedding plus task one-hot) give a mean success probability p and its spread
s over the resamples; the robust success is p - `kappa` * s. Per query the router picks the
cheapest available LLM (predicted cost at live prices) whose robust success reaches
`target`; when none does, the one with the highest robust success.

The knob `target` in [0, 1]: raising it never picks a cheaper LLM for a query.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from policies.base import PARAMS_CONFIG
from policies.quality_model import (
    C_GRID,
    LearnedRouter,
    ValidationTruth,
    available,
    choose_C,
    design_matrix,
    fit_logistic,
)
from policies.registry import register
from sim.context import request_cost_usd
from sim.types import ClusterView, Decision, LLMInfo, PolicyContext, Query

TARGET_GRID: tuple[float, ...] = (
    0.0,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
    0.85,
    0.9,
    0.95,
    1.0,
)


class OptLLMParams(BaseModel):
    model_config = PARAMS_CONFIG

    target: float | None = Field(default=None, ge=0, le=1)  # None: chosen on validation
    kappa: float = Field(default=1.0, ge=0)  # std-devs subtracted from the mean success
    n_boot: int = Field(default=8, ge=1)
    C: float | None = Field(default=None, gt=0)  # inverse L2 strength; None: per LLM on valid.
    valid_target_pct: float = Field(default=95.0, gt=0)


@register
class OptLLMRouter(LearnedRouter):
    """Cheapest LLM whose robust predicted success clears the target."""

    name: ClassVar[str] = "optllm"
    Params: ClassVar[type[BaseModel]] = OptLLMParams
    tradeoff_param: ClassVar[str] = "target"
    tradeoff_grid: ClassVar[tuple[float, ...]] = TARGET_GRID

    def _fit(self, ctx: PolicyContext) -> None:
        n, m = len(ctx.features), len(ctx.workload_models)
        self._X = design_matrix(ctx.features, ctx.task, len(ctx.task_names))
        self._seed = int(ctx.rng.integers(2**31 - 1))
        self.p_mean = np.full((n, m), np.nan)
        self.p_std = np.full((n, m), np.nan)
        self.robust = np.full((n, m), np.nan)
        for col in sorted({x.model_col for x in ctx.llms}):
            self._fit_column(col)

    def _fit_column(self, col: int) -> None:
        rng = np.random.default_rng([self._seed, col])
        X_fit = self._X[self.split.fit_rows]
        y = self.ctx.train.quality[self.split.fit, col].astype(np.float64)
        C = choose_C(
            X_fit,
            y,
            self._X[self.split.valid_rows],
            self.ctx.train.quality[self.split.valid, col].astype(np.float64),
            (self.params.C,) if self.params.C is not None else C_GRID,
            seed=self._seed,
        )
        preds = np.empty((self.params.n_boot, len(self._X)))
        for b in range(self.params.n_boot):
            take = rng.integers(0, len(y), len(y)) if self.params.n_boot > 1 else slice(None)
            predict = fit_logistic(X_fit[take], y[take], C=C, seed=self._seed + b)
            preds[b] = predict(self._X)
        self.p_mean[:, col] = preds.mean(axis=0)
        self.p_std[:, col] = preds.std(axis=0)
        self.robust[:, col] = np.clip(
            self.p_mean[:, col] - self.params.kappa * self.p_std[:, col], 0.0, 1.0
        )

    def route(self, query: Query, view: ClusterView) -> Decision:
        cols = view.model_cols
        r = self.robust[query.row, cols]
        c = request_cost_usd(
            query.input_tokens,
            self.tok_hat[query.row, cols],
            view.price_in_per_mtok,
            view.price_out_per_mtok,
        )
        j = _choose(r, c, available(view), self.tradeoff_value)
        return Decision(llm=view.names[j], terms={"success_pred": r, "cost_pred_usd": c})

    def on_llm_added(self, llm: LLMInfo) -> None:
        super().on_llm_added(llm)
        if np.isnan(self.robust[0, llm.model_col]):
            self._fit_column(llm.model_col)

    def _validation_point(self, value: float, truth: ValidationTruth) -> tuple[float, float]:
        rows, cols, c_hat = self._validation_costs()
        r = self.robust[rows][:, cols]
        clears = r >= value
        cheapest = np.argmin(np.where(clears, c_hat, np.inf), axis=1)
        choice = np.where(clears.any(axis=1), cheapest, np.argmax(r, axis=1))
        return truth.outcome(choice)


def _choose(robust: np.ndarray, cost: np.ndarray, ok: np.ndarray, target: float) -> int:
    """Cheapest `ok` LLM whose robust success reaches `target`, else the most likely one;
    a model never fitted (NaN) never clears and ranks last."""
    clears = ok & (robust >= target)
    if clears.any():
        return int(np.argmin(np.where(clears, cost, np.inf)))
    masked = np.where(ok, robust, -np.inf)
    j = int(np.argmax(masked))
    if np.isnan(masked[j]):
        j = int(np.argmax(np.where(np.isnan(masked), -1e300, masked)))
    return j
