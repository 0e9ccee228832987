"""
The twistd plugin's options and service: the one module that wires everything.

C{twistd -n --pidfile= optiinfra --port 8080} lands here.  Settings are built
once from the options and the environment; every other module receives them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

from klein import Klein
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import globalLogPublisher
from twisted.python import usage

from optiinfra import __version__
from optiinfra.logs import (
    LEVELS,
    configure,
    get_logger,
    real_stdout,
    render_event,
)
from optiinfra.metrics import HttpMetrics, new_registry
from optiinfra.readiness import Readiness
from optiinfra.settings import (
    Override,
    Settings,
    SettingsError,
    build_settings,
    read_environment,
)
from optiinfra.systemd import SystemdNotifier
from optiinfra.web import health
from optiinfra.web.app import new_app
from optiinfra.web.service import HTTPService
from optiinfra.web.site import LogSink, OrchestratorSite

#: twistd option -> the environment variable it overrides.
_OPTION_VARIABLES = {
    "port": "ORCHESTRATOR_PORT",
    "environment": "ENVIRONMENT",
    "log-level": "LOG_LEVEL",
    "drain-timeout": "DRAIN_TIMEOUT",
    "max-body-bytes": "MAX_BODY_BYTES",
}


class Options(usage.Options):
    """Command-line options; each overrides its environment variable."""

    optParameters = [
        [
            "port",
            "p",
            None,
            "Port number or Twisted endpoint to listen on "
            "[ORCHESTRATOR_PORT, default 8080].",
        ],
        [
            "environment",
            None,
            None,
            "Deployment environment [ENVIRONMENT, default development].",
        ],
        [
            "log-level",
            None,
            None,
            "debug, info, warn or error [LOG_LEVEL, default info].",
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds in-flight requests get on shutdown [DRAIN_TIMEOUT, default 10].",
        ],
        [
            "max-body-bytes",
            None,
            None,
            "Largest request body accepted [MAX_BODY_BYTES, default 1048576].",
        ],
    ]

    settings: Settings

    def postOptions(self) -> None:
        overrides = {
            variable: Override(f"--{option}", self[option])
            for option, variable in _OPTION_VARIABLES.items()
            if self[option] is not None
        }
        try:
            self.settings = build_settings(read_environment(), overrides)
        except SettingsError as error:
            refuse_to_start(error)
        configure(self.settings.log_level)
        parent = cast(dict[str, Any] | None, self.parent)
        if parent is not None and not parent.get("logger"):
            parent["logger"] = "optiinfra.logs.stdout_observer"


#: Adds routes to the app; how capabilities (and tests) mount themselves.
Mount = Callable[[Klein], None]


def refuse_to_start(error: SettingsError) -> NoReturn:
    """
    One JSON line naming the bad setting, then exit 2.

    Written straight to standard output: logging has not begun this early, and
    events buffered for it would be lost with the exit.
    """
    stdout = real_stdout()
    stdout.write(
        render_event(
            {
                "log_level": LEVELS["error"],
                "log_namespace": "optiinfra.settings",
                "log_format": None,
                "event": f"invalid setting {error.name}={error.value!r}: "
                f"{error.reason}",
                "setting": error.name,
                "value": error.value,
            }
        )
    )
    stdout.flush()
    raise SystemExit(2)


def build_service(
    settings: Settings,
    reactor: IReactorTime,
    log_sink: LogSink = globalLogPublisher,
    mounts: Sequence[Mount] = (),
) -> MultiService:
    """Everything the process runs, as one service tree."""
    log = get_logger("optiinfra")
    log.info(
        "Starting OptiInfra Orchestrator",
        version=__version__,
        environment=settings.environment,
        port=settings.port,
        min_level=settings.log_level,
    )
    registry = new_registry()
    readiness = Readiness()
    app = new_app()
    health.mount(
        app,
        clock=reactor,
        started=reactor.seconds(),
        readiness=readiness,
        registry=registry,
    )
    for mount in mounts:
        mount(app)
    site = OrchestratorSite(
        app.resource(),
        clock=reactor,
        metrics=HttpMetrics(registry),
        log_sink=log_sink,
        max_body_bytes=settings.max_body_bytes,
    )
    top = MultiService()
    web = HTTPService(
        serverFromString(reactor, settings.port),
        site,
        readiness,
        settings.drain_timeout,
    )
    web.setServiceParent(top)
    # Stopped before the web service (MultiService stops in reverse), so systemd
    # hears STOPPING=1 as the drain begins.
    SystemdNotifier(
        reactor, web.when_listening(), settings.notify_socket, settings.watchdog_usec
    ).setServiceParent(top)
    return top


def tune_gc() -> None:
    """
    Klein leaves cyclic garbage on every request; collecting the young generation
    less often, and never rescanning start-up objects, keeps tail latency down.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    try:
        service = build_service(options.settings, cast(IReactorTime, reactor))
    except ValueError as error:  # serverFromString's word on a bad endpoint
        refuse_to_start(
            SettingsError("ORCHESTRATOR_PORT", options.settings.port, str(error))
        )
    cast(IReactorCore, reactor).callWhenRunning(tune_gc)
    return service


__all__ = ["Options", "build_service", "makeService"]
