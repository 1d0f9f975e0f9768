"""The oracle: routes with the hidden ground truth. An upper bound, never a competitor."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.base import BasePolicy
from policies.registry import register
from sim.types import ClusterView, Decision, PolicyContext, Query


class OracleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_quality: float = Field(
        0.5, ge=0, le=1, description="an answer counts as good at or above this quality"
    )


@register
class OraclePolicy(BasePolicy):
    """Per query the cheapest accepting deployment whose answer is good; if none is, the
    cheapest. It reads ground truth (quality and output tokens), so it bounds every router
    from above on quality per dollar (RouterBench's oracle)."""

    name = "oracle"
    label = "upper bound"
    uses_ground_truth = True
    Params: ClassVar[type[BaseModel]] = OracleParams

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        if ctx.ground_truth is None:  # pragma: no cover - engine contract
            raise RuntimeError("oracle needs ground truth")
        self.quality = ctx.ground_truth.quality
        self.out_tokens = ctx.ground_truth.output_tokens
        self.in_tokens = ctx.input_tokens

    def route(self, query: Query, view: ClusterView) -> Decision:
        cols = view.model_cols
        q = self.quality[query.row, cols]
        cost = (
            query.input_tokens * view.price_in_per_mtok
            + self.out_tokens[query.row, cols] * view.price_out_per_mtok
        )
        good = (q >= self.params.min_quality) & view.accepting
        pool = good if good.any() else view.accepting
        if not pool.any():
            pool = view.up if view.up.any() else np.ones(len(cols), dtype=bool)
        key = np.where(pool, cost, np.inf)
        return Decision(view.names[int(np.argmin(key))], scores=q)
