"""The Kubernetes quantity grammar, for the bandwidth annotations.

kubelet and containerd read `kubernetes.io/{egress,ingress}-bandwidth` with
`resource.ParseQuantity(value)` and then take `.Value()`, which rounds a fractional result *up*
(away from zero) to an integer; they refuse a value whose `.Value()` is below `1k` or above `1P`.
This module accepts exactly the strings `ParseQuantity` accepts (k8s.io/apimachinery
pkg/api/resource, quantity.go) and computes the same value, including the corner cases that
parser lets through:

    quantity  ::= [sign] [digits] ["." [digits]] suffix
    sign      ::= "+" | "-"
    suffix    ::= decimalSI | binarySI | ("e" | "E") int64
    decimalSI ::= "n" | "u" | "m" | "" | "k" | "M" | "G" | "T" | "P" | "E"
    binarySI  ::= "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"

* Suffixes are case-sensitive: `1K`, `1KI`, `1mi` are errors; `1m` is one *milli*, `1u` one micro,
  `1n` one nano (so `10m` as a bandwidth is 0.01 bit/s and is refused as too small, as kubelet
  does). `1E` is one exa, `1E3` is one thousand. No whitespace anywhere, not even a trailing newline.
* The digits may be missing altogether: Kubernetes reads `k`, `.`, `+`, `-.`, `Mi` as zero (a
  bandwidth of zero is then refused as too small). Only where Kubernetes falls back to its
  arbitrary-precision path with no digits to read does it fail: `Pi`, `Ei`, `e-10`.
* The exponent of `e`/`E` must fit a signed 64-bit integer and is then truncated to 32 bits, as
  Kubernetes does (`1e4294967296` is 1).
* Binary-suffixed values are capped at 2^63-1 (`9Ei`); decimal ones are not.
* `.Value()` rounds away from zero: `999.5` is 1000, `-1.5` is -2.

Arithmetic is exact (`decimal` with a precision sized to the input), never float. The one deliberate
difference: Kubernetes' `.Value()` silently wraps a decimal value beyond the 64-bit range; here such
a value is "unreasonably large" for a bandwidth, and an error for an unbounded parse.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

__all__ = ["QuantityError", "parse_quantity", "quantity_value", "format_bits", "MIN_BANDWIDTH",
           "MAX_BANDWIDTH"]

# kubelet pkg/util/bandwidth: minRsrc = resource.MustParse("1k"), maxRsrc = resource.MustParse("1P")
MIN_BANDWIDTH = 1000
MAX_BANDWIDTH = 10**15

_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DIGITS = "0123456789"
# the letters Kubernetes' scanner collects into a suffix before an optional signed exponent
_SUFFIX_LETTERS = "eEinumkKMGTP"
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
# Kubernetes' fast path keeps at most 18 decimal digits in an int64 and values down to 10^-9
_FAST_DIGITS = 18
_NANO = -9


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity, or is outside the accepted range."""


def _scan(text: str) -> tuple[bool, str, str, str, str]:
    """Split `text` the way Kubernetes' parseQuantityString does: (negative, number prefix as
    written, integer digits without leading zeros or "0", fraction digits, suffix)."""
    n = len(text)
    i = 0
    negative = False
    if n and text[0] in "+-":
        negative = text[0] == "-"
        i = 1
    while i < n and text[i] == "0":
        i += 1
    if i == n:  # only a sign and zeros: zero
        return negative, "0", "0", "", ""
    j = i
    while j < n and text[j] in _DIGITS:
        j += 1
    num = text[i:j] or "0"
    i = j
    denom = ""
    if i < n and text[i] == ".":
        j = i = i + 1
        while j < n and text[j] in _DIGITS:
            j += 1
        denom = text[i:j]
        i = j
    prefix = text[:i]
    start = i
    while i < n and text[i] in _SUFFIX_LETTERS:
        i += 1
    if i < n and text[i] in "+-":
        i += 1
    while i < n and text[i] in _DIGITS:
        i += 1
    if i < n:
        raise QuantityError(f"{text[:64]!r} is not a quantity (expected e.g. 10M, 1.5G, 100Mi, 1e6)")
    return negative, prefix, num, denom, text[start:]


def _parse_int64(text: str) -> int | None:
    """strconv.ParseInt(text, 10, 64): an optional sign and ASCII digits, in the int64 range."""
    negative = text.startswith("-")
    body = text[1:] if text.startswith(("+", "-")) else text
    if not body or any(c not in _DIGITS for c in body):
        return None
    digits = body.lstrip("0") or "0"
    if len(digits) > 19:
        return None
    value = -int(digits) if negative else int(digits)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _interpret(text: str, suffix: str) -> tuple[int, int]:
    """(base, exponent) of a suffix, or QuantityError."""
    if suffix in _DECIMAL_SI:
        return 10, _DECIMAL_SI[suffix]
    if suffix in _BINARY_SI:
        return 2, _BINARY_SI[suffix]
    if len(suffix) > 1 and suffix[0] in "eE":
        exponent = _parse_int64(suffix[1:])
        if exponent is not None:
            # Kubernetes keeps the exponent in an int32: truncate like Go's int32() conversion
            return 10, (exponent + 2**31) % 2**32 - 2**31
    raise QuantityError(f"{text[:64]!r} is not a quantity: unknown suffix {suffix[:16]!r} "
                        "(decimal n u m k M G T P E, binary Ki Mi Gi Ti Pi Ei, or an exponent e6)")


def _needs_digits(base: int, exponent: int, num: str, denom: str) -> bool:
    """Whether Kubernetes takes its arbitrary-precision path, which must read at least one digit
    from the number as written (its int64 fast path reads a missing number as zero)."""
    if base == 10:
        return _FAST_DIGITS - (len(num) + len(denom)) < 0 or exponent - len(denom) < _NANO
    if denom:
        return True
    # 1Mi (2^20) has about six decimal digits: exponent*3/10 of the 15 digits are used by the suffix
    if 15 - len(num) - (exponent * 3) // 10 - 1 < 0:
        return True
    return int(num) << exponent > _INT64_MAX


def quantity_value(text: str) -> Decimal:
    """The value Kubernetes stores for a quantity, before `.Value()` rounds it to an integer: exact,
    except that a nonzero value is rounded up (away from zero) to a whole nano and a binary-suffixed
    one is capped at 2^63-1, as Kubernetes does. Raises QuantityError for anything Kubernetes refuses."""
    if not isinstance(text, str):
        raise QuantityError(f"{text!r} is not a string")
    if text == "":
        raise QuantityError("'' is not a quantity: no digits")
    negative, prefix, num, denom, suffix = _scan(text)
    base, exponent = _interpret(text, suffix)
    if not any(c in _DIGITS for c in prefix) and _needs_digits(base, exponent, num, denom):
        raise QuantityError(f"{text[:64]!r} is not a quantity: no digits")
    ctx = decimal.Context(prec=len(num) + len(denom) + 40, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                          traps=[decimal.InvalidOperation, decimal.Overflow, decimal.Inexact])
    magnitude = Decimal(f"{num}.{denom or '0'}")
    if base == 2:
        magnitude = ctx.multiply(magnitude, Decimal(2**exponent))
    else:
        magnitude = ctx.scaleb(magnitude, exponent)
    exp = magnitude.as_tuple().exponent
    if isinstance(exp, int) and exp < _NANO and magnitude:
        # "if you want some resources, you should get some": a nonzero value rounds up to whole nanos
        magnitude = magnitude.quantize(Decimal("1e-9"), rounding=decimal.ROUND_UP,
                                       context=decimal.Context(prec=len(magnitude.as_tuple().digits) + 12,
                                                               Emax=decimal.MAX_EMAX,
                                                               Emin=decimal.MIN_EMIN))
    if base == 2:
        magnitude = min(magnitude, Decimal(_INT64_MAX))
    return -magnitude if negative else magnitude


def parse_quantity(
    text: str,
    *,
    minimum: int | None = MIN_BANDWIDTH,
    maximum: int | None = MAX_BANDWIDTH,
) -> int:
    """Parse a Kubernetes quantity and return its integer value, rounded away from zero
    (resource.Quantity.Value()).

    The bounds default to kubelet's bandwidth limits, 1k and 1P inclusive, and are checked on the
    rounded value as kubelet does (`999.5` rounds to 1000 and is accepted). Pass `minimum=None` /
    `maximum=None` to parse an unbounded quantity (then a value outside the 64-bit range is an error).
    """
    exact = quantity_value(text)
    if maximum is not None and exact > maximum:
        raise QuantityError(f"{text[:64]!r} is unreasonably large (> {format_bits(maximum)})")
    if minimum is not None and exact < minimum - 1:
        # rounding can add at most 1 (for a positive value): decided before building an integer
        raise QuantityError(f"{text[:64]!r} is unreasonably small (< {format_bits(minimum)})")
    if exact.copy_abs() > _INT64_MAX:
        raise QuantityError(f"{text[:64]!r} is outside the 64-bit range of a quantity's value")
    rounding = decimal.ROUND_FLOOR if exact < 0 else decimal.ROUND_CEILING
    value = int(exact.to_integral_value(rounding=rounding))
    if minimum is not None and value < minimum:
        raise QuantityError(f"{text[:64]!r} is unreasonably small (< {format_bits(minimum)})")
    if maximum is not None and value > maximum:
        raise QuantityError(f"{text[:64]!r} is unreasonably large (> {format_bits(maximum)})")
    return value


def format_bits(bits: int) -> str:
    """A short human form of a bit rate: 10M, 1.5G, 1000."""
    for exp, suffix in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        unit = 10**exp
        if bits >= unit:
            whole, rest = divmod(bits, unit)
            if rest == 0:
                return f"{whole}{suffix}"
            return f"{bits / unit:.6g}{suffix}"
    return str(bits)
