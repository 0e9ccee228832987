"""OptiInfra Orchestrator: the control plane between customers and agents."""

__version__ = "0.1.0"
