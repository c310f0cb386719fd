"""Helpers shared by bench/qos_bench.py and tests/integration/test_qos*.py."""
