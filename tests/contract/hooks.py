"""
Schemathesis hooks for C{make contract}: the rules of this API that JSON Schema
cannot state, applied to the data schemathesis means to be valid (positive
cases) only; negative cases are left exactly as generated.

Each rule here is also in the README (Contract tests), with why the document
cannot say it:

  - C{POST /tasks}: a task type outside the contract's nine is accepted only
    when an agent of C{agent_type} offers it now (state, not shape);
  - C{POST /coordination/coordinate}: a recommendation's C{customer_id}, when
    given, must be the request's (one field equal to another); its window's
    C{end} must be after its C{start}; its times must be real (no 30
    February: a pattern cannot know the calendar); recommendation ids must
    differ (unique by one key of the items);
  - approving or rejecting with API keys: C{user_id}, when given, must be the
    key's own name (who the caller is, not what the body looks like);
  - every body: an integer beyond 64 bits anywhere, free-form objects
    included, is refused (Limits); a schema saying so of free-form JSON would
    be recursive, which the generator cannot draw from;
  - a path parameter schemathesis fills from a link with an empty value (a
    task's C{agent_id} is null until it is sent) is not data the document
    calls valid: such cases are dropped.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

import schemathesis
from schemathesis import GenerationMode

from optiinfra.routing.model import TASK_TYPES

_BY_AGENT = {agent: task for task, agent in sorted(TASK_TYPES.items(), reverse=True)}
_LOWEST, _HIGHEST = -(2**63), 2**64 - 1


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


def _within_64_bits(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if _LOWEST <= value <= _HIGHEST else 0
    if isinstance(value, list):
        return [_within_64_bits(item) for item in value]
    if isinstance(value, dict):
        return {key: _within_64_bits(item) for key, item in value.items()}
    return value


_SOME_TIME = "2025-10-16T12:00:00Z"
#: The name of the key the run calls with (set by L{tests.contract.run}).
_KEY_NAME = os.environ.get("CONTRACT_KEY_NAME")


def _moment(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        datetime.fromtimestamp(moment.timestamp())
    except (ValueError, OverflowError, OSError):
        return None
    return moment


def _recommendation(recommendation: dict[str, Any], index: int, customer: Any) -> None:
    """One recommendation made true to the rules between its fields."""
    if isinstance(recommendation.get("customer_id"), str):
        recommendation["customer_id"] = customer
    for key in ("created_at", "expires_at"):
        if isinstance(recommendation.get(key), str) and not _moment(
            recommendation[key]
        ):
            recommendation[key] = _SOME_TIME
    window = recommendation.get("window")
    if isinstance(window, dict):
        start = _moment(window.get("start")) or _moment(_SOME_TIME)
        end = _moment(window.get("end"))
        assert start is not None
        if end is None or end <= start:
            end = start + timedelta(hours=1)
        window["start"] = start.isoformat()
        window["end"] = end.isoformat()


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    if not _positive(case):
        return True
    return "" not in (case.path_parameters or {}).values()


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if not _positive(case) or not isinstance(case.body, dict):
        return case
    body = _within_64_bits(case.body)
    if case.method.upper() == "POST" and case.path == "/tasks":
        agent_type, task_type = body.get("agent_type"), body.get("task_type")
        if agent_type in _BY_AGENT and task_type not in TASK_TYPES:
            body["task_type"] = _BY_AGENT[agent_type]
    if case.method.upper() == "POST" and case.path == "/coordination/coordinate":
        customer = body.get("customer_id")
        seen: set[Any] = set()
        for index, recommendation in enumerate(body.get("recommendations") or []):
            if not isinstance(recommendation, dict):
                continue
            _recommendation(recommendation, index, customer)
            if recommendation.get("id") in seen:
                recommendation["id"] = f"r{index}"
            seen.add(recommendation.get("id"))
    decision = case.path.endswith(("/approve", "/reject"))
    if decision and _KEY_NAME and isinstance(body.get("user_id"), str):
        body["user_id"] = _KEY_NAME
    case.body = body
    return case
