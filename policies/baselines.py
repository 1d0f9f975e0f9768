"""Baselines that need no learning: random, round_robin, cheapest, strongest, least_loaded.

Each picks among deployments that would accept the request now (`ClusterView.accepting`);
when none accepts, it still answers among those that are up (the engine then records a
rejection for load, not for an outage), because a router that silently drops traffic would
look better than it is.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from policies.base import PARAMS_CONFIG, BasePolicy
from policies.quality_model import available
from policies.registry import register
from sim.errors import PolicyError
from sim.types import ClusterView, Decision, PolicyContext, Query


def _candidates(view: ClusterView) -> np.ndarray:
    return np.flatnonzero(available(view))


@register
class RandomPolicy(BasePolicy):
    """Uniformly random among accepting deployments."""

    name = "random"

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        self.rng = ctx.rng

    def route(self, query: Query, view: ClusterView) -> Decision:
        cand = _candidates(view)
        return Decision(view.names[int(cand[self.rng.integers(cand.size)])])


@register
class RoundRobinPolicy(BasePolicy):
    """Cycles through accepting deployments in order."""

    name = "round_robin"

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        self.counter = 0

    def route(self, query: Query, view: ClusterView) -> Decision:
        cand = _candidates(view)
        choice = cand[self.counter % cand.size]
        self.counter += 1
        return Decision(view.names[int(choice)])


class _PriceParams(BaseModel):
    model_config = PARAMS_CONFIG
    output_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the output price in the blended price (0.5: mean of in/out)",
    )


@register
class CheapestPolicy(BasePolicy):
    """Lowest blended list price among accepting deployments."""

    name = "cheapest"
    Params: ClassVar[type[BaseModel]] = _PriceParams

    def route(self, query: Query, view: ClusterView) -> Decision:
        w = self.params.output_share
        price = (1 - w) * view.price_in_per_mtok + w * view.price_out_per_mtok
        price = np.where(available(view), price, np.inf)
        return Decision(view.names[int(np.argmin(price))], scores=-price)


@register
class StrongestPolicy(BasePolicy):
    """Highest mean training quality among accepting deployments (a fixed ranking)."""

    name = "strongest"
    needs_training_rows = True

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        if len(ctx.train.rows) == 0:
            raise PolicyError(
                "strongest ranks LLMs by their mean quality on training rows; the workload "
                "has none (the rows arrivals sample from, workload.split, are never training "
                "rows)",
                field="workload.split",
            )
        fit = ~ctx.train.valid_mask
        self.mean_quality = (
            ctx.train.quality[fit].mean(axis=0) if fit.any() else (ctx.train.quality.mean(axis=0))
        )

    def route(self, query: Query, view: ClusterView) -> Decision:
        q = self.mean_quality[view.model_cols]
        s = np.where(available(view), q, -np.inf)
        return Decision(view.names[int(np.argmax(s))], scores=q)


@register
class LeastLoadedPolicy(BasePolicy):
    """Shortest estimated wait (ties: lowest utilisation)."""

    name = "least_loaded"

    def route(self, query: Query, view: ClusterView) -> Decision:
        s = view.est_wait_s + 1e-6 * view.load
        s[~available(view)] = np.inf
        return Decision(view.names[int(s.argmin())], scores=-view.est_wait_s)
