"""A small synthetic workload on which routing is learnable, for the learned-router tests.

Three models: `small` (cheap) is good where feature 0 is positive, `mid` where feature 1 is
positive, `large` (expensive, the reference) is good everywhere. A router that reads the
features answers most queries well at a fraction of `large`'s cost; random routing cannot.
"""

from __future__ import annotations

import numpy as np

from reports.frontier import policy_context
from sim.types import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, LLMInfo, PolicyContext, Workload

MODELS = ("small", "mid", "large")
PRICES = {"small": (0.2, 0.2), "mid": (1.0, 1.0), "large": (10.0, 30.0)}


def learnable_workload(n: int = 1500, seed: int = 0, dim: int = 4) -> Workload:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    p = np.column_stack(
        [
            np.where(x[:, 0] > 0, 0.9, 0.15),
            np.where(x[:, 1] > 0, 0.85, 0.35),
            np.full(n, 0.92),
        ]
    )
    quality = (rng.random(p.shape) < p).astype(np.float32)
    feats = x / np.linalg.norm(x, axis=1, keepdims=True)
    u = rng.random(n)
    split = np.where(u < 0.5, SPLIT_TRAIN, np.where(u < 0.7, SPLIT_VALID, SPLIT_TEST))
    return Workload(
        name="learnable",
        models=MODELS,
        features=feats.astype(np.float32),
        task=(x[:, 2] > 0).astype(np.int16),
        task_names=("a", "b"),
        input_tokens=rng.integers(50, 300, n).astype(np.int32),
        quality=quality,
        output_tokens=np.full((n, len(MODELS)), 50.0, dtype=np.float32),
        split=split.astype(np.int8),
    )


def llm_infos(names: tuple[str, ...] = MODELS) -> list[LLMInfo]:
    return [
        LLMInfo(
            name=m,
            model=m,
            model_col=MODELS.index(m),
            price_in_per_mtok=PRICES[m][0],
            price_out_per_mtok=PRICES[m][1],
        )
        for m in names
    ]


def reference(llms: list[LLMInfo]) -> LLMInfo:
    return next(x for x in llms if x.name == "large")


def context(wl: Workload, llms: list[LLMInfo], seed: int = 0) -> PolicyContext:
    return policy_context(wl, llms, reference(llm_infos()), seed=seed)
