"""The shaping bench's kernel-counter reader (bench/qos_bench.py): a read is stamped with the middle
of the clock readings around it, a slow read is retried, and the report says how much of the error
the timing of the reads can explain."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qos_bench  # noqa: E402


def test_a_slow_read_is_retried_and_stamped_in_its_middle(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = [0.3, 0.0]
    reads: list[float] = []

    def fake(_host: object, _port: int) -> int:
        time.sleep(delays.pop(0) if delays else 0.0)
        reads.append(time.monotonic())
        return 1000 * len(reads)

    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", fake)
    before = time.monotonic()
    n, at, half = qos_bench._rx_counter(object())()
    assert len(reads) == 2  # the 0.3 s read was not kept
    assert n == 2000
    assert half <= qos_bench.COUNTER_SKEW_S / 2 + 0.01
    assert before + 0.3 <= at <= reads[-1] + 1e-6


def test_the_narrowest_of_slow_reads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = iter([0.08, 0.03, 0.09, 0.05, 0.07])

    def fake(_host: object, _port: int) -> int:
        d = next(delays)
        time.sleep(d)
        return int(d * 1000)

    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", fake)
    n, _at, half = qos_bench._rx_counter(object())()
    assert n == 30
    assert 0.015 <= half < 0.04


def test_counter_error_is_the_reads_uncertainty_over_the_window() -> None:
    assert qos_bench._counter_error_pct((0, 10.0, 0.25), (0, 20.0, 0.25)) == 5.0
    assert qos_bench._counter_error_pct((0, 10.0, 0.0), (0, 20.0, 0.001)) == 0.01
