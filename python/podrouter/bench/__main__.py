"""`python -m podrouter.bench`: the suite without the `podrouter` command (same options)."""

from __future__ import annotations

import sys

from podrouter.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
