"""
A real browser for the console's tests: Debian's chromium driven by Playwright.

Playwright's sync API must stay on the thread that started it, so one thread
of its own runs every browser step while the reactor (the orchestrator and the
fake agents, in this process) goes on serving; the test awaits each step.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

T = TypeVar("T")

CHROMIUM = os.environ.get("OPTIINFRA_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class BrowserThread:
    """Runs browser steps, one at a time, on the thread Playwright lives on."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pw")
        self.playwright: Any = None
        self.browser: Any = None

    def run(self, step: Callable[..., T], *args: Any) -> Deferred[T]:
        done: Deferred[T] = Deferred()

        def deliver(future: Future[T]) -> None:
            error = future.exception()
            if error is not None:
                reactor.callFromThread(done.errback, error)  # type: ignore[attr-defined]
            else:
                reactor.callFromThread(done.callback, future.result())  # type: ignore[attr-defined]

        self._executor.submit(step, *args).add_done_callback(deliver)
        return done

    def start(self) -> None:
        from playwright.sync_api import sync_playwright

        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(
            executable_path=CHROMIUM, args=ARGS
        )

    def stop(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self.playwright is not None:
            self.playwright.stop()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where this test's screenshots go: under the run's output folder."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


@pytest_twisted.async_yield_fixture
async def browser() -> AsyncIterator[BrowserThread]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no chromium at {CHROMIUM}: run `make browser-deps`")
    thread = BrowserThread()
    await thread.run(thread.start)
    try:
        yield thread
    finally:
        await thread.run(thread.stop)
        thread.shutdown()
