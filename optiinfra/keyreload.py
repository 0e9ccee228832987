"""
SIGHUP reads the API key file again, so a key is revoked without a restart.

The guard's keys are replaced in one assignment on the reactor thread, and
every request is checked against them afresh: a revoked key is refused from the
next request on, on connections already open too.  A file that cannot be used
(unreadable, a bad line, no keys, a mode that lets others write it) leaves the
keys in use as they were and logs an error.  Only key names are logged.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads

from optiinfra.auth import ApiKeyFileError, ApiKeys, KeyChanges
from optiinfra.logs import get_logger
from optiinfra.web.guard import Guard

_log = get_logger("optiinfra.auth")


class KeyReloader(Service):
    """Reload C{path} into C{guard} on SIGHUP, for as long as it runs."""

    name = "key-reloader"

    def __init__(
        self, guard: Guard, path: Path | None, reactor: IReactorFromThreads
    ) -> None:
        self._guard = guard
        self._path = path
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        # Without a handler SIGHUP ends the process.
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)

    def _hangup(self, number: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the reactor anywhere: hand over.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the key file again; whether the keys in use were replaced."""
        if self._path is None or self._guard.keys is None:
            _log.info("SIGHUP: no API key file in use, nothing to reload")
            return False
        try:
            keys = ApiKeys.load(self._path)
        except ApiKeyFileError as error:
            _log.error(
                "API key file not reloaded; the keys in use are kept",
                path=str(self._path),
                error=str(error),
                keys=len(self._guard.keys.entries),
            )
            return False
        changes = KeyChanges.between(self._guard.keys, keys)
        self._guard.keys = keys
        _log.info(
            "API keys reloaded",
            path=str(self._path),
            keys=len(keys.entries),
            added=list(changes.added),
            removed=list(changes.removed),
            changed=list(changes.changed),
        )
        return True
