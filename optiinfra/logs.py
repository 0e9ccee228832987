"""
One JSON object per line on stdout, for every event the process logs.

Twisted's own events, Klein failures, structlog application events and the access
log all travel through Twisted's log publisher and are rendered here by
L{JsonLogObserver}.  Application code logs through structlog; L{configure_structlog}
makes structlog hand its events to the same publisher, so there is one path out.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any, Final, cast

import orjson
import structlog
from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

from optiinfra.timefmt import rfc3339_ms

#: Settings' level names -> Twisted levels.
LEVELS: Final[Mapping[str, LogLevel]] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

#: structlog's numeric levels (the stdlib's) -> Twisted levels.
_STRUCTLOG_LEVELS: Final[Mapping[str, LogLevel]] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "exception": LogLevel.error,
    "critical": LogLevel.critical,
    "fatal": LogLevel.critical,
}
_STDLIB_NUMBERS: Final[Mapping[str, int]] = {
    "debug": 10,
    "info": 20,
    "warn": 30,
    "error": 40,
}

#: Keys of Twisted (and legacy twisted.python.log) events that are plumbing, not
#: fields worth a column in the output.
_PLUMBING: Final = frozenset(
    {
        "format",
        "message",
        "isError",
        "system",
        "time",
        "why",
        "failure",
        "log_trace",
        "event",
        "log_io",
    }
)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _default(value: object) -> str:
    return _safe_repr(value)


def render_event(event: Mapping[str, Any]) -> bytes:
    """Render one Twisted log event as a JSON line (with its newline)."""
    level = event.get("log_level") or LogLevel.info
    record: dict[str, Any] = {
        "timestamp": rfc3339_ms(event.get("log_time") or time.time()),
        "level": getattr(level, "name", None) or str(level),
        "logger": event.get("log_namespace", "-"),
        "message": event["event"]
        if "event" in event and event.get("log_format") is None
        else formatEvent(dict(event)),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _PLUMBING or key in record:
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["exception"] = failure.getTraceback()
    return orjson.dumps(
        record,
        default=_default,
        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS,
    )


@implementer(ILogObserver)
class JsonLogObserver:
    """
    Write each event at or above C{level} to C{stream} as one JSON line.

    C{stream} must be a binary stream that is not C{sys.stdout}: twistd replaces
    that with a logging file, and writing to it would loop.
    """

    def __init__(self, stream: IO[bytes], level: LogLevel = LogLevel.info) -> None:
        self._stream = stream
        self._level = level

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = event.get("log_level") or LogLevel.info
        if level < self._level:
            return
        try:
            line = render_event(event)
        except Exception as error:  # never lose a line to a bad field
            line = orjson.dumps(
                {
                    "timestamp": rfc3339_ms(time.time()),
                    "level": "error",
                    "logger": "optiinfra.logs",
                    "message": "could not render a log event",
                    "error": _safe_repr(error),
                    "keys": sorted(str(key) for key in event),
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        self._stream.write(line)
        self._stream.flush()


class AccessLog:
    """
    Writes access records straight to a stream as JSON lines.

    The access line is the hottest log path (one per request), so it skips the
    log publisher and the generic event rendering; its records already have the
    shape every other line has (timestamp, level, logger, message, fields).
    """

    def __init__(self, stream: IO[bytes], level: LogLevel = LogLevel.info) -> None:
        self._stream = stream
        self._quiet_info = level > LogLevel.info

    def __call__(self, record: dict[str, Any]) -> None:
        if self._quiet_info and record["level"] == "info":
            return
        self._stream.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self._stream.flush()


class _TwistedSink:
    """structlog's "logger": hands finished event dicts to a Twisted publisher."""

    def __init__(self, publisher: Callable[[dict[str, Any]], None], name: str) -> None:
        self._publisher = publisher
        self._name = name

    def _emit(self, level: LogLevel, event: dict[str, Any]) -> None:
        event.setdefault("log_namespace", self._name)
        event["log_level"] = level
        event["log_time"] = time.time()
        event["log_format"] = None
        event["log_source"] = None
        self._publisher(event)

    def __getattr__(self, method: str) -> Callable[..., None]:
        level = _STRUCTLOG_LEVELS.get(method, LogLevel.info)

        def emit(**event: Any) -> None:
            self._emit(level, event)

        return emit


def _to_sink(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Last processor: turn structlog's C{logger} key into the namespace."""
    name = event_dict.pop("logger", None)
    if name is not None:
        event_dict["log_namespace"] = name
    return dict(event_dict)


def _format_exception(
    _: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Put C{exc_info} tracebacks in one C{exception} field."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        event_dict["exception"] = structlog.processors.format_exc_info(
            None, method, {"exc_info": exc_info}
        ).get("exception")
    return event_dict


def configure_structlog(
    level: str, publisher: LogPublisher | Callable[[dict[str, Any]], None] | None = None
) -> None:
    """
    Route structlog into Twisted's log publisher.

    structlog's configuration is process-wide by design; this is called once by
    the twistd plugin (and by tests that want to see application events).
    """
    target = globalLogPublisher if publisher is None else publisher
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _format_exception,
            _to_sink,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_STDLIB_NUMBERS[level]),
        logger_factory=lambda *args: _TwistedSink(
            target, str(args[0]) if args else "optiinfra"
        ),
        cache_logger_on_first_use=False,
    )


#: The level the twistd observer factory uses.  twistd calls the factory with no
#: arguments, after the plugin's options are parsed but with no way to hand it
#: those options, so L{configure} leaves the level here for it.
_factory_level: list[LogLevel] = [LogLevel.info]


def configure(level: str) -> None:
    """Set the level for L{stdout_observer} and route structlog into Twisted."""
    _factory_level[0] = LEVELS[level]
    configure_structlog(level)


def stdout_observer() -> JsonLogObserver:
    """twistd's C{--logger} factory: JSON lines on the real standard output."""
    return JsonLogObserver(real_stdout(), _factory_level[0])


def real_stdout() -> IO[bytes]:
    """The process's own standard output (twistd replaces C{sys.stdout})."""
    return cast(IO[bytes], getattr(sys.__stdout__, "buffer", None) or sys.__stdout__)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry C{logger=name}."""
    return structlog.get_logger(name)
