"""
Baseline for heartbeats: a bare Klein app that parses and echoes a JSON body on
C{POST /agents/<id>/heartbeat}, no logging, no metrics, no store.

    python bench/baseline_echo.py --port 8083

It parses with orjson, as the service does, and answers with the same headers
(C{Content-Type: application/json} and C{Content-Length}); C{GET /health} is
there for the harness's readiness check.  Started by bench/registry.py; runnable
on its own for poking at it.
"""

from __future__ import annotations

from typing import Any

import orjson
from _shared import health_body, json_response, parse_args, serve
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site


def main() -> None:
    args = parse_args("bare Klein JSON echo baseline for heartbeats")
    app = Klein()
    started = reactor.seconds()

    @app.route("/health", methods=["GET"])
    def health(request: Any) -> bytes:
        return health_body(request, reactor.seconds(), started)

    @app.route("/agents/<agent_id>/heartbeat", methods=["POST"])
    def heartbeat(request: Any, agent_id: str) -> bytes:
        document = orjson.loads(request.content.read())
        return json_response(request, orjson.dumps(document))

    serve(Site(app.resource()), args)


if __name__ == "__main__":
    main()
