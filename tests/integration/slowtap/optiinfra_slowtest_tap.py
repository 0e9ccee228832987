"""
The orchestrator plus one test-only route, C{/slow?seconds=N}, for drain tests.

It lives under tests/ and is put on the path only by the tests, so a normal
install has no way to make a request slow.
"""

from __future__ import annotations

from typing import cast

from klein import Klein
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest

from optiinfra.logs import get_logger
from optiinfra.tap import Options, build_service
from optiinfra.web.app import route
from optiinfra.web.render import render_json


def slow_routes(app: Klein) -> None:
    @route(app, "/slow", ("GET",))
    async def slow(request: IRequest) -> bytes:
        seconds = float(request.args.get(b"seconds", [b"1"])[0])
        get_logger("slowtest").info("slow request started", seconds=seconds)
        await deferLater(cast(IReactorTime, reactor), seconds)
        return render_json(request, {"slept": seconds})


def makeService(options: Options) -> IService:
    return build_service(
        options.settings, cast(IReactorTime, reactor), mounts=[slow_routes]
    )


__all__ = ["Options", "makeService"]
