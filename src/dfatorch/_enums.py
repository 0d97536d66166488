"""A string enum that prints as its value on every Python version (``f"{Rule.DFA}"`` is ``dfa``)."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """Members compare equal to, serialise as and format as their string values."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
