"""The oracle: routes with the hidden ground truth. An upper bound, never a competitor."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from policies.base import PARAMS_CONFIG, BasePolicy
from policies.quality_model import available
from policies.registry import register
from sim.types import ClusterView, Decision, PolicyContext, Query


class OracleParams(BaseModel):
    model_config = PARAMS_CONFIG


@register
class OraclePolicy(BasePolicy):
    """Per query the accepting deployment whose answer is best, the cheapest among equals.
    With right/wrong answers that is RouterBench's oracle (the cheapest right answer, else
    the cheapest). It reads ground truth (quality and output tokens), so no router gets more
    quality out of a query; with graded answers too (a "cheapest answer above a bar" rule
    would not be: a router paying for the better answer beats it)."""

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
        pool = available(view)
        best = pool & (q >= np.max(np.where(pool, q, -np.inf)))
        key = np.where(best, cost, np.inf)
        return Decision(view.names[int(np.argmin(key))], scores=q)
