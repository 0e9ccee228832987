"""Agents: who is out there, of what type, able to do what, and alive or not."""
