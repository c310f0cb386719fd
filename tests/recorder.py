"""A stand-in for the daemon's parts in the kernel-free shutdown tests: every method call is written
into one shared list as "<name>.<method>" (with its keyword arguments, if any), so a test can assert
the order in which shutdown touched them."""

from __future__ import annotations

from typing import Any


class Recorder:
    def __init__(self, name: str, calls: list[str], **attrs: Any) -> None:
        self._name, self._calls = name, calls
        self.__dict__.update(attrs)

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *a, **k: self._calls.append(f"{self._name}.{method}{k or ''}")
