import sys
from pathlib import Path

# tests/nettopo.py is shared by the integration tests, the benchmarks and the demo's tests
sys.path.insert(0, str(Path(__file__).resolve().parent))
