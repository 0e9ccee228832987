"""
Baseline (c): a plain twisted.web Resource answering GET /health, no logging.

    python bench/baseline_web.py --port 8082

Started by bench/health.py; runnable on its own for poking at it.
"""

from __future__ import annotations

from typing import Any

from _shared import health_body, parse_args, serve
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Health(Resource):
    isLeaf = True

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started = started

    def render_GET(self, request: Any) -> bytes:
        return health_body(request, reactor.seconds(), self.started)


def main() -> None:
    args = parse_args("plain twisted.web /health baseline")
    root = Resource()
    root.putChild(b"health", Health(reactor.seconds()))
    serve(Site(root), args)


if __name__ == "__main__":
    main()
