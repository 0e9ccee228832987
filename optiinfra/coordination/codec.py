"""
Approvals and plans as stored JSON documents, and back.

The store keeps each as one document with its status and version beside it in
columns, so a change is one compare-and-set on the version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from optiinfra.coordination.approvals import Approval, Decision
from optiinfra.coordination.model import Recommendation, Window
from optiinfra.coordination.plans import Plan, Step


def _plain(value: object) -> Any:
    return attrs.asdict(value, recurse=True)  # type: ignore[arg-type]


def recommendation_from(document: Mapping[str, Any]) -> Recommendation:
    values = dict(document)
    window = values.get("window")
    values["window"] = None if window is None else Window(**window)
    values["affected_resources"] = tuple(values["affected_resources"])
    values["dependencies"] = tuple(values["dependencies"])
    return Recommendation(**values)


def encode_approval(approval: Approval) -> str:
    document = _plain(approval)
    del document["version"]
    return orjson.dumps(document).decode()


def decode_approval(text: str, version: int) -> Approval:
    values = orjson.loads(text)
    values["recommendation"] = recommendation_from(values["recommendation"])
    values["decisions"] = tuple(Decision(**d) for d in values["decisions"])
    values["after"] = tuple(values["after"])
    return Approval(**values, version=version)


def encode_plan(plan: Plan) -> str:
    document = _plain(plan)
    del document["version"]
    return orjson.dumps(document).decode()


def decode_plan(text: str, version: int) -> Plan:
    values = orjson.loads(text)
    values["recommendation"] = recommendation_from(values["recommendation"])
    values["steps"] = tuple(Step(**s) for s in values["steps"])
    values["after"] = tuple(values["after"])
    return Plan(**values, version=version)
