"""Policies registered by name. A duplicate name raises; an unknown name lists the choices.

Built-in policies register when their module is imported; `_BUILTIN_MODULES` lists them so
`create` and `names` see every policy without the caller importing modules by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from policies.base import BasePolicy
from sim.errors import PolicyError

_REGISTRY: dict[str, type[BasePolicy]] = {}
_BUILTIN_MODULES = (
    "policies.baselines",
    "policies.oracle",
    "policies.predictive",
    "policies.threshold",
    "policies.cascade",
    "policies.optllm",
    "policies.mixllm.policy",
)
_loaded = False


def register(cls: type[BasePolicy]) -> type[BasePolicy]:
    """Class decorator: register `cls` under `cls.name`."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise PolicyError(
            f"policy name {name!r} is already registered by {_REGISTRY[name].__module__}."
            f"{_REGISTRY[name].__qualname__}; names must be unique",
            field="name",
        )
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # Only tolerate a missing optional module, never a broken import inside one.
            if exc.name != mod:
                raise


def names() -> list[str]:
    """Registered policy names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str, *, field: str = "policy") -> type[BasePolicy]:
    """The class registered as `name`; an unknown name lists the choices."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        hint = difflib.get_close_matches(name, names(), n=1)
        did = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise PolicyError(
            f"unknown policy {name!r}{did}; choose one of: {', '.join(names())}", field=field
        ) from None


def validate_params(name: str, params: Mapping[str, Any] | None, *, field: str = "policy"):
    """Validate `params` against the policy's Params model; errors name the param."""
    cls = get(name, field=field)
    try:
        return cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        allowed = ""
        if err["type"] == "extra_forbidden":
            allowed = f"; allowed params: {', '.join(cls.Params.model_fields) or '(none)'}"
        raise PolicyError(
            f"{err['msg']} (got {err.get('input')!r}){allowed}",
            field=f"{field}.params.{loc}" if loc else f"{field}.params",
        ) from None


def check_against_scenario(
    name: str,
    params: Mapping[str, Any] | None,
    llm_names: Sequence[str],
    *,
    has_texts: bool,
    field: str,
    has_training_rows: bool = True,
) -> None:
    """Before a run, not halfway through it: params that name deployments (the class's
    `llm_params`) name LLMs in `llm_names` (those present at setup), the class's
    `workload_conflict` finds nothing wrong for a workload with or without query texts, and a
    policy that learns from training rows (`needs_training_rows`) has some."""
    cls = get(name, field=field)
    if getattr(cls, "needs_training_rows", False) and not has_training_rows:
        raise PolicyError(
            f"policy {name!r} ({field}) learns from the ground truth of training rows, and "
            "workload.split 'all' leaves none (rows arrivals sample are never training rows, "
            "so no router is scored on an answer it was shown); use split 'test', or a "
            "router that does not learn (random, round_robin, cheapest, least_loaded)",
            field="workload.split",
        )
    validated = validate_params(name, params, field=field)
    conflict = cls.workload_conflict(validated, has_texts=has_texts)
    if conflict is not None:
        param, rule = conflict
        raise PolicyError(rule, field=f"{field}.params.{param}")
    for param in getattr(cls, "llm_params", ()):
        value = getattr(validated, param)
        given = [value] if isinstance(value, str) else list(value or ())
        unknown = [v for v in given if v not in llm_names]
        if unknown:
            what = (f"{value!r} is" if isinstance(value, str)
                    else f"{list(value)!r} lists {', '.join(map(repr, unknown))},")
            raise PolicyError(
                f"{what} not an LLM present at the start; choose from: {', '.join(llm_names)}",
                field=f"{field}.params.{param}",
            )


def create(name: str, params: Mapping[str, Any] | None = None, *, field: str = "policy"):
    """A new policy instance with validated params."""
    cls = get(name, field=field)
    return cls(validate_params(name, params, field=field))
