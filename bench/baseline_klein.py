"""
Baseline (b): a bare Klein app answering GET /health, no logging, no metrics.

    python bench/baseline_klein.py --port 8081

Started by bench/health.py; runnable on its own for poking at it.
"""

from __future__ import annotations

from typing import Any

from _shared import health_body, parse_args, serve
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site


def main() -> None:
    args = parse_args("bare Klein /health baseline")
    app = Klein()
    started = reactor.seconds()

    @app.route("/health", methods=["GET"])
    def health(request: Any) -> bytes:
        return health_body(request, reactor.seconds(), started)

    serve(Site(app.resource()), args)


if __name__ == "__main__":
    main()
