"""Durable state: one interface, embedded SQLite and shared PostgreSQL backends."""
