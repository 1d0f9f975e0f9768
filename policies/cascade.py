"""FrugalGPT-style cascade: `cascade`.

Chen, Zaharia & Zou 2023 (FrugalGPT, arXiv 2305.05176): ask LLMs from the cheapest up and
stop as soon as a scorer trusts the answer. Here:

- the chain is `chain` (deployment names, tried in that order) or chosen on validation rows:
  among the LLMs that are Pareto-efficient on the training rows (no cheaper LLM is as good),
  every cost-ordered chain of 2..`max_chain` of them is simulated over the `accept_threshold`
  grid, and the chain whose curve has the largest area under its non-decreasing hull (the
  AIQ criterion, common cost range) wins; a learned chain is re-chosen when a deployment
  joins, when a rung leaves, or when a price changes;
- after each answer, the acceptance rule is P(answer good | judge score, predicted quality of
  that LLM on this query) >= `accept_threshold`, a per-LLM logistic calibration fitted on the
  training rows with simulated judge scores (realised quality + N(0, judge_noise), clipped
  to [0, 1], the same noise model as the engine's judge; `judge_noise` defaults to the
  scenario's `judge.noise`) and "good" = quality >= 0.5; the chain and the threshold chosen
  on validation count what judging each answer costs (the scenario judge's price);
  predicted quality is a leave-one-out cosine kNN mean;
- the last rung is always accepted. Every attempt is paid for and queued.

The knob `accept_threshold` in [0, 1]: 0 accepts the first answer, 1 always runs the whole
chain; higher never escalates less for the same judge scores.
"""

from __future__ import annotations

from itertools import combinations
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from policies.base import PARAMS_CONFIG
from policies.quality_model import (
    LearnedRouter,
    ValidationTruth,
    available,
    hull_mean_quality,
    knn_mean,
    nearest_neighbours,
    validation_truth,
)
from policies.registry import register
from sim.context import request_cost_usd
from sim.errors import PolicyError
from sim.types import Answer, ClusterView, Decision, LLMInfo, PolicyContext, Query

ACCEPT_GRID: tuple[float, ...] = (
    0.0,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    0.999,
    1.0,
)
_GOOD = 0.5  # quality at or above this counts as a good answer


def _accepts(p_good, tau: float):
    """Whether an answer with acceptance probability `p_good` is kept before the last rung.
    tau 1 keeps none: a calibration that saw a model right on every training row says
    p = 1.0 exactly (the logistic saturates), which would otherwise pass."""
    return (p_good >= tau) & (tau < 1.0)


class CascadeParams(BaseModel):
    model_config = PARAMS_CONFIG

    accept_threshold: float | None = Field(default=None, ge=0, le=1)  # None: on validation
    # Deployment names, cheapest first (a YAML list); None: learned.
    chain: tuple[str, ...] | None = Field(default=None, strict=False)
    max_chain: int = Field(default=3, ge=2)  # a chain of one LLM is no cascade
    # None: the scenario's judge.noise (PolicyContext.judge); set it to calibrate for
    # a judge believed to be sharper or blunter than it is.
    judge_noise: float | None = Field(default=None, ge=0, le=1)
    judge_draws: int = Field(default=4, ge=1)  # simulated judge scores per training row
    k: int = Field(default=20, ge=1)  # neighbours of the quality predictor
    C: float = Field(default=1.0, gt=0)  # inverse L2 strength of the acceptance calibration
    valid_target_pct: float = Field(default=95.0, gt=0)


@register
class CascadeRouter(LearnedRouter):
    """Cheapest rung first; escalate while the calibrated acceptance probability is low."""

    name: ClassVar[str] = "cascade"
    Params: ClassVar[type[BaseModel]] = CascadeParams
    llm_params: ClassVar[tuple[str, ...]] = ("chain",)
    tradeoff_param: ClassVar[str] = "accept_threshold"
    tradeoff_grid: ClassVar[tuple[float, ...]] = ACCEPT_GRID

    # ------------------------------------------------------------------------- fitting
    def _fit(self, ctx: PolicyContext) -> None:
        n, m = len(ctx.features), len(ctx.workload_models)
        self._rng = np.random.default_rng(ctx.rng.integers(2**63 - 1))
        self.judge_noise = (ctx.judge.noise if self.params.judge_noise is None
                            else self.params.judge_noise)
        self._neighbours = nearest_neighbours(
            ctx.features, self.split.fit_rows, self.params.k, task=ctx.task
        )
        self.q_hat = np.full((n, m), np.nan)
        self._coef = np.full((m, 4), np.nan)  # per model column: judge, q_hat, product, bias
        # Judge noise for validation simulations, one draw per (validation row, attempt), as
        # the engine draws a fresh score for every answer.
        self._valid_eps = self._rng.normal(
            0.0, self.judge_noise, size=(len(self.split.valid), m)
        )
        for x in ctx.llms:
            self._fit_column(x.model_col)
        self._auto_chain = self.params.chain is None
        if self._auto_chain:
            self.chain = self._learn_chain(list(ctx.llms))
        else:
            self.chain = self._check_chain(self.params.chain, ctx)

    def _fit_column(self, col: int) -> None:
        if not np.isnan(self._coef[col, 0]):
            return
        from sklearn.linear_model import LogisticRegression

        fit = self.split.fit
        targets = self.ctx.train.quality[fit][:, [col]]
        self.q_hat[:, col] = knn_mean(self._neighbours, targets, self._neighbours.shape[1])[:, 0]
        reps = self.params.judge_draws
        q_true = np.tile(self.ctx.train.quality[fit, col].astype(np.float64), reps)
        q_pred = np.tile(self.q_hat[self.split.fit_rows, col], reps)
        judge = np.clip(q_true + self._rng.normal(0.0, self.judge_noise, len(q_true)), 0, 1)
        good = (q_true >= _GOOD).astype(np.int64)
        if good.min() == good.max():
            # Always (or never) good on training rows: a constant acceptance probability.
            self._coef[col] = (0.0, 0.0, 0.0, 50.0 if good[0] else -50.0)
            return
        clf = LogisticRegression(C=self.params.C, max_iter=500)
        clf.fit(_accept_features(judge, q_pred), good)
        self._coef[col] = (*clf.coef_[0], clf.intercept_[0])

    def _p_good(self, col: int, judge: np.ndarray, q_pred: np.ndarray) -> np.ndarray:
        a, b, c, d = self._coef[col]
        z = a * judge + b * q_pred + c * judge * q_pred + d
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))

    # ---------------------------------------------------------------------- the chain
    def _check_chain(self, chain: tuple[str, ...], ctx: PolicyContext) -> tuple[str, ...]:
        names = [x.name for x in ctx.llms]
        unknown = [c for c in chain if c not in names]
        if unknown or not chain:
            raise PolicyError(
                f"chain {list(chain)!r} must list LLMs at setup ({', '.join(names)}); "
                f"unknown: {unknown}",
                field="cascade.params.chain",
            )
        return tuple(chain)

    def _valid_sim(self, truth: ValidationTruth, llms: list[LLMInfo]):
        """Per validation row and LLM (columns of `truth`): acceptance probability, realised
        quality, the answer's cost and the judge's (paid for every rung but the last, whose
        answer is final) — everything a chain simulation needs."""
        rows = self.split.valid_rows
        cols = np.array([x.model_col for x in llms])
        judge = np.clip(truth.quality + self._valid_eps[:, cols], 0.0, 1.0)
        p_good = np.column_stack(
            [self._p_good(c, judge[:, i], self.q_hat[rows, c]) for i, c in enumerate(cols)]
        )
        judged = self.ctx.judge.answer_cost_usd(
            self.ctx.input_tokens[rows][:, None].astype(np.float64),
            self.ctx.train.output_tokens[self.split.valid][:, cols].astype(np.float64),
        )
        return p_good, truth.quality, truth.cost, judged

    @staticmethod
    def _simulate(chain_idx, tau, p_good, quality, cost, judged, truth) -> tuple[float, float]:
        n = len(quality)
        done = np.zeros(n, dtype=bool)
        q_sum = 0.0
        c_sum = 0.0
        for r, j in enumerate(chain_idx):
            active = ~done
            last = r == len(chain_idx) - 1
            c_sum += float(cost[active, j].sum())
            if not last:
                c_sum += float(judged[active, j].sum())
            accept = active if last else active & _accepts(p_good[:, j], tau)
            q_sum += float(quality[accept, j].sum())
            done |= accept
        return truth.pct(q_sum, c_sum)

    def _learn_chain(self, llms: list[LLMInfo]) -> tuple[str, ...]:
        truth = validation_truth(self.ctx, self.split, llms, self.reference)
        sim = self._valid_sim(truth, llms)
        fit = self.split.fit
        mean_q = [float(self.ctx.train.quality[fit, x.model_col].mean()) for x in llms]
        mean_c = [self._mean_fit_cost(x) for x in llms]
        order = sorted(range(len(llms)), key=lambda i: (mean_c[i], -mean_q[i]))
        pareto, best = [], -np.inf
        for i in order:
            if mean_q[i] > best:
                pareto.append(i)
                best = mean_q[i]
        lengths = range(min(2, len(pareto)), min(self.params.max_chain, len(pareto)) + 1)
        chains = [c for r in lengths for c in combinations(pareto, r)]
        curves = [
            [self._simulate(c, t, *sim, truth) for t in ACCEPT_GRID]
            for c in chains
        ]
        costs = np.array([p[1] for curve in curves for p in curve])
        lo, hi = float(costs.min()), float(costs.max())
        areas = [
            hull_mean_quality(
                np.array([p[1] for p in curve]), np.array([p[0] for p in curve]), lo, hi
            )
            for curve in curves
        ]
        return tuple(llms[i].name for i in chains[int(np.argmax(areas))])

    def _validation_point(self, value: float, truth: ValidationTruth) -> tuple[float, float]:
        llms = list(self.ctx.llms)
        idx = [truth.names.index(n) for n in self.chain]
        return self._simulate(idx, value, *self._valid_sim(truth, llms), truth)

    # ------------------------------------------------------------------------ routing
    def route(self, query: Query, view: ClusterView) -> Decision:
        ok = available(view)
        for rung, name in enumerate(self.chain):
            if name in view.names and ok[view.index(name)]:
                return Decision(llm=name, final=self._last_present(rung, view))
        # No rung can take it: the available deployment with the lowest predicted cost
        # (never escalated, as it is not in the chain).
        c = request_cost_usd(
            query.input_tokens,
            self.tok_hat[query.row, view.model_cols],
            view.price_in_per_mtok,
            view.price_out_per_mtok,
        )
        return Decision(llm=view.names[int(np.argmin(np.where(ok, c, np.inf)))], final=True)

    def _last_present(self, rung: int, view: ClusterView) -> bool:
        """Whether no later rung of the chain is in the cluster: then the rung's answer is
        final, and the judge is not paid to score it. (A later rung that is down may be back
        when the answer comes, so it still counts; one that joins the cluster meanwhile is
        not used for this request.)"""
        return not any(name in view.names for name in self.chain[rung + 1 :])

    def on_answer(self, query: Query, answer: Answer, view: ClusterView) -> Decision | None:
        if answer.llm not in self.chain or answer.llm not in self.llms:
            return None
        rung = self.chain.index(answer.llm)
        col = self.llms[answer.llm].model_col
        p = float(self._p_good(col, answer.judge_score, self.q_hat[query.row, col]))
        if _accepts(p, self.tradeoff_value):
            return None
        ok = available(view)
        for later, name in enumerate(self.chain[rung + 1 :], rung + 1):
            if name in view.names and ok[view.index(name)]:
                return Decision(llm=name, final=self._last_present(later, view))
        return None

    def on_llm_added(self, llm: LLMInfo) -> None:
        super().on_llm_added(llm)
        self._fit_column(llm.model_col)
        if self._auto_chain:
            self.chain = self._learn_chain(list(self.llms.values()))

    def on_llm_removed(self, name: str) -> None:
        super().on_llm_removed(name)
        if self._auto_chain and name in self.chain and len(self.llms) >= 1:
            self.chain = self._learn_chain(list(self.llms.values()))

    def on_price_changed(self, llm: LLMInfo) -> None:
        super().on_price_changed(llm)
        # The learned chain is the cost/quality Pareto set ordered by cost at list prices.
        if self._auto_chain and llm.name in self.llms:
            self.chain = self._learn_chain(list(self.llms.values()))


def _accept_features(judge: np.ndarray, q_pred: np.ndarray) -> np.ndarray:
    return np.column_stack([judge, q_pred, judge * q_pred])
