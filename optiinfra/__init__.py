"""OptiInfra Orchestrator: the control plane between customers and OptiInfra's agents."""

__version__ = "0.1.0"
