"""
Schemathesis hooks for C{make contract}: the rules of this API that JSON Schema
cannot state, applied to the data schemathesis means to be valid (positive
cases) only; negative cases are left exactly as generated.

Each rule here is also in the README (Contract tests), with why the document
cannot say it:

  - C{POST /tasks}: a task type outside the contract's nine is accepted only
    when an agent of C{agent_type} offers it now (state, not shape);
  - C{POST /coordination/coordinate}: a recommendation's C{customer_id}, when
    given, must be the request's (one field equal to another);
  - every body: an integer beyond 64 bits anywhere, free-form objects
    included, is refused (Limits); a schema saying so of free-form JSON would
    be recursive, which the generator cannot draw from;
  - a path parameter schemathesis fills from a link with an empty value (a
    task's C{agent_id} is null until it is sent) is not data the document
    calls valid: such cases are dropped.
"""

from __future__ import annotations

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
        for recommendation in body.get("recommendations") or []:
            if isinstance(recommendation, dict) and isinstance(
                recommendation.get("customer_id"), str
            ):
                recommendation["customer_id"] = customer
    case.body = body
    return case
