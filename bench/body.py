"""
What the body reader's checks (depth, integers beyond 64 bits) cost per request.

    .venv/bin/python bench/body.py            # ~10 s
    .venv/bin/python bench/body.py --number 20000 --repeat 3

In one process, same run: C{optiinfra.web.body.read_json} against the bare
C{orjson.loads} of the same bytes, for the bodies the service sees most (a
heartbeat, a 1 KB task) and for the ones that take the slow paths (over 64
brackets, a run of 19 digits).  Best of C{--repeat} timings; the difference is
what the checks add.  Exit status 0.
"""

from __future__ import annotations

import argparse
import io
import sys
import timeit
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _shared import table

from optiinfra.web.body import read_json


class _Request:
    """The two things read_json asks of a request."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def getHeader(self, name: bytes) -> bytes:
        return b"application/json"

    @property
    def content(self) -> io.BytesIO:
        return io.BytesIO(self._raw)


def bodies() -> dict[str, bytes]:
    task = {"task_type": "analyze_cost", "agent_type": "cost"}
    return {
        "heartbeat": orjson.dumps(
            {
                "status": "healthy",
                "metadata": {"cpu": 0.5, "gpu": [0.1, 0.2], "model": "llama-3-70b"},
            }
        ),
        "task, 1 KB": orjson.dumps(
            {
                **task,
                "parameters": {
                    f"k{i}": {"v": i, "w": [i, i + 1.5, "x" * 10]} for i in range(20)
                },
            }
        ),
        "task, 300 containers": orjson.dumps(
            {**task, "parameters": {"rows": [[{"a": [i]}] for i in range(75)]}}
        ),
        "task, 19-digit id": orjson.dumps(
            {**task, "parameters": {"trace": "1234567890123456789012"}}
        ),
    }


def best(function: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def measure(raw: bytes, number: int, repeat: int) -> tuple[float, float]:
    """Microseconds per body: bare orjson, then the checked reader."""
    request = _Request(raw)
    bare = best(lambda: orjson.loads(io.BytesIO(raw).read()), number, repeat)
    return bare, best(lambda: read_json(request), number, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    row = table(
        "A request body read: bare orjson, then the checked reader",
        "body 24|bytes 7|orjson µs 12|read_json µs 15|added 9",
    )
    for name, raw in bodies().items():
        bare, checked = measure(raw, args.number, args.repeat)
        row((name, len(raw), f"{bare:.2f}", f"{checked:.2f}", f"{checked - bare:+.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
