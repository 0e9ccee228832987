"""The operators' console: static pages served by the orchestrator itself."""
