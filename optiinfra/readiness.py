"""Whether this process should be sent traffic: the answer behind C{/readyz}."""

from __future__ import annotations


class Readiness:
    """
    Ready while serving and every dependency answers; not ready once draining.

    Dependencies (a database, say) report themselves with L{set_failing}; the
    service reports its drain with L{start_draining}.
    """

    def __init__(self) -> None:
        self.draining = False
        self._failing: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return not self.draining and not self._failing

    def reasons(self) -> dict[str, str]:
        """Why this process is not ready, by component (empty when it is)."""
        reasons = dict(self._failing)
        if self.draining:
            reasons["server"] = "draining"
        return reasons

    def start_draining(self) -> None:
        self.draining = True

    def set_failing(self, component: str, reason: str | None) -> None:
        """Mark C{component} as failing for C{reason}, or healthy when None."""
        if reason is None:
            self._failing.pop(component, None)
        else:
            self._failing[component] = reason
