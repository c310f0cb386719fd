"""Import only the parts of pyroute2 podrouter uses (start-up time, docs/operations.md).

`pyroute2/__init__.py` imports every part of the library eagerly (IPDB, NDB, conntrack, ethtool,
nl80211, ...): about 0.3 s on the reference machine, the largest single cost of `podrouter run`'s
start. podrouter needs `pyroute2.iproute`, `pyroute2.netlink.*` and `pyroute2.netns` only, so
`light()` registers the package *without running its `__init__`* and imports submodules on demand.
The first access to a name the light package does not have (`from pyroute2 import NetNS`,
`pyroute2.__version__`) runs the real `__init__` into the same module object, so any other user of
pyroute2 in the process sees the complete package; nothing is ever missing, only deferred.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

_lock = threading.RLock()


def light() -> None:
    """Register the lazy `pyroute2` package (a no-op if pyroute2 is already imported)."""
    with _lock:
        if "pyroute2" in sys.modules:
            return
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return  # let the ordinary import report what is wrong
        mod = importlib.util.module_from_spec(spec)
        state = {"full": False}

        def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562 module attribute hook
            if name.startswith("__") and name not in ("__version__", "__all__"):
                raise AttributeError(name)
            try:
                sub = importlib.util.find_spec(f"pyroute2.{name}")
            except (ImportError, ValueError):
                sub = None
            if sub is not None:
                return importlib.import_module(f"pyroute2.{name}")
            with _lock:
                if not state["full"]:
                    state["full"] = True
                    del mod.__dict__["__getattr__"]
                    assert spec.loader is not None
                    spec.loader.exec_module(mod)
            try:
                return mod.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'pyroute2' has no attribute {name!r}") from None

        mod.__dict__["__getattr__"] = __getattr__
        sys.modules["pyroute2"] = mod


def is_light(mod: ModuleType | None = None) -> bool:
    m = mod or sys.modules.get("pyroute2")
    return m is not None and "__getattr__" in m.__dict__


__all__ = ["is_light", "light"]
