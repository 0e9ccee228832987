"""
Request fields declared once: each declaration reads its field from a body
(through L{Fields}, which refuses what it must) and describes it as the JSON
Schema the OpenAPI document publishes.  The module owning a body declares its
fields; its parser reads through them and C{optiinfra.openapi} builds the
component from them, so a limit, pattern, default or enum has one home and the
document cannot drift from what is enforced.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, Final, Protocol

import attrs

from optiinfra.validation import MAX_DOCUMENT, MAX_LIST, MAX_TEXT, TOKEN, Fields

#: One line of printable text, not only whitespace: what L{Fields.text} keeps.
LINE: Final = r"^(?=[\s\S]*\S)[^\x00-\x1f\x7f]*$"
#: Prose: the same, but lines may break and tabulate (C{multiline}).
PROSE: Final = r"^(?=[\s\S]*\S)[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def whole(pattern: re.Pattern[str], *, not_blank: bool = False) -> str:
    """
    A Python pattern used with C{fullmatch}, as an anchored JSON Schema one;
    C{not_blank} adds that the text is not only whitespace, for patterns that
    would allow that.
    """
    ahead = r"(?=[\s\S]*\S)" if not_blank else ""
    return f"^{ahead}(?:{pattern.pattern})$"


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """C{schema}, or JSON C{null}: optional fields sent as C{null} are absent."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    result = dict(schema)
    kind = result["type"]
    result["type"] = [*(kind if isinstance(kind, list) else [kind]), "null"]
    if "enum" in result:
        result["enum"] = [*result["enum"], None]
    return result


class Declared(Protocol):
    """A body field: its key, whether it must be there, and its schema."""

    @property
    def key(self) -> str: ...

    @property
    def required(self) -> bool: ...

    def schema(self) -> dict[str, Any]: ...


def _described(
    schema: dict[str, Any], description: str, examples: tuple[Any, ...]
) -> dict[str, Any]:
    if description:
        schema["description"] = description
    if examples:
        schema["examples"] = list(examples)
    return schema


@attrs.frozen
class Text:
    """One line of text: never blank, no control characters, at most C{max_length}."""

    key: str
    pattern: re.Pattern[str] | None = None
    max_length: int = MAX_TEXT
    required: bool = True
    default: str | None = None
    description: str = ""
    examples: tuple[Any, ...] = ()
    #: The published pattern when the reader checks the shape itself (a URL).
    shape: str | None = None
    multiline: bool = False
    #: Words the pattern refuses, published as a C{not}: generators handle it
    #: better than a look-ahead.
    excluded: tuple[str, ...] = ()

    def read(self, fields: Fields, *, default: str | None = None) -> str | None:
        return fields.text(
            self.key,
            required=self.required,
            default=self.default if default is None else default,
            pattern=self.pattern,
            max_length=self.max_length,
            multiline=self.multiline,
        )

    def schema(self) -> dict[str, Any]:
        text = PROSE if self.multiline else LINE
        if self.pattern is not None:
            # The not-blank look-ahead only where the pattern would allow
            # blank text: generators (schemathesis) must filter look-aheads.
            text = whole(self.pattern, not_blank=bool(self.pattern.fullmatch(" ")))
        schema: dict[str, Any] = {
            "type": "string",
            "maxLength": self.max_length,
            "pattern": self.shape or text,
        }
        if self.excluded:
            schema["not"] = {"enum": list(self.excluded)}
        if self.default is not None:
            schema["default"] = self.default
        schema = _described(schema, self.description, self.examples)
        return schema if self.required else nullable(schema)


@attrs.frozen
class Integer:
    """A whole number between C{minimum} and C{maximum}."""

    key: str
    minimum: int
    maximum: int
    required: bool = True
    default: int | None = None
    description: str = ""
    examples: tuple[Any, ...] = ()

    def read(self, fields: Fields, *, default: int | None = None) -> int | None:
        return fields.integer(
            self.key,
            minimum=self.minimum,
            maximum=self.maximum,
            required=self.required,
            default=self.default if default is None else default,
        )

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "integer",
            "minimum": self.minimum,
            "maximum": self.maximum,
        }
        if self.default is not None:
            schema["default"] = self.default
        schema = _described(schema, self.description, self.examples)
        return schema if self.required else nullable(schema)


@attrs.frozen
class Number:
    """An optional number between C{minimum} and C{maximum}, else C{default}."""

    key: str
    minimum: float
    maximum: float
    default: float
    description: str = ""
    required: bool = attrs.field(default=False, init=False)

    def read(
        self,
        fields: Fields,
        *,
        maximum: float | None = None,
        default: float | None = None,
    ) -> float:
        return fields.number(
            self.key,
            minimum=self.minimum,
            maximum=self.maximum if maximum is None else maximum,
            default=self.default if default is None else default,
        )

    def schema(self) -> dict[str, Any]:
        return nullable(
            _described(
                {
                    "type": "number",
                    "minimum": self.minimum,
                    "maximum": self.maximum,
                    "default": self.default,
                },
                self.description,
                (),
            )
        )


@attrs.frozen
class Choice:
    """One of C{allowed} (or an alias of one)."""

    key: str
    allowed: tuple[str, ...]
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    required: bool = True
    default: str | None = None
    description: str = ""

    def renamed(self, key: str) -> Choice:
        """The same choice under another key (the two dialects' names)."""
        return attrs.evolve(self, key=key)

    def read(self, fields: Fields) -> str | None:
        return fields.choice(
            self.key,
            self.allowed,
            required=self.required,
            default=self.default,
            aliases=self.aliases,
        )

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "string",
            "enum": [*self.allowed, *self.aliases],
        }
        if self.default is not None:
            schema["default"] = self.default
        schema = _described(schema, self.description, ())
        return schema if self.required else nullable(schema)


@attrs.frozen
class Document:
    """An optional JSON object of any shape, at most C{max_bytes} serialised."""

    key: str
    max_bytes: int = MAX_DOCUMENT
    description: str = ""
    required: bool = attrs.field(default=False, init=False)

    def read(self, fields: Fields) -> dict[str, Any]:
        return fields.mapping(self.key, max_bytes=self.max_bytes)

    def schema(self) -> dict[str, Any]:
        return nullable(
            {
                "type": "object",
                "default": {},
                "description": (
                    self.description
                    or f"Any JSON object, at most {self.max_bytes} bytes serialised."
                ),
            }
        )


@attrs.frozen
class Strings:
    """An optional list of short identifiers; repeats are dropped."""

    key: str
    pattern: re.Pattern[str] = TOKEN
    max_items: int = MAX_LIST
    description: str = ""
    examples: tuple[Any, ...] = ()
    required: bool = attrs.field(default=False, init=False)

    def read(self, fields: Fields) -> tuple[str, ...]:
        return fields.strings(self.key, max_items=self.max_items, pattern=self.pattern)

    def schema(self) -> dict[str, Any]:
        return nullable(
            _described(
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": whole(self.pattern)},
                    "maxItems": self.max_items,
                },
                self.description
                + (" " if self.description else "")
                + "Repeats are dropped.",
                self.examples,
            )
        )


@attrs.frozen
class Reference:
    """
    A field whose schema is a named component (its reader is elsewhere: the
    field's rules belong to a type used in several bodies).
    """

    key: str
    component: str
    required: bool = True
    description: str = ""

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"$ref": f"#/components/schemas/{self.component}"}
        if not self.required:
            schema = nullable(schema)
        if self.description:
            schema["description"] = self.description
        return schema


def body_schema(
    declared: Collection[Declared],
    description: str,
    *,
    described: Mapping[str, dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """
    The object schema of a body made of C{declared} fields; C{described}
    are optional fields read by hand whose schema is given as is (a field
    with two shapes, such as a priority by number or by name).
    """
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": {field.key: field.schema() for field in declared}
        | dict(described or {}),
    }
    required = [field.key for field in declared if field.required]
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema
