"""Every event becomes one flat JSON line with timestamp, level, logger, message."""

from __future__ import annotations

import io
from typing import Any

import orjson
import structlog
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from optiinfra.logs import JsonLogObserver, configure_structlog, render_event


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_twisted_events_are_rendered_with_their_fields() -> None:
    stream = io.BytesIO()
    publisher = LogPublisher(JsonLogObserver(stream))
    Logger(namespace="twisted.test", observer=publisher).info(
        "listening on {port}", port=8080
    )
    [line] = lines(stream)
    assert line["message"] == "listening on 8080"
    assert line["level"] == "info"
    assert line["logger"] == "twisted.test"
    assert line["port"] == 8080
    assert line["timestamp"].endswith("Z")


def test_failures_are_one_line_with_the_traceback() -> None:
    stream = io.BytesIO()
    publisher = LogPublisher(JsonLogObserver(stream))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        Logger(namespace="x", observer=publisher).failure("it broke", Failure())
    assert stream.getvalue().count(b"\n") == 1
    [line] = lines(stream)
    assert line["level"] == "critical"
    assert "ZeroDivisionError" in line["exception"]


def test_level_filter() -> None:
    stream = io.BytesIO()
    publisher = LogPublisher(JsonLogObserver(stream, LogLevel.warn))
    log = Logger(namespace="x", observer=publisher)
    log.info("hidden")
    log.warn("shown")
    assert [line["message"] for line in lines(stream)] == ["shown"]


def test_unrenderable_events_still_produce_a_line() -> None:
    stream = io.BytesIO()
    # A tuple as a key is beyond JSON: the line says so instead of vanishing.
    JsonLogObserver(stream)({"log_format": None, "event": "e", "x": {(1, 2): 3}})
    [line] = lines(stream)
    assert line["message"] == "could not render a log event"
    assert "x" in line["keys"]


def test_non_json_values_are_rendered_with_repr() -> None:
    line = orjson.loads(render_event({"event": "e", "log_format": None, "obj": {1}}))
    assert line["obj"] == "{1}"


def test_structlog_events_flow_into_the_twisted_publisher() -> None:
    events: list[dict[str, Any]] = []
    configure_structlog("info", publisher=events.append)
    log = structlog.get_logger("optiinfra.test")
    log.debug("too quiet")
    log.info("registered", agent_id="a1")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    assert [e["event"] for e in events] == ["registered", "failed"]
    assert events[0]["log_namespace"] == "optiinfra.test"
    assert events[0]["log_level"] == LogLevel.info
    assert events[1]["log_level"] == LogLevel.error
    assert "ValueError: bad" in events[1]["exception"]
    rendered = orjson.loads(render_event(events[0]))
    assert rendered["message"] == "registered"
    assert rendered["agent_id"] == "a1"
