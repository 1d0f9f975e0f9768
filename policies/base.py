"""The `Policy` protocol and a base class with harmless defaults.

A policy is constructed from validated params, gets a `PolicyContext` once before the run
(`setup`), then answers `route` for every query with a `Decision` (data, never a side effect
on the cluster). Feedback and cluster changes arrive through the `on_*`/`feedback` hooks.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from sim.types import Answer, ClusterView, Decision, Feedback, LLMInfo, PolicyContext, Query

# Every policy's Params: unknown keys are errors, params never change after validation,
# .inf / .nan are refused (a YAML `beta: .inf` would otherwise run, routing nonsense), and
# values are not coerced (strict): `k: true` or `k: 2.5` is no count, a quoted '5' no number
# and 'yes' no switch, as in scenarios. A field that takes a YAML list as a tuple opts out
# with `Field(strict=False)`.
PARAMS_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class NoParams(BaseModel):
    """Params model for policies without parameters (any key is an error)."""

    model_config = PARAMS_CONFIG


@runtime_checkable
class Policy(Protocol):
    """What the engine calls. `route` must do O(#LLMs) work: precompute in `setup`.

    Cluster-change hooks, each called once per scenario event, after the cluster (and the
    `ClusterView` the next `route` sees) reflects the change:

    - `on_llm_added(llm)`: a deployment joined (`add_llm`); `llm` carries its list prices.
    - `on_llm_removed(name)`: a deployment left (`remove_llm`).
    - `on_price_changed(llm)`: a present deployment's list prices changed (`price_change`);
      `llm` carries the prices now in force. A policy that caches prices (or anything derived
      from them) refreshes it here instead of watching the view's price arrays.

    `on_answer(query, answer, view)` is asked about each single answer (not a fan-out's,
    nor one whose decision said `final=True`) by policies that override it, after the
    scenario's judge scored it (billed): None keeps the answer, a Decision escalates (and
    may fan out). If the escalation fails in an outage or its deployment is removed, `on_answer` is
    asked again about the same answer (`query.attempt` counts the calls made), so a cascade
    resumes where it was instead of starting over from `route`.
    """

    name: str
    uses_ground_truth: bool

    def setup(self, ctx: PolicyContext) -> None: ...

    def route(self, query: Query, view: ClusterView) -> Decision: ...

    def feedback(self, fb: Feedback) -> None: ...

    def on_answer(self, query: Query, answer: Answer, view: ClusterView) -> Decision | None: ...

    def on_llm_added(self, llm: LLMInfo) -> None: ...

    def on_llm_removed(self, name: str) -> None: ...

    def on_price_changed(self, llm: LLMInfo) -> None: ...


class BasePolicy:
    """Defaults: ignore feedback, accept every answer, nothing to do on cluster changes.

    Subclasses set `name`, optionally `Params` (a pydantic model with extra="forbid") and
    `label` (e.g. "upper bound"), and implement `route`.
    """

    name: ClassVar[str] = "base"
    label: ClassVar[str] = ""
    uses_ground_truth: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = NoParams
    # Params whose values (a name or a sequence of names) name deployments present at setup:
    # registry.check_against_scenario checks them against a scenario before anything runs.
    llm_params: ClassVar[tuple[str, ...]] = ()
    # True for policies that learn from the ground truth of training rows
    # (`PolicyContext.train`): refused before any run when the scenario leaves none.
    needs_training_rows: ClassVar[bool] = False

    @classmethod
    def workload_conflict(cls, params: BaseModel, *, has_texts: bool) -> tuple[str, str] | None:
        """(param, rule) when `params` cannot work on a workload with (or without) query
        texts, checked before any run; None when they can."""
        return None

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()
        self.ctx: PolicyContext | None = None

    def setup(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def route(self, query: Query, view: ClusterView) -> Decision:  # pragma: no cover
        raise NotImplementedError

    def feedback(self, fb: Feedback) -> None:
        return None

    def on_answer(self, query: Query, answer: Answer, view: ClusterView) -> Decision | None:
        return None

    def on_llm_added(self, llm: LLMInfo) -> None:
        return None

    def on_llm_removed(self, name: str) -> None:
        return None

    def on_price_changed(self, llm: LLMInfo) -> None:
        return None
