"""Shared fixtures: an in-process orchestrator on a real socket, and its log."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from optiinfra.logs import configure_structlog
from optiinfra.settings import Settings
from optiinfra.tap import build_service
from optiinfra.web.service import HTTPService

from .agents import start_agent  # noqa: F401 - a fixture for every test module

# The service refuses a key file its group may write: whatever the runner's
# umask, the key files tests write are their owner's to write only.
os.umask(0o022)


@attrs.define
class LogCapture:
    """Every event logged while a test runs (structlog events and access lines)."""

    events: list[dict[str, Any]] = attrs.field(factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))

    def named(self, namespace: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if namespace in (e.get("log_namespace"), e.get("logger"))
        ]

    def messages(self) -> list[str]:
        return [str(e.get("event", e.get("message", ""))) for e in self.events]


@pytest.fixture
def logs() -> LogCapture:
    capture = LogCapture()
    configure_structlog("debug", publisher=capture)
    return capture


@attrs.define
class RunningService:
    top: MultiService
    url: str
    pool: HTTPConnectionPool

    @property
    def http(self) -> HTTPService:
        service = self.top.getServiceNamed("http")
        assert isinstance(service, HTTPService)
        return service

    def get(self, path: str, **kwargs: Any) -> Any:
        return treq.get(self.url + path, pool=self.pool, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return treq.request(method, self.url + path, pool=self.pool, **kwargs)


StartService = Callable[..., Any]


@pytest_twisted.async_yield_fixture
async def start_service(
    logs: LogCapture, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StartService]:
    """Start orchestrators on 127.0.0.1:<free port>; all stopped after the test."""
    started: list[RunningService] = []

    async def start(
        mounts: Sequence[Callable[[Klein], None]] = (), **settings: Any
    ) -> RunningService:
        settings.setdefault("port", "tcp:0:interface=127.0.0.1")
        settings.setdefault("state_dir", tmp_path_factory.mktemp("state"))
        top = build_service(
            Settings(**settings), reactor, access_log=logs, mounts=mounts
        )
        top.startService()
        http = top.getServiceNamed("http")
        port = await http.when_listening()
        pool = HTTPConnectionPool(reactor, persistent=True)
        running = RunningService(top, f"http://127.0.0.1:{port.getHost().port}", pool)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.pool.closeCachedConnections()
        if running.top.running:
            await running.top.stopService()


@pytest_twisted.async_yield_fixture
async def service(start_service: StartService) -> AsyncIterator[RunningService]:
    """One orchestrator with default settings."""
    yield await start_service()
