"""Test-only twistd plugin: the orchestrator with a slow route (see the tap)."""

from twisted.application.service import ServiceMaker

SlowTest = ServiceMaker(
    "OptiInfra slow-route test service",
    "optiinfra_slowtest_tap",
    "Orchestrator with /slow, for drain tests only.",
    "optiinfra-slowtest",
)
