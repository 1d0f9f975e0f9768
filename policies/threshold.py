"""RouteLLM-style threshold router: `threshold`.

Ong et al. 2024 (RouteLLM, arXiv 2406.18665) route between one strong and one weak LLM with a
learned win-rate: the strong LLM gets the query when P(strong needed | query) clears a
threshold, and the threshold is calibrated so that a target share of queries goes to the
strong LLM. Here P(strong needed) is an L2 logistic regression on the embedding plus the task
one-hot, trained on "the strong LLM's quality beats the weak one's" from the training rows;
the threshold for a target share s is the (1 - s) quantile of the validation rows' scores, so
on validation exactly round(s * n_valid) queries (up to ties) go to the strong LLM.

Default pair: strong = the reference LLM (else the best on training rows); weak = the best
LLM on training rows among those at least `weak_cost_ratio` times cheaper than the strong one.
Members of the pair not given as params are re-chosen (and the classifier refitted on the
training rows) when a deployment joins, when a member leaves, or when a price changes; a
member that cannot take a request (or was given and has left) is covered by the other one.
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
from sim.errors import PolicyError
from sim.types import ClusterView, Decision, LLMInfo, PolicyContext, Query

SHARE_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


class ThresholdParams(BaseModel):
    model_config = PARAMS_CONFIG

    strong_share: float | None = Field(default=None, ge=0, le=1)  # None: chosen on validation
    strong: str | None = None  # deployment name; default: the reference LLM
    weak: str | None = None  # deployment name; default: see module docstring
    weak_cost_ratio: float = Field(default=5.0, ge=1)
    C: float | None = Field(default=None, gt=0)  # inverse L2 strength; None: on validation
    valid_target_pct: float = Field(default=95.0, gt=0)


@register
class ThresholdRouter(LearnedRouter):
    """Strong LLM when the learned P(strong needed) reaches the calibrated threshold."""

    name: ClassVar[str] = "threshold"
    Params: ClassVar[type[BaseModel]] = ThresholdParams
    llm_params: ClassVar[tuple[str, ...]] = ("strong", "weak")
    tradeoff_param: ClassVar[str] = "strong_share"
    tradeoff_grid: ClassVar[tuple[float, ...]] = SHARE_GRID

    def _fit(self, ctx: PolicyContext) -> None:
        self._X = design_matrix(ctx.features, ctx.task, len(ctx.task_names))
        self._seed = int(ctx.rng.integers(2**31 - 1))
        self._fit_pair(list(ctx.llms), check=True)

    def _fit_pair(self, llms: list[LLMInfo], *, check: bool = False) -> None:
        """Choose the pair among `llms` and fit P(strong needed) for it."""
        self.strong, self.weak = self._pair(llms, check=check)
        s_col = self.llms[self.strong].model_col
        w_col = self.llms[self.weak].model_col
        q = self.ctx.train.quality
        needed = (q[:, s_col] > q[:, w_col]).astype(np.float64)
        X = self._X
        X_fit, y_fit = X[self.split.fit_rows], needed[self.split.fit]
        grid = (self.params.C,) if self.params.C is not None else C_GRID
        self.C = choose_C(
            X_fit,
            y_fit,
            X[self.split.valid_rows],
            needed[self.split.valid],
            grid,
            seed=self._seed,
        )
        self.p_strong = fit_logistic(X_fit, y_fit, C=self.C, seed=self._seed)(X)
        # Scores sorted high to low: the threshold for share s is the round(s n)-th one.
        self._valid_desc = np.sort(self.p_strong[self.split.valid_rows])[::-1]

    def on_llm_added(self, llm: LLMInfo) -> None:
        super().on_llm_added(llm)
        self._repair()

    def on_llm_removed(self, name: str) -> None:
        super().on_llm_removed(name)
        if name in (self.strong, self.weak):
            self._repair()

    def on_price_changed(self, llm: LLMInfo) -> None:
        super().on_price_changed(llm)
        # The default weak member is chosen by its cost ratio to the strong one.
        if llm.name in self.llms:
            self._repair()

    def _repair(self) -> None:
        """Re-choose the members of the pair that were not given as params (a deployment
        may have joined or left) and recalibrate; given members stay (the other answers
        while one is gone)."""
        if self.params.strong is not None and self.params.weak is not None:
            return
        llms = list(self.llms.values())
        given = [n for n in (self.params.strong, self.params.weak) if n is not None]
        if len(llms) < 2 or any(n not in self.llms for n in given):
            return
        old = (self.strong, self.weak)
        self._fit_pair(llms)
        if (self.strong, self.weak) != old:
            self._apply_tradeoff(self.tradeoff_value)

    def threshold_for(self, share: float) -> float:
        """The score cut-off sending `share` of the validation rows to the strong LLM."""
        n = len(self._valid_desc)
        k = int(round(share * n))
        if k <= 0:
            return np.inf
        if k >= n:
            return -np.inf  # every query, not just those scoring above validation's lowest
        return float(self._valid_desc[k - 1])

    def _apply_tradeoff(self, value: float) -> None:
        self.threshold = self.threshold_for(value)

    def route(self, query: Query, view: ClusterView) -> Decision:
        p = float(self.p_strong[query.row])
        want = self.strong if p >= self.threshold else self.weak
        other = self.weak if want == self.strong else self.strong
        ok = available(view)
        for name in (want, other):
            if name in view.names and ok[view.index(name)]:
                return Decision(llm=name, terms={"p_strong": np.full(len(view.names), p)})
        # Neither of the pair can take it: the cheapest-priced available deployment.
        blended = view.price_in_per_mtok + view.price_out_per_mtok
        j = int(np.argmin(np.where(ok, blended, np.inf)))
        return Decision(llm=view.names[j], terms={"p_strong": np.full(len(view.names), p)})

    def _validation_point(self, value: float, truth: ValidationTruth) -> tuple[float, float]:
        go_strong = self.p_strong[self.split.valid_rows] >= self.threshold_for(value)
        choice = np.where(go_strong, truth.names.index(self.strong), truth.names.index(self.weak))
        return truth.outcome(choice)

    def _pair(self, llms: list[LLMInfo], *, check: bool = False) -> tuple[str, str]:
        names = [x.name for x in llms]
        for field, value in (("strong", self.params.strong), ("weak", self.params.weak)):
            if check and value is not None and value not in names:
                raise PolicyError(
                    f"{value!r} is not one of the LLMs at setup: {', '.join(names)}",
                    field=f"threshold.params.{field}",
                )
        if len(names) < 2:
            raise PolicyError("the threshold router needs at least 2 LLMs", field="llms")
        fit = self.split.fit
        mean_q = {x.name: float(self.ctx.train.quality[fit, x.model_col].mean()) for x in llms}
        cost = {x.name: self._mean_fit_cost(x) for x in llms}
        strong = self.params.strong
        if strong is None:
            strong = (
                self.reference.name if self.reference.name in names else max(names, key=mean_q.get)
            )
        weak = self.params.weak
        if weak is None:
            cheap = [
                n
                for n in names
                if n != strong and cost[n] * self.params.weak_cost_ratio <= cost[strong]
            ]
            pool = cheap or [n for n in names if n != strong]
            weak = (
                max(pool, key=lambda n: (mean_q[n], -cost[n])) if cheap else min(pool, key=cost.get)
            )
        if weak == strong:
            raise PolicyError(
                f"strong and weak must differ; both are {strong!r}", field="threshold.params"
            )
        return strong, weak
