"""The store fixtures of the backend suite, for every store test module."""

from .test_store import make_backend, open_store, store  # noqa: F401 - fixtures
