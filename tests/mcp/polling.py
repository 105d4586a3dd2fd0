"""`eventually`: now in tests/waiting.py, shared by every test package."""

from tests.waiting import eventually

__all__ = ["eventually"]
