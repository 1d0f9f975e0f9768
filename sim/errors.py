"""The one root error type of routesim.

Every message names the field (a dotted path), the offending value and the rule, so a user
can fix a scenario without reading code. The CLI turns these into exit code 2 without a
traceback.
"""

from __future__ import annotations


class RouteSimError(Exception):
    """Root of every error routesim raises on purpose (bad input, impossible request)."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        self.message = message
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


    def with_source(self, source: str) -> RouteSimError:
        """The same error naming `source` (a file), unless it already names one."""
        if self.source:
            return self
        return type(self)(self.message, source=source, field=self.field)


class ScenarioError(RouteSimError):
    """A scenario file or object that does not validate."""


class DataError(RouteSimError):
    """A workload data file that cannot be used (missing, wrong columns, bad values)."""


class PolicyError(RouteSimError):
    """An unknown policy name, a duplicate registration or invalid policy params."""
