"""The shaping bench's kernel-counter reader (bench/qos_bench.py): a read is stamped with the middle
of the clock readings around it, a slow read is retried, a read is taken only when no out-of-order
segment arrived just before it, and the report says how much of the error the reads' timing can
explain."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qos_bench  # noqa: E402


def test_a_slow_read_is_retried_and_stamped_in_its_middle(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = [0.0, 0.3, 0.0]
    reads: list[float] = []

    def fake(_host: object, _port: int) -> tuple[int, int]:
        before = time.monotonic()
        time.sleep(delays.pop(0) if delays else 0.0)
        reads.append(before)
        return 1000 * len(reads), 0

    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", fake)
    (n, at, half), settled, _waited = qos_bench._rx_counter(object())()
    assert settled
    assert len(reads) == 3  # the first read, then the 0.3 s read, not kept, and its retry
    assert n == 3000
    assert half <= qos_bench.COUNTER_SKEW_S / 2 + 0.01
    assert reads[2] <= at <= time.monotonic()


def test_the_narrowest_of_slow_reads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    delays = iter([0.0, 0.08, 0.03, 0.09, 0.05, 0.07])

    def fake(_host: object, _port: int) -> tuple[int, int]:
        d = next(delays)
        time.sleep(d)
        return int(d * 1000), 0

    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", fake)
    (n, _at, half), _settled, _waited = qos_bench._rx_counter(object())()
    assert n == 30
    assert 0.015 <= half < 0.04


def test_a_read_waits_until_no_segment_arrives_out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # a hole is open for the first reads: every segment arrives out of order and the in-order count
    # stands still; then the retransmission fills it and the count jumps
    states = iter([(100, 5), (100, 9), (100, 14), (900, 14), (905, 14)])
    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", lambda _h, _p: next(states))
    (n, _at, _half), settled, waited = qos_bench._rx_counter(object())()
    assert (n, settled) == (900, True)
    assert 0.2 <= waited < 0.5  # two hole checks of 0.1 s


def test_a_hole_that_stays_open_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qos_bench, "HOLE_WAIT_S", 0.3)
    count = iter(range(1000))
    monkeypatch.setattr(qos_bench, "kernel_rx_bytes", lambda _h, _p: (100, next(count)))
    (_n, _at, _half), settled, waited = qos_bench._rx_counter(object())()
    assert not settled
    assert waited > 0.3


def test_counter_error_is_the_reads_uncertainty_over_the_window() -> None:
    assert qos_bench._counter_error_pct((0, 10.0, 0.25), (0, 20.0, 0.25)) == 5.0
    assert qos_bench._counter_error_pct((0, 10.0, 0.0), (0, 20.0, 0.001)) == 0.01


def test_samples_over_the_bound_are_counted() -> None:
    assert qos_bench._over([0.1, 2.0, 2.01, 3.5]) == 2
    assert qos_bench._over([]) == 0


def test_the_softirq_threads_are_found_and_their_time_read() -> None:
    pids = qos_bench._softirq_threads()
    assert pids, "every Linux has one ksoftirqd per CPU"
    assert all(Path(f"/proc/{p}/comm").read_text().startswith("ksoftirqd/") for p in pids)
    run, wait = qos_bench._sched_ns(pids)
    assert run >= 0 and wait >= 0
    assert qos_bench._softirq_ms((1_000_000, 2_000_000), (3_500_000, 2_000_000)) == {
        "ksoftirqd_run_ms": 2.5, "ksoftirqd_wait_ms": 0.0}
