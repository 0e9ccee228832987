"""twistd's entry to the orchestrator: C{twistd -n --pidfile= optiinfra --port 8080}."""

from twisted.application.service import ServiceMaker

OptiInfra = ServiceMaker(
    "OptiInfra Orchestrator",
    "optiinfra.tap",
    "Control plane for the cost, performance, resource and application agents.",
    "optiinfra",
)
