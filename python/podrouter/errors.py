"""Exit statuses and the one error that stops a start (shared by daemon, bring-up, handover, cleanup).

Kept in a module of its own, importing nothing of podrouter, so that every part of the daemon can
raise it without importing the daemon (no import cycles: tests/unit/test_py_module_graph.py)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class StartError(Exception):
    """The daemon must not start. `problems` are printed one per line; `code` is the exit status."""

    def __init__(self, problems: list[str], code: int = EXIT_CONFIG) -> None:
        self.problems = problems
        self.code = code
        super().__init__("\n".join(problems))


__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "StartError"]
