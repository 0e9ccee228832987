"""
Settings, built once at start-up and passed down.

Precedence: command-line options > the real environment > a ``.env`` file in the
working directory > defaults.  This is the only module that reads the environment;
everything else receives a frozen L{Settings}.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, cast

import attrs
from dotenv import dotenv_values

from optiinfra.destinations import Network, parse_networks
from optiinfra.routing.model import TASK_TYPE

LOG_LEVELS: Final = ("debug", "info", "warn", "error")


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(f"invalid {name}={value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason


@attrs.frozen
class Settings:
    """Everything configurable about one orchestrator process."""

    port: str = "tcp:8080"
    environment: str = "development"
    log_level: str = "info"
    drain_timeout: float = 10.0
    max_body_bytes: int = 1024 * 1024
    #: Seconds a request's line and headers may take to arrive, in all.
    header_timeout: float = 10.0
    #: Bytes a second a body must arrive at, once C{header_timeout} has passed.
    min_body_rate: int = 1024
    #: Open connections served in full; beyond, only probes (then 503).
    max_connections: int = 4096
    #: Where the embedded store keeps its file.
    state_dir: Path = Path("var")
    #: A PostgreSQL URL for the shared store; None means the embedded SQLite one.
    database_url: str | None = None
    #: Seconds any one call to PostgreSQL may take, from asking to answer.
    store_timeout: float = 5.0
    #: Seconds a replica's claim on a task in flight lasts unless renewed.
    task_lease: float = 15.0
    api_keys_file: Path | None = None
    auth_disabled: bool = False
    heartbeat_interval: float = 30.0
    #: None: one and a half heartbeat intervals.
    unreachable_after: float | None = None
    agent_expiry: float = 600.0
    sweep_interval: float = 5.0
    #: Task routing.
    agent_concurrency: int = 8
    attempt_timeout: float = 10.0
    retry_delay: float = 5.0
    result_ttl: float = 3600.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    #: Waiting tasks (every replica's) beyond which submissions get 429.
    max_waiting_tasks: int = 10_000
    #: Agents: what one agent key may register, and how much an answer may hold.
    agent_key_max_agents: int = 100
    max_answer_bytes: int = 4 * 1024 * 1024
    #: Networks agents may be in; None: all but link-local and metadata ones.
    agent_allowed_networks: tuple[Network, ...] | None = None
    #: Task types accepted besides the built-in ones and what agents offer.
    task_types: frozenset[str] = frozenset()
    #: Coordination: how long approvals stay open, by risk, and who must agree.
    approval_expiry_medium: float = 48 * 3600.0
    approval_expiry_high: float = 24 * 3600.0
    approval_expiry_critical: float = 4 * 3600.0
    critical_approvers: int = 2
    #: Extra contradictory action pairs, on top of the platform's table.
    contradictory_actions: tuple[tuple[str, str], ...] = ()
    #: A JSON file of plan templates, by action, over the built-in ones.
    plan_templates_file: Path | None = None
    coordination_interval: float = 1.0
    #: Retries of each plan step's task (the router's back-off applies).
    plan_step_retries: int = 1
    #: Seconds a finished coordination (results, approvals, plans) is kept.
    coordination_retention: float = 30 * 24 * 3600.0
    #: Seconds the change feed keeps events for clients that resume.
    event_retention: float = 3600.0
    #: systemd's notification socket and watchdog period, when run by systemd.
    notify_socket: str | None = None
    watchdog_usec: int | None = None

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def silent_after(self) -> float:
        """Seconds of silence after which an agent is unreachable."""
        if self.unreachable_after is not None:
            return self.unreachable_after
        return 1.5 * self.heartbeat_interval


def parse_port(name: str, raw: str) -> str:
    """
    Turn a port setting into a Twisted server endpoint description.

    A bare number becomes C{tcp:N}; anything else must look like an endpoint
    string (C{kind:...}) and is checked by Twisted when it is used.
    """
    value = raw.strip()
    if value.isdigit():
        number = int(value)
        if not 0 <= number <= 65535:
            raise SettingsError(name, raw, "port must be between 0 and 65535")
        return f"tcp:{number}"
    kind, sep, _ = value.partition(":")
    if not sep or not kind.isidentifier():
        raise SettingsError(
            name, raw, "expected a port number or a Twisted endpoint like tcp:8080"
        )
    return value


def parse_log_level(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value == "warning":
        value = "warn"
    if value not in LOG_LEVELS:
        raise SettingsError(name, raw, f"expected one of {', '.join(LOG_LEVELS)}")
    return value


def parse_seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, raw, "expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(name, raw, "expected a non-negative number of seconds")
    return value


def parse_bytes(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, raw, "expected a whole number of bytes") from None
    if value < 1:
        raise SettingsError(name, raw, "expected a positive number of bytes")
    return value


def parse_environment(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if not value or not value.replace("-", "").replace("_", "").isalnum():
        raise SettingsError(
            name, raw, "expected a word such as development or production"
        )
    return value


def parse_text(name: str, raw: str) -> str:
    return raw


def parse_microseconds(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(
            name, raw, "expected a whole number of microseconds"
        ) from None
    if value <= 0:
        raise SettingsError(name, raw, "expected a positive number of microseconds")
    return value


def parse_positive_seconds(name: str, raw: str) -> float:
    value = parse_seconds(name, raw)
    if value == 0:
        raise SettingsError(name, raw, "expected more than zero seconds")
    return value


def parse_count(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, raw, "expected a whole number") from None
    if value < 1:
        raise SettingsError(name, raw, "expected at least 1")
    return value


def parse_cidrs(name: str, raw: str) -> tuple[Network, ...]:
    """C{10.0.0.0/8,fd00::/8}: the networks agents may be in."""
    try:
        return parse_networks(raw)
    except ValueError as error:
        raise SettingsError(name, raw, str(error)) from None


def parse_task_types(name: str, raw: str) -> frozenset[str]:
    """C{resize_disk,warm_cache}: task types accepted with no agent offering them."""
    names = frozenset(item.strip() for item in raw.split(",") if item.strip())
    for task_type in sorted(names):
        if not TASK_TYPE.fullmatch(task_type):
            raise SettingsError(
                name, raw, f"{task_type!r} is not a task type ({TASK_TYPE.pattern})"
            )
    return names


def parse_action_pairs(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """C{scale_up:drain,a:b}: pairs of actions that undo each other."""
    pairs = []
    for item in raw.split(","):
        if not item.strip():
            continue
        left, sep, right = item.strip().partition(":")
        if not sep or not left or not right:
            raise SettingsError(
                name, raw, "expected action:action pairs, comma-separated"
            )
        pairs.append((left, right))
    return tuple(pairs)


def parse_retries(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, raw, "expected a whole number") from None
    if not 0 <= value <= 10:
        raise SettingsError(name, raw, "expected 0 to 10")
    return value


def parse_path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(name, raw, "expected a path")
    return Path(raw.split(":", 1)[0] if name == "STATE_DIRECTORY" else raw)


def parse_database_url(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not value.startswith(("postgresql://", "postgres://")):
        raise SettingsError(
            name, "<hidden>", "expected a postgresql:// URL (unset for SQLite)"
        )
    return value


def parse_flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(name, raw, "expected true or false")


#: Environment variable -> (Settings field, parser).
ENVIRONMENT_VARIABLES: Final[Mapping[str, tuple[str, Callable[[str, str], object]]]] = {
    "ORCHESTRATOR_PORT": ("port", parse_port),
    "ENVIRONMENT": ("environment", parse_environment),
    "LOG_LEVEL": ("log_level", parse_log_level),
    "DRAIN_TIMEOUT": ("drain_timeout", parse_seconds),
    "MAX_BODY_BYTES": ("max_body_bytes", parse_bytes),
    "HEADER_TIMEOUT": ("header_timeout", parse_positive_seconds),
    "MIN_BODY_RATE": ("min_body_rate", parse_bytes),
    "MAX_CONNECTIONS": ("max_connections", parse_count),
    # systemd's StateDirectory= first, so that STATE_DIR overrides it.
    "STATE_DIRECTORY": ("state_dir", parse_path),
    "STATE_DIR": ("state_dir", parse_path),
    "DATABASE_URL": ("database_url", parse_database_url),
    "STORE_TIMEOUT": ("store_timeout", parse_positive_seconds),
    "TASK_LEASE": ("task_lease", parse_positive_seconds),
    "API_KEYS_FILE": ("api_keys_file", parse_path),
    "AUTH_DISABLED": ("auth_disabled", parse_flag),
    "HEARTBEAT_INTERVAL": ("heartbeat_interval", parse_positive_seconds),
    "UNREACHABLE_AFTER": ("unreachable_after", parse_positive_seconds),
    "AGENT_EXPIRY": ("agent_expiry", parse_positive_seconds),
    "SWEEP_INTERVAL": ("sweep_interval", parse_positive_seconds),
    "AGENT_CONCURRENCY": ("agent_concurrency", parse_count),
    "ATTEMPT_TIMEOUT": ("attempt_timeout", parse_positive_seconds),
    "RETRY_DELAY": ("retry_delay", parse_seconds),
    "RESULT_TTL": ("result_ttl", parse_positive_seconds),
    "BREAKER_THRESHOLD": ("breaker_threshold", parse_count),
    "BREAKER_COOLDOWN": ("breaker_cooldown", parse_positive_seconds),
    "MAX_WAITING_TASKS": ("max_waiting_tasks", parse_count),
    "AGENT_KEY_MAX_AGENTS": ("agent_key_max_agents", parse_count),
    "MAX_ANSWER_BYTES": ("max_answer_bytes", parse_bytes),
    "AGENT_ALLOWED_NETWORKS": ("agent_allowed_networks", parse_cidrs),
    "TASK_TYPES": ("task_types", parse_task_types),
    "APPROVAL_EXPIRY_MEDIUM": ("approval_expiry_medium", parse_positive_seconds),
    "APPROVAL_EXPIRY_HIGH": ("approval_expiry_high", parse_positive_seconds),
    "APPROVAL_EXPIRY_CRITICAL": ("approval_expiry_critical", parse_positive_seconds),
    "CRITICAL_APPROVERS": ("critical_approvers", parse_count),
    "CONTRADICTORY_ACTIONS": ("contradictory_actions", parse_action_pairs),
    "PLAN_TEMPLATES_FILE": ("plan_templates_file", parse_path),
    "COORDINATION_INTERVAL": ("coordination_interval", parse_positive_seconds),
    "PLAN_STEP_RETRIES": ("plan_step_retries", parse_retries),
    "COORDINATION_RETENTION": ("coordination_retention", parse_positive_seconds),
    "EVENT_RETENTION": ("event_retention", parse_positive_seconds),
    "NOTIFY_SOCKET": ("notify_socket", parse_text),
    "WATCHDOG_USEC": ("watchdog_usec", parse_microseconds),
}


def read_environment(
    environ: Mapping[str, str] | None = None, dotenv_path: Path | None = None
) -> dict[str, str]:
    """
    The raw configuration: the real environment over the C{.env} file.

    A C{.env} value never overrides a variable set in the real environment.
    """
    if environ is None:
        environ = os.environ
    if dotenv_path is None:
        dotenv_path = Path.cwd() / ".env"
    merged: dict[str, str] = {}
    if dotenv_path.is_file():
        for key, value in dotenv_values(dotenv_path).items():
            if value is not None:
                merged[key] = value
    merged.update(environ)
    return merged


#: Seconds between a replica's lease renewals (the router's periodic pass).
RENEW_EVERY: Final = 1.0


def least_lease(store_timeout: float) -> float:
    """
    The shortest TASK_LEASE that a replica keeps renewed: two renewals fit
    in it, each of which may wait STORE_TIMEOUT for the database.  A shorter
    one lapses while its calls are open, and another replica sends the task
    again: two deliveries at once.
    """
    return 2 * (RENEW_EVERY + store_timeout)


def check_lease(values: Mapping[str, object]) -> None:
    defaults = attrs.fields(Settings)
    lease = cast(float, values.get("task_lease", defaults.task_lease.default))
    timeout = cast(float, values.get("store_timeout", defaults.store_timeout.default))
    if lease < least_lease(timeout):
        raise SettingsError(
            "TASK_LEASE",
            f"{lease:g}",
            f"must be at least {least_lease(timeout):g} s (2 x (1 s + STORE_TIMEOUT))"
            " so that it is renewed before it lapses",
        )


@attrs.frozen
class Override:
    """A command-line value for one variable, and the option it came from."""

    option: str
    value: str


def build_settings(
    raw: Mapping[str, str],
    overrides: Mapping[str, Override] | None = None,
    pid: int | None = None,
) -> Settings:
    """
    Validate C{raw} (from L{read_environment}) and C{overrides} (command-line
    options keyed by environment variable name) into one L{Settings}.

    @raise SettingsError: naming the first variable (or option) with a bad value.
    """
    values: dict[str, object] = {}
    for variable, (field, parse) in ENVIRONMENT_VARIABLES.items():
        override = (overrides or {}).get(variable)
        if override is not None:
            values[field] = parse(override.option, override.value)
        elif variable in raw:
            values[field] = parse(variable, raw[variable])
    environment = values.get("environment", "development")
    if (
        environment == "production"
        and values.get("api_keys_file") is None
        and not values.get("auth_disabled", False)
    ):
        raise SettingsError(
            "API_KEYS_FILE",
            "",
            "required when ENVIRONMENT=production (or set AUTH_DISABLED=true"
            " to run without access control)",
        )
    check_lease(values)
    # systemd names the process the watchdog is meant for; a child ignores it.
    watchdog_pid = raw.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        values.pop("watchdog_usec", None)
    return Settings(**values)  # type: ignore[arg-type]
