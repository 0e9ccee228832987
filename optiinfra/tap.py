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
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from optiinfra import __version__, openapi
from optiinfra.auth import ApiKeyFileError, ApiKeys
from optiinfra.console import routes as console_routes
from optiinfra.coordination import routes as coordination_routes
from optiinfra.coordination.approvals import ApprovalPolicy
from optiinfra.coordination.executor import CoordinationMetrics, Executor
from optiinfra.coordination.loops import CoordinationService
from optiinfra.coordination.model import CONTRADICTORY_ACTIONS
from optiinfra.coordination.plans import (
    DEFAULT_TEMPLATES,
    TemplateError,
    load_templates,
)
from optiinfra.coordination.service import Coordinator, CoordinatorConfig
from optiinfra.destinations import Destinations
from optiinfra.events import routes as event_routes
from optiinfra.events.feed import Feed
from optiinfra.events.loops import EventPurge, FeedReader, StreamsEnd
from optiinfra.events.record import Recorder, Watch
from optiinfra.keyreload import KeyReloader
from optiinfra.lifecycle import OrderedServices
from optiinfra.logs import (
    LEVELS,
    AccessLog,
    configure,
    get_logger,
    real_stdout,
    render_event,
)
from optiinfra.metrics import HttpMetrics, new_registry
from optiinfra.readiness import Readiness
from optiinfra.registry import routes as registry_routes
from optiinfra.registry.loops import StoreService, StoreWatch, Sweeper
from optiinfra.registry.service import Registry, RegistryConfig, RegistryMetrics
from optiinfra.routing import routes as routing_routes
from optiinfra.routing.dispatch import AgentPool, Dispatcher
from optiinfra.routing.loops import RouterService
from optiinfra.routing.router import Router, RouterConfig
from optiinfra.settings import (
    Override,
    Settings,
    SettingsError,
    build_settings,
    read_environment,
)
from optiinfra.store.events import EventLog
from optiinfra.store.interface import IBackend, IStore, StoreError, StoreUnavailable
from optiinfra.store.postgres import PostgresBackend
from optiinfra.store.sql import SQLStore
from optiinfra.store.sqlite import SQLiteBackend
from optiinfra.systemd import SystemdNotifier
from optiinfra.web import health
from optiinfra.web.app import new_app, render_failure
from optiinfra.web.front import FastRoutes, FrontResource
from optiinfra.web.guard import Guard
from optiinfra.web.service import HTTPService
from optiinfra.web.site import AccessSink, OrchestratorSite

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
            refuse_to_start(error.name, error.value, error.reason)
        configure(self.settings.log_level)
        parent = cast(dict[str, Any] | None, self.parent)
        if parent is not None and not parent.get("logger"):
            parent["logger"] = "optiinfra.logs.stdout_observer"


#: Adds routes to the app; how capabilities (and tests) mount themselves.
Mount = Callable[[Klein], None]


def refuse_to_start(setting: str, value: str, reason: str, code: int = 2) -> NoReturn:
    """
    One JSON line naming the bad setting, then exit C{code}.

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
                "event": f"invalid setting {setting}={value!r}: {reason}",
                "setting": setting,
                "value": value,
            }
        )
    )
    stdout.flush()
    raise SystemExit(code)


def open_store(settings: Settings, reactor: IReactorTime) -> IStore:
    """
    Connect to the configured store and migrate its schema, blocking: this runs
    before the reactor starts, and the process must not serve without it.
    """
    threads = cast(IReactorThreads, reactor)
    backend: IBackend
    if settings.database_url:
        backend = PostgresBackend(
            settings.database_url, threads, timeout=settings.store_timeout
        )
    else:
        backend = SQLiteBackend(settings.state_dir / "orchestrator.db", threads)
    backend.open()
    get_logger("optiinfra.store").info(
        "store opened",
        backend=backend.name,
        path=None if settings.database_url else str(settings.state_dir),
    )
    return SQLStore(backend, reactor)


def load_keys(settings: Settings) -> ApiKeys | None:
    """The API keys, or None (with a warning) when access control is off."""
    log = get_logger("optiinfra.auth")
    if settings.auth_disabled:
        log.warn("access control disabled by AUTH_DISABLED: every caller is trusted")
        return None
    if settings.api_keys_file is None:
        log.warn(
            "no API_KEYS_FILE: the API is open to anyone who can reach it",
            environment=settings.environment,
        )
        return None
    keys = ApiKeys.load(settings.api_keys_file)
    log.info("API keys loaded", keys=len(keys.entries))
    return keys


def coordinator_config(settings: Settings) -> CoordinatorConfig:
    """The coordination rules, with the operator's templates and action pairs."""
    templates = DEFAULT_TEMPLATES
    if settings.plan_templates_file is not None:
        templates = load_templates(settings.plan_templates_file)
    return CoordinatorConfig(
        policy=ApprovalPolicy(
            expiry={
                "medium": settings.approval_expiry_medium,
                "high": settings.approval_expiry_high,
                "critical": settings.approval_expiry_critical,
            },
            critical_approvers=settings.critical_approvers,
        ),
        templates=templates,
        contradictions=(*CONTRADICTORY_ACTIONS, *settings.contradictory_actions),
    )


def build_service(
    settings: Settings,
    reactor: IReactorTime,
    access_log: AccessSink | None = None,
    mounts: Sequence[Mount] = (),
    store: IStore | None = None,
) -> MultiService:
    """
    Everything the process runs, as one service tree.

    Children start in order and stop in reverse, one at a time: systemd hears
    STOPPING=1, the HTTP port drains, the loops stop, and the store closes last.
    """
    log = get_logger("optiinfra")
    log.info(
        "Starting OptiInfra Orchestrator",
        version=__version__,
        environment=settings.environment,
        port=settings.port,
        min_level=settings.log_level,
    )
    # Everything that can be refused is checked before the store is opened.
    endpoint = serverFromString(reactor, settings.port)
    guard = Guard(load_keys(settings))
    coordination = coordinator_config(settings)
    if store is None:
        store = open_store(settings, reactor)
    metrics = new_registry()
    readiness = Readiness()
    destinations = Destinations(settings.agent_allowed_networks)
    registry = Registry(
        store,
        reactor,
        RegistryConfig(
            heartbeat_interval=settings.heartbeat_interval,
            unreachable_after=settings.silent_after,
            expire_after=settings.agent_expiry,
            sweep_interval=settings.sweep_interval,
            max_agents_per_key=settings.agent_key_max_agents,
        ),
        RegistryMetrics(metrics),
        destinations,
        cast(IReactorPluggableNameResolver, reactor).nameResolver,
    )
    app = new_app()
    health.mount(app, registry=metrics)
    fast = FastRoutes()
    health.mount_probes(fast, health.Probes(reactor, readiness))
    registry_routes.mount(app, registry, guard, fast)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.agent_concurrency
    router = Router(
        store.tasks,
        registry,
        reactor,
        Dispatcher(reactor, pool, settings.max_answer_bytes, destinations),
        RouterConfig(
            per_agent_limit=settings.agent_concurrency,
            attempt_timeout=settings.attempt_timeout,
            retry_delay=settings.retry_delay,
            result_ttl=settings.result_ttl,
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
            max_waiting=settings.max_waiting_tasks,
            task_types=settings.task_types,
            lease=settings.task_lease,
        ),
        metrics,
        draining=lambda: readiness.draining,
        stalled=lambda reason: readiness.set_failing("dispatch", reason),
    )
    routing_routes.mount(app, router, guard, fast)
    coordination_metrics = CoordinationMetrics(metrics)
    coordinator = Coordinator(
        store.coordination,
        Executor(
            store.coordination,
            router,
            reactor,
            coordination_metrics,
            step_retries=settings.plan_step_retries,
            wait_limit=max(coordination.policy.expiry.values()),
        ),
        reactor,
        coordination,
        coordination_metrics,
        offload=lambda work: deferToThreadPool(
            cast(IReactorFromThreads, reactor),
            cast(IReactorThreads, reactor).getThreadPool(),
            work,
        ),
    )
    coordination_routes.mount(app, coordinator, guard)
    feed = Feed(EventLog(store.backend), reactor)
    recorder = Recorder(feed.log, reactor, recorded=feed.wake)
    Watch(recorder, registry).attach(router, coordinator, coordinator.executor)
    event_routes.mount(app, feed, guard)
    console_routes.mount(app, guard)
    openapi.mount(app, secured=guard.keys is not None)
    for mount in mounts:
        mount(app)
    site = OrchestratorSite(
        FrontResource(fast, app.resource(), render_failure),
        clock=reactor,
        metrics=HttpMetrics(metrics),
        access_log=access_log or AccessLog(real_stdout(), LEVELS[settings.log_level]),
        max_body_bytes=settings.max_body_bytes,
        header_timeout=settings.header_timeout,
        min_body_rate=settings.min_body_rate,
        max_connections=settings.max_connections,
    )
    top = OrderedServices()
    KeyReloader(
        guard, settings.api_keys_file, cast(IReactorFromThreads, reactor)
    ).setServiceParent(top)
    StoreService(store).setServiceParent(top)
    # Each second: a lost store is seen within one STORE_TIMEOUT and a second,
    # and one that is back is used again within a second.
    StoreWatch(store, readiness, reactor, interval=1.0).setServiceParent(top)
    Sweeper(registry, reactor).setServiceParent(top)
    AgentPool(pool).setServiceParent(top)
    RouterService(
        router,
        reactor,
        interval=router.config.pass_interval,
        grace=settings.drain_timeout,
        store_timeout=settings.store_timeout,
    ).setServiceParent(top)
    CoordinationService(
        coordinator,
        reactor,
        interval=settings.coordination_interval,
        retention=settings.coordination_retention,
    ).setServiceParent(top)
    FeedReader(feed, reactor).setServiceParent(top)
    EventPurge(recorder, feed, reactor, settings.event_retention).setServiceParent(top)
    web = HTTPService(
        endpoint,
        site,
        readiness,
        settings.drain_timeout,
    )
    web.setServiceParent(top)
    web.when_listening().addCallback(_own_address, destinations)
    StreamsEnd(feed).setServiceParent(top)
    SystemdNotifier(
        reactor, web.when_listening(), settings.notify_socket, settings.watchdog_usec
    ).setServiceParent(top)
    return top


def _own_address(port: IListeningPort, destinations: Destinations) -> None:
    """Tasks are never sent to the orchestrator's own listening address."""
    address = port.getHost()
    if isinstance(address, IPv4Address | IPv6Address):
        destinations.listening(address.host, address.port)


def tune_gc() -> None:
    """
    Move everything built at start-up out of the collector's sight, so each
    collection of the cyclic garbage Klein leaves per request stays short.
    (Raising the thresholds instead made each pause 7-12 ms: worse tails.)
    """
    gc.collect()
    gc.freeze()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    settings = options.settings
    try:
        service = build_service(settings, cast(IReactorTime, reactor))
    except ApiKeyFileError as error:
        refuse_to_start("API_KEYS_FILE", str(settings.api_keys_file), str(error))
    except TemplateError as error:
        refuse_to_start(
            "PLAN_TEMPLATES_FILE", str(settings.plan_templates_file), str(error)
        )
    except (StoreUnavailable, StoreError) as error:
        refuse_to_start(
            "DATABASE_URL" if settings.database_url else "STATE_DIR",
            "<hidden>" if settings.database_url else str(settings.state_dir),
            str(error),
            code=1,
        )
    except ValueError as error:  # serverFromString's word on a bad endpoint
        refuse_to_start("ORCHESTRATOR_PORT", settings.port, str(error))
    cast(IReactorCore, reactor).callWhenRunning(tune_gc)
    return service


__all__ = ["Options", "build_service", "makeService"]
