"""Builds what a policy is given before the run, from a workload and the scenario's LLMs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.errors import ScenarioError
from sim.scenario import LLMSpec
from sim.types import (
    SPLIT_TRAIN,
    SPLIT_VALID,
    GroundTruth,
    JudgeInfo,
    LLMInfo,
    PolicyContext,
    TrainingSet,
    Workload,
)


def llm_info(spec: LLMSpec, workload: Workload, *, field: str = "llms") -> LLMInfo:
    """Public facts about one deployment; its model must exist in the workload."""
    model = spec.model_name
    if model not in workload.models:
        raise ScenarioError(
            f"LLM {spec.name!r} serves model {model!r}, which workload {workload.name!r} has "
            f"no data for; models with data: {', '.join(workload.models)}",
            field=f"{field}.model",
        )
    return LLMInfo(
        name=spec.name,
        model=model,
        model_col=workload.models.index(model),
        price_in_per_mtok=spec.price_in_per_mtok,
        price_out_per_mtok=spec.price_out_per_mtok,
    )


def training_set(workload: Workload, arrival_split: str = "test") -> TrainingSet:
    """The rows whose ground truth policies learn from: train and validation, minus the
    split arrivals sample from (`workload.split`), so no policy is scored on an answer it
    was shown. With arrivals from "all" rows nothing is left to learn from."""
    train = workload.split == SPLIT_TRAIN
    valid = workload.split == SPLIT_VALID
    if arrival_split in ("train", "all"):
        train = np.zeros_like(train)
    if arrival_split in ("validation", "all"):
        valid = np.zeros_like(valid)
    rows = np.flatnonzero(train | valid)
    return TrainingSet(
        rows=rows,
        models=workload.models,
        quality=workload.quality[rows],
        output_tokens=workload.output_tokens[rows],
        valid_mask=workload.split[rows] == SPLIT_VALID,
    )


def context_for(
    workload: Workload,
    llms: Sequence[LLMInfo],
    *,
    reference_llm: str,
    rng: np.random.Generator,
    patience_mean_s: float | None = None,
    cache_dir: str | None = None,
    with_ground_truth: bool = False,
    train: TrainingSet | None = None,
    judge: JudgeInfo | None = None,
) -> PolicyContext:
    """The `PolicyContext` for deployments already described as `LLMInfo`; ground truth of
    every row only when asked for (upper-bound policies)."""
    gt = None
    if with_ground_truth:
        gt = GroundTruth(
            models=workload.models,
            quality=workload.quality,
            output_tokens=workload.output_tokens,
        )
    return PolicyContext(
        llms=tuple(llms),
        workload_models=workload.models,
        features=workload.features,
        task=workload.task,
        task_names=workload.task_names,
        input_tokens=workload.input_tokens,
        train=train if train is not None else training_set(workload),
        texts=workload.texts,
        reference_llm=reference_llm,
        patience_mean_s=patience_mean_s,
        rng=rng,
        cache_dir=cache_dir,
        ground_truth=gt,
        judge=judge or JudgeInfo(),
    )


def build_policy_context(
    workload: Workload,
    llms: Sequence[LLMSpec],
    *,
    reference_llm: str,
    rng: np.random.Generator,
    patience_mean_s: float | None = None,
    cache_dir: str | None = None,
    with_ground_truth: bool = False,
    train: TrainingSet | None = None,
    judge: JudgeInfo | None = None,
) -> PolicyContext:
    """The `PolicyContext` for the scenario's initial `llms` (specs checked against the
    workload's models)."""
    infos = [llm_info(s, workload, field=f"llms.{i}") for i, s in enumerate(llms)]
    return context_for(
        workload, infos, reference_llm=reference_llm, rng=rng,
        patience_mean_s=patience_mean_s, cache_dir=cache_dir,
        with_ground_truth=with_ground_truth, train=train, judge=judge,
    )


def request_cost_usd(
    input_tokens: np.ndarray | int,
    output_tokens: np.ndarray | float,
    price_in_per_mtok: np.ndarray | float,
    price_out_per_mtok: np.ndarray | float,
):
    """USD for one answer (vectorised): tokens times list prices per 1M tokens."""
    return (input_tokens * price_in_per_mtok + output_tokens * price_out_per_mtok) / 1e6
