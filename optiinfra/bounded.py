"""
Text from untrusted peers, cut to a size a log line and an error field can hold.
"""

from __future__ import annotations

from typing import Final

#: Bytes of an agent's text kept in errors and logs.
MAX_TEXT_BYTES: Final = 4096


def bounded(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """
    C{text}, or its first C{limit} bytes (UTF-8) and a note that says how long
    it was: a cut message must not pass for the whole one.
    """
    if len(text) <= limit // 4:  # four bytes a character at most: surely short
        return text
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    kept = encoded[:limit].decode("utf-8", "ignore")
    return f"{kept}... [truncated: {len(encoded)} bytes in all]"
