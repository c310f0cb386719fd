"""Test-side name for the namespace host builder; the code lives in `podrouter.demo.netns`.

The demo and the benchmark suite need the same hosts at run time from the installed wheel, so the
implementation moved into the package; the tests keep importing `nettopo`.
"""

from __future__ import annotations

try:
    import podrouter.demo.netns as _netns
except ImportError:  # running from a source tree without the wheel installed
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import podrouter.demo.netns as _netns

from podrouter.demo.netns import *  # noqa: F403
from podrouter.demo.netns import (  # noqa: F401  (explicit, so linters and readers see what tests use)
    Host,
    Pod,
    ReferenceTopology,
    Topology,
    capture,
    parallel,
    reference_topology,
    sh,
)

__all__ = list(_netns.__all__)
