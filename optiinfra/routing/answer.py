"""
Reading an agent's answer without trusting it: at most C{cap} bytes, on the
wire and once inflated.

An announced length over the cap is refused before a byte is read; a body that
grows past the cap while it streams has its connection closed there and then;
a compressed body (never asked for: the call says C{Accept-Encoding:
identity}) is inflated only up to the cap.  Memory per answer is therefore
bounded by the cap, whatever the agent sends.
"""

from __future__ import annotations

import zlib
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

#: Encodings inflated, should an agent send one unasked; zlib's window bits
#: for each (47 reads gzip and zlib alike, -15 raw deflate).
_INFLATED: Final = {b"gzip": 47, b"x-gzip": 47, b"deflate": 47}


class AnswerRefused(Exception):
    """The answer broke a limit or a rule; the message says which."""


class _Capped(Protocol):
    """Collects a body of at most C{cap} bytes, inflating it if need be."""

    def __init__(
        self,
        cap: int,
        done: Deferred[bytes],
        inflater: Any | None = None,
        refusal: str | None = None,
    ) -> None:
        self._cap = cap
        self._done = done
        self._inflater = inflater
        self._refusal = refusal
        self._parts: list[bytes] = []
        self._wire = 0
        self._size = 0

    def connectionMade(self) -> None:
        if self._refusal is not None:
            self.refuse(self._refusal)

    def refuse(self, reason: str) -> None:
        """Stop reading, close the connection, and fail the answer."""
        self._parts.clear()
        if self.transport is not None:
            self.transport.loseConnection()
        if not self._done.called:
            self._done.errback(AnswerRefused(reason))

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._wire += len(data)
        if self._wire > self._cap:
            self.refuse(f"the agent's answer is larger than {self._cap} bytes")
            return
        if self._inflater is not None:
            room = self._cap - self._size
            try:
                data = self._inflater.decompress(data, room + 1)
            except zlib.error as error:
                self.refuse(f"the agent's compressed answer is corrupt: {error}")
                return
            if len(data) > room or self._inflater.unconsumed_tail:
                self.refuse(
                    f"the agent's answer inflates to more than {self._cap} bytes"
                )
                return
        self._size += len(data)
        self._parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if self._inflater is not None:
                rest = self._inflater.flush()
                if self._size + len(rest) > self._cap:
                    self.refuse(
                        f"the agent's answer inflates to more than {self._cap} bytes"
                    )
                    return
                self._parts.append(rest)
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


def read_answer(response: IResponse, cap: int) -> Deferred[bytes]:
    """
    The body of C{response}, at most C{cap} bytes once inflated.

    Fails with L{AnswerRefused} past the cap or for an encoding it cannot read,
    with the connection closed; cancelling it closes the connection too.
    """
    protocol: _Capped | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    done: Deferred[bytes] = Deferred(cancel)
    encodings = response.headers.getRawHeaders(b"content-encoding") or []
    encoding = b",".join(encodings).strip().lower()
    inflater = None
    refusal: str | None = None
    if encoding in _INFLATED:
        inflater = zlib.decompressobj(_INFLATED[encoding])
    elif encoding not in (b"", b"identity"):
        refusal = (
            "the agent's answer has a content encoding that was not asked for: "
            f"{encoding.decode('latin-1')[:64]!r}"
        )
    length = response.length
    if length is not UNKNOWN_LENGTH and isinstance(length, int) and length > cap:
        refusal = (
            f"the agent announced an answer of {length} bytes; "
            f"at most {cap} are accepted"
        )
    protocol = _Capped(cap, done, inflater, refusal)
    response.deliverBody(protocol)
    return done
