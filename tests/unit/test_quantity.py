"""The Kubernetes resource.Quantity grammar, table-driven.

The rows follow the rules of k8s.io/apimachinery pkg/api/resource (ParseQuantity): the parse table and
the invalid list its own tests use, plus the corner cases its scanner lets through (missing digits,
32-bit exponents, the binary cap, rounding up to whole nanos). Each accepted row gives the value
Kubernetes stores (exact decimal) and is also checked with an explicit `+` and `-` sign, as upstream does.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from podrouter.qos.quantity import QuantityError, parse_quantity, quantity_value

INT64_MAX = 2**63 - 1

# (text, the value Kubernetes stores for it)
ACCEPTED: list[tuple[str, Decimal | int]] = [
    # zero with every suffix
    *[
        (f"0{s}", 0)
        for s in ("", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    ],
    ("1", 1),
    ("9", 9),
    # binary suffixes
    ("1Ki", 1024),
    ("8Ki", 8 * 1024),
    ("7Mi", 7 * 2**20),
    ("6Gi", 6 * 2**30),
    ("5Ti", 5 * 2**40),
    ("4Pi", 4 * 2**50),
    ("3Ei", 3 * 2**60),
    ("10Ti", 10 * 2**40),
    ("100Ti", 100 * 2**40),
    # decimal suffixes, nano and micro among them
    ("5n", Decimal("5e-9")),
    ("4u", Decimal("4e-6")),
    ("3m", Decimal("0.003")),
    ("8k", 8000),
    ("50k", 50000),
    ("7M", 7 * 10**6),
    ("6G", 6 * 10**9),
    ("5T", 5 * 10**12),
    ("40T", 40 * 10**12),
    ("300T", 300 * 10**12),
    ("2P", 2 * 10**15),
    ("1E", 10**18),
    ("12E", 12 * 10**18),
    # decimal exponents, either case, signed
    ("1E-3", Decimal("0.001")),
    ("1e3", 1000),
    ("1E6", 10**6),
    ("1e9", 10**9),
    ("1E12", 10**12),
    ("1e13", 10**13),
    ("1e14", 10**14),
    ("1e15", 10**15),
    ("1E18", 10**18),
    ("1.2e3", 1200),
    ("1.3E+6", 1_300_000),
    ("1.40e9", 1_400_000_000),
    ("1.53E12", 153 * 10**10),
    ("1.6e15", 16 * 10**14),
    ("1.7E18", 17 * 10**17),
    ("1e01", 10),
    ("1e-0", 1),
    ("1e+0", 1),
    # things that look like floating point
    ("100.035k", 100035),
    ("0.001", Decimal("0.001")),
    ("0.0005k", Decimal("0.5")),
    ("0.005", Decimal("0.005")),
    ("0.05", Decimal("0.05")),
    ("0.5", Decimal("0.5")),
    ("0.00050k", Decimal("0.5")),
    ("0.00500", Decimal("0.005")),
    ("0.50000", Decimal("0.5")),
    ("0.5e0", Decimal("0.5")),
    ("0.5e-1", Decimal("0.05")),
    ("0.5e-2", Decimal("0.005")),
    ("10.035M", 10_035_000),
    ("9.01", Decimal("9.01")),
    ("8.1k", 8100),
    ("7.123456M", 7_123_456),
    ("6.987654321G", 6_987_654_321),
    ("5.444T", 5_444 * 10**9),
    ("40.1T", 401 * 10**11),
    ("2.5P", 25 * 10**14),
    ("1.01E", 101 * 10**16),
    # rounded up to a whole nano, never to zero
    ("3.001n", Decimal("4e-9")),
    ("1.1E-9", Decimal("2e-9")),
    ("0.0000000001", Decimal("1e-9")),
    ("0.0000000005", Decimal("1e-9")),
    ("0.00000000050", Decimal("1e-9")),
    ("0.5e-9", Decimal("1e-9")),
    ("0.9n", Decimal("1e-9")),
    ("0.00000012345", Decimal("124e-9")),
    ("0.00000012354", Decimal("124e-9")),
    ("1e-999999999", Decimal("1e-9")),
    # binary values saturate at the int64 maximum; decimal ones do not
    ("9Ei", INT64_MAX),
    ("9223372036854775807Ki", INT64_MAX),
    ("8Ei", INT64_MAX),
    ("7Ei", 7 * 2**60),
    ("10000000000000000000", 10**19),
    ("123456789012345678901234567890", 123456789012345678901234567890),
    # fractional binary values
    ("100.035Ki", Decimal("102435.84")),
    ("0.5Mi", 2**19),
    ("0.05Gi", Decimal("53687091.2")),
    ("0.025Ti", Decimal("27487790694.4")),
    ("0.000000000001Ki", Decimal("2e-9")),
    # written by trolls, accepted all the same
    (".001", Decimal("0.001")),
    (".0001k", Decimal("0.1")),
    ("1.", 1),
    ("1.G", 10**9),
    ("0001k", 1000),
    ("-0", 0),
    ("+0", 0),
    ("00", 0),
    # no digits at all reads as zero wherever Kubernetes' int64 fast path runs
    ("k", 0),
    (".", 0),
    ("-.", 0),
    ("+", 0),
    ("-", 0),
    ("Mi", 0),
    ("Ti", 0),
    (".Ki", 0),
    ("n", 0),
    ("e3", 0),
    ("E", 0),
    ("e-9", 0),
    # the exponent is read as an int64 and kept in 32 bits
    ("1e4294967296", 1),
    ("1e4294967297", 10),
    ("1e9223372036854775807", Decimal("0.1")),
]

# (text, why): everything Kubernetes refuses
REFUSED = [
    # upstream's invalid list
    ("1.1.M", "not a quantity"),
    ("1+1.0M", "not a quantity"),
    ("0.1mi", "unknown suffix"),
    ("0.1am", "not a quantity"),
    ("aoeu", "not a quantity"),
    (".5i", "unknown suffix"),
    ("1i", "unknown suffix"),
    ("-3.01i", "unknown suffix"),
    ("-3.01e-", "unknown suffix"),
    (" 1", "not a quantity"),
    ("1 ", "not a quantity"),
    # empty, and no digits where Kubernetes must read them
    ("", "no digits"),
    ("Pi", "no digits"),
    ("Ei", "no digits"),
    ("+Pi", "no digits"),
    (".Ei", "no digits"),
    ("e-10", "no digits"),
    ("-.e-12", "no digits"),
    # case matters; unknown units
    ("1K", "unknown suffix"),
    ("1ki", "unknown suffix"),
    ("1KI", "not a quantity"),
    ("1KiB", "not a quantity"),
    ("1Zi", "not a quantity"),
    ("1Z", "not a quantity"),
    ("1µ", "not a quantity"),
    ("1Mb", "not a quantity"),
    ("1mm", "unknown suffix"),
    ("1e3k", "not a quantity"),
    ("1E3Ki", "not a quantity"),
    # malformed exponents
    ("1e", "unknown suffix"),
    ("1e+", "unknown suffix"),
    ("1e-", "unknown suffix"),
    ("1e1.5", "not a quantity"),
    ("1e.5", "not a quantity"),
    ("1e+-3", "not a quantity"),
    ("1e9223372036854775808", "unknown suffix"),
    ("1e-9223372036854775809", "unknown suffix"),
    ("1e99999999999999999999", "unknown suffix"),
    # not numbers in this grammar
    ("1..5", "not a quantity"),
    ("1-", "unknown suffix"),
    ("++1", "unknown suffix"),
    ("--1", "unknown suffix"),
    ("1,5", "not a quantity"),
    ("1_000", "not a quantity"),
    ("0x10", "not a quantity"),
    ("1/2", "not a quantity"),
    ("\uff11", "not a quantity"),
    ("\u0663", "not a quantity"),
    ("\u22121", "not a quantity"),
    ("1\x00", "not a quantity"),
    ("1M\n", "not a quantity"),
    ("Inf", "not a quantity"),
    ("NaN", "not a quantity"),
    ("1 M", "not a quantity"),
]


@pytest.mark.parametrize(("text", "value"), ACCEPTED)
def test_accepted(text: str, value: Decimal | int) -> None:
    assert quantity_value(text) == Decimal(value)


@pytest.mark.parametrize(("text", "value"), [r for r in ACCEPTED if r[0][:1] not in ("+", "-")])
def test_accepted_with_a_sign(text: str, value: Decimal | int) -> None:
    assert quantity_value("+" + text) == Decimal(value)
    assert quantity_value("-" + text) == -Decimal(value)


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_refused(text: str, reason: str) -> None:
    with pytest.raises(QuantityError, match=reason):
        quantity_value(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("1.5", 2),
        ("-1.5", -2),
        ("5n", 1),
        ("-5n", -1),
        ("0", 0),
        ("k", 0),
        ("999.5", 1000),
        ("1.0000001k", 1001),
        ("9Ei", INT64_MAX),
        ("1Ei", 2**60),
        ("1E", 10**18),
    ],
)
def test_value_rounds_away_from_zero(text: str, value: int) -> None:
    assert parse_quantity(text, minimum=None, maximum=None) == value


def test_unbounded_value_outside_int64_is_an_error() -> None:
    with pytest.raises(QuantityError, match="64-bit"):
        parse_quantity("10E", minimum=None, maximum=None)
    with pytest.raises(QuantityError, match="64-bit"):
        parse_quantity("1e999999999", minimum=None, maximum=None)


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("1k", 1000),
        ("1u", "small"),
        ("1000000000000n", 1000),
        ("1000000000u", 1000),
        ("999999999999n", 1000),
        ("999000000000n", "small"),
        ("1P", 10**15),
        ("1Pi", "large"),
        ("k", "small"),
        (".", "small"),
        ("-1M", "small"),
        ("1e4294967299", 1000),
        ("1" + "0" * 5000 + "e-4997", 1000),
        ("9" * 200, "large"),
    ],
)
def test_bandwidth_bounds(text: str, outcome: int | str) -> None:
    if isinstance(outcome, int):
        assert parse_quantity(text) == outcome
    else:
        with pytest.raises(QuantityError, match=f"unreasonably {outcome}"):
            parse_quantity(text)


def test_huge_inputs_stay_cheap() -> None:
    # untrusted annotations: long digit strings and extreme exponents are decided without big work
    with pytest.raises(QuantityError, match="large"):
        parse_quantity("1e2147483647")
    with pytest.raises(QuantityError, match="small"):
        parse_quantity("1e-2147483648")
    assert parse_quantity("0" * 100_000 + "1k") == 1000
