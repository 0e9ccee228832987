"""Settings: options > environment > .env > defaults, and loud failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from optiinfra.settings import (
    Override,
    Settings,
    SettingsError,
    build_settings,
    read_environment,
)


def test_defaults_match_the_contract() -> None:
    settings = build_settings({})
    assert settings == Settings()
    assert settings.port == "tcp:8080"
    assert settings.environment == "development"
    assert settings.log_level == "info"
    assert settings.drain_timeout == 10.0
    assert settings.max_body_bytes == 1024 * 1024
    assert not settings.is_production


def test_environment_values_are_parsed() -> None:
    settings = build_settings(
        {
            "ORCHESTRATOR_PORT": "9090",
            "ENVIRONMENT": "Production",
            "LOG_LEVEL": "WARNING",
            "DRAIN_TIMEOUT": "2.5",
            "MAX_BODY_BYTES": "2048",
            "API_KEYS_FILE": "/etc/optiinfra/keys",
        }
    )
    assert settings.port == "tcp:9090"
    assert settings.is_production
    assert settings.log_level == "warn"
    assert settings.drain_timeout == 2.5
    assert settings.max_body_bytes == 2048


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8080:interface=127.0.0.1",
        "tcp6:8080:interface=\\:\\:1",
        "unix:/run/optiinfra.sock",
        "systemd:domain=INET:index=0",
    ],
)
def test_endpoint_strings_pass_through(endpoint: str) -> None:
    assert build_settings({"ORCHESTRATOR_PORT": endpoint}).port == endpoint


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCHESTRATOR_PORT", "abc"),
        ("ORCHESTRATOR_PORT", "70000"),
        ("ORCHESTRATOR_PORT", ""),
        ("LOG_LEVEL", "loud"),
        ("DRAIN_TIMEOUT", "-1"),
        ("DRAIN_TIMEOUT", "soon"),
        ("DRAIN_TIMEOUT", "nan"),
        ("MAX_BODY_BYTES", "0"),
        ("MAX_BODY_BYTES", "1MB"),
        ("ENVIRONMENT", "prod env!"),
        ("WATCHDOG_USEC", "0"),
        ("WATCHDOG_USEC", "x"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        build_settings({variable: value})
    assert raised.value.name == variable
    assert raised.value.value == value
    assert variable in str(raised.value)


def test_options_override_the_environment_and_are_named_when_bad() -> None:
    raw = {"ORCHESTRATOR_PORT": "9090", "DRAIN_TIMEOUT": "3"}
    settings = build_settings(raw, {"ORCHESTRATOR_PORT": Override("--port", "7070")})
    assert (settings.port, settings.drain_timeout) == ("tcp:7070", 3.0)
    with pytest.raises(SettingsError) as raised:
        build_settings(raw, {"DRAIN_TIMEOUT": Override("--drain-timeout", "-5")})
    assert raised.value.name == "--drain-timeout"


def test_dotenv_never_overrides_the_real_environment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LOG_LEVEL=debug\nENVIRONMENT=staging\n# comment\nEMPTY\n")
    raw = read_environment({"LOG_LEVEL": "error"}, dotenv)
    assert raw["LOG_LEVEL"] == "error"
    assert raw["ENVIRONMENT"] == "staging"
    assert "EMPTY" not in raw


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert read_environment({"A": "1"}, tmp_path / ".env") == {"A": "1"}


def test_watchdog_is_ignored_when_meant_for_another_process() -> None:
    raw = {"NOTIFY_SOCKET": "/run/notify", "WATCHDOG_USEC": "30000000"}
    assert build_settings(raw, pid=42).watchdog_usec == 30_000_000
    mine = build_settings({**raw, "WATCHDOG_PID": "42"}, pid=42)
    assert mine.watchdog_usec == 30_000_000
    theirs = build_settings({**raw, "WATCHDOG_PID": "7"}, pid=42)
    assert theirs.watchdog_usec is None
    assert theirs.notify_socket == "/run/notify"


def test_store_and_registry_settings() -> None:
    settings = build_settings(
        {
            "STATE_DIRECTORY": "/var/lib/optiinfra:/var/lib/other",
            "DATABASE_URL": "postgresql://u:secret@db/optiinfra",
            "API_KEYS_FILE": "/etc/optiinfra/keys",
            "AUTH_DISABLED": "no",
            "HEARTBEAT_INTERVAL": "10",
            "AGENT_EXPIRY": "120",
            "SWEEP_INTERVAL": "1",
        }
    )
    assert settings.state_dir == Path("/var/lib/optiinfra")  # systemd's first
    assert settings.database_url == "postgresql://u:secret@db/optiinfra"
    assert settings.api_keys_file == Path("/etc/optiinfra/keys")
    assert settings.auth_disabled is False
    assert settings.silent_after == 15.0  # one and a half intervals
    assert build_settings({"UNREACHABLE_AFTER": "7"}).silent_after == 7.0
    both = build_settings({"STATE_DIRECTORY": "/a", "STATE_DIR": "/b"})
    assert both.state_dir == Path("/b")
    assert build_settings({"DATABASE_URL": ""}).database_url is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://x"),
        ("AUTH_DISABLED", "maybe"),
        ("HEARTBEAT_INTERVAL", "0"),
        ("STATE_DIR", " "),
    ],
)
def test_invalid_store_settings(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        build_settings({variable: value})
    assert raised.value.name == variable
    if variable == "DATABASE_URL":
        assert raised.value.value == "<hidden>"  # it may hold a password


def test_production_needs_keys_unless_auth_is_disabled() -> None:
    with pytest.raises(SettingsError) as raised:
        build_settings({"ENVIRONMENT": "production"})
    assert raised.value.name == "API_KEYS_FILE"
    assert build_settings({"ENVIRONMENT": "production", "AUTH_DISABLED": "true"})


def test_coordination_settings() -> None:
    settings = build_settings(
        {
            "APPROVAL_EXPIRY_MEDIUM": "60",
            "APPROVAL_EXPIRY_HIGH": "30",
            "APPROVAL_EXPIRY_CRITICAL": "10",
            "CRITICAL_APPROVERS": "3",
            "CONTRADICTORY_ACTIONS": "drain:fill, warm:cool,",
            "PLAN_TEMPLATES_FILE": "/etc/optiinfra/plans.json",
            "COORDINATION_INTERVAL": "0.5",
        }
    )
    assert (
        settings.approval_expiry_medium,
        settings.approval_expiry_high,
        settings.approval_expiry_critical,
    ) == (60.0, 30.0, 10.0)
    assert settings.critical_approvers == 3
    assert settings.contradictory_actions == (("drain", "fill"), ("warm", "cool"))
    assert settings.plan_templates_file == Path("/etc/optiinfra/plans.json")
    assert settings.coordination_interval == 0.5
    defaults = build_settings({})
    assert defaults.approval_expiry_critical == 4 * 3600
    assert defaults.critical_approvers == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONTRADICTORY_ACTIONS", "scale_up"),
        ("CONTRADICTORY_ACTIONS", "a:"),
        ("APPROVAL_EXPIRY_HIGH", "0"),
        ("CRITICAL_APPROVERS", "none"),
    ],
)
def test_invalid_coordination_settings(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        build_settings({variable: value})
    assert raised.value.name == variable


def test_plan_step_retries_and_retention() -> None:
    settings = build_settings(
        {"PLAN_STEP_RETRIES": "0", "COORDINATION_RETENTION": "3600"}
    )
    assert settings.plan_step_retries == 0
    assert settings.coordination_retention == 3600.0
    for bad in ("-1", "11", "x"):
        with pytest.raises(SettingsError) as raised:
            build_settings({"PLAN_STEP_RETRIES": bad})
        assert raised.value.name == "PLAN_STEP_RETRIES"


def test_agent_trust_settings() -> None:
    settings = build_settings(
        {
            "AGENT_KEY_MAX_AGENTS": "7",
            "MAX_ANSWER_BYTES": "65536",
            "AGENT_ALLOWED_NETWORKS": "10.0.0.0/8, fd00::/8,",
            "TASK_TYPES": "warm_cache, resize_disk",
        }
    )
    assert settings.agent_key_max_agents == 7
    assert settings.max_answer_bytes == 65536
    assert [str(n) for n in settings.agent_allowed_networks or ()] == [
        "10.0.0.0/8",
        "fd00::/8",
    ]
    assert settings.task_types == {"warm_cache", "resize_disk"}
    defaults = build_settings({})
    assert (defaults.agent_key_max_agents, defaults.max_answer_bytes) == (100, 4 << 20)
    assert defaults.agent_allowed_networks is None
    assert defaults.task_types == frozenset()


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("AGENT_KEY_MAX_AGENTS", "0", "expected at least 1"),
        ("MAX_ANSWER_BYTES", "4MB", "expected a whole number of bytes"),
        ("AGENT_ALLOWED_NETWORKS", "10.0.0.0/8,intranet", "'intranet' is not a CIDR"),
        ("AGENT_ALLOWED_NETWORKS", " , ", "expected at least one CIDR network"),
        ("TASK_TYPES", "warm_cache,Resize-Disk", "'Resize-Disk' is not a task type"),
    ],
)
def test_invalid_agent_trust_settings(variable: str, value: str, reason: str) -> None:
    with pytest.raises(SettingsError) as raised:
        build_settings({variable: value})
    assert raised.value.name == variable
    assert reason in raised.value.reason
