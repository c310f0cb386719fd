"""podrouter: a per-node pod router with a Rust datapath and a Python control plane.

The native module (``podrouter._native``) is loaded lazily so that the pure-Python parts (config
validation, the QoS annotation grammar) import without it.
"""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from podrouter._native import __version__

        return __version__
    raise AttributeError(f"module 'podrouter' has no attribute {name!r}")
