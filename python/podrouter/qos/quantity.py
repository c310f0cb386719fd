"""The Kubernetes quantity grammar, for the bandwidth annotations.

kubelet and containerd read `kubernetes.io/{egress,ingress}-bandwidth` with
`resource.ParseQuantity(value)` and then take `.Value()`, which rounds a fractional result *up* to
the next integer; they refuse a value whose `.Value()` is below `1k` or above `1P`. We follow the
same grammar (k8s.io/apimachinery/pkg/api/resource, quantity.go), case for case:

    quantity        ::= signedNumber suffix
    signedNumber    ::= number | sign number
    sign            ::= "+" | "-"
    number          ::= digits | digits "." digits | digits "." | "." digits
    suffix          ::= binarySI | decimalExponent | decimalSI
    binarySI        ::= Ki | Mi | Gi | Ti | Pi | Ei
    decimalSI       ::= m | "" | k | M | G | T | P | E
    decimalExponent ::= "e" signedNumber | "E" signedNumber   (an integer exponent)

Suffixes are case-sensitive: `1K`, `1KI`, `1mi` are errors, and `1m` is one *milli* (so `10m` as a
bandwidth is 0.01 bit/s and is refused as too small -- a classic mistake that kubelet refuses too).
`1E` is one exa, `1E3` is one thousand. No whitespace is allowed anywhere.

Arithmetic is exact (`fractions.Fraction`), never float, so `0.1e1` is exactly 1 and rounding up
never suffers from binary representation error.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["QuantityError", "parse_quantity", "format_bits", "MIN_BANDWIDTH", "MAX_BANDWIDTH"]

# kubelet pkg/util/bandwidth: minRsrc = resource.MustParse("1k"), maxRsrc = resource.MustParse("1P")
MIN_BANDWIDTH = 1000
MAX_BANDWIDTH = 10**15

_DECIMAL_SI = {"m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}

# One anchored expression for the whole grammar; \Z (not $) so a trailing newline is refused.
_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)"
    r"(?P<int>[0-9]*)(?:(?P<dot>\.)(?P<frac>[0-9]*))?"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|[mkMGTPE]|)\Z"
)

# An exponent this large already puts any number with a sane digit count far outside [1k, 1P];
# deciding early keeps `1e999999999` from building a gigantic integer.
_EXPONENT_GUARD = 64
_MAX_LEN = 128


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity, or is outside the accepted range."""


def _exact(text: str) -> Fraction:
    if not isinstance(text, str):
        raise QuantityError(f"{text!r} is not a string")
    if len(text) > _MAX_LEN:
        raise QuantityError(f"{text[:32]!r}... is too long to be a quantity")
    m = _QUANTITY.match(text)
    if m is None:
        raise QuantityError(f"{text!r} is not a quantity (expected e.g. 10M, 1.5G, 100Mi, 1e6)")
    int_part, frac_part = m["int"], m["frac"] or ""
    if not int_part and not frac_part:
        # "", ".", "k", "+.", "e3" have no digits at all
        raise QuantityError(f"{text!r} is not a quantity: no digits")
    digits = int(int_part or "0") * 10 ** len(frac_part) + int(frac_part or "0")
    value = Fraction(digits, 10 ** len(frac_part))
    suffix = m["suffix"]
    if suffix in _BINARY_SI:
        value *= 2 ** _BINARY_SI[suffix]
    elif suffix[:1] in ("e", "E") and len(suffix) > 1:
        exponent = int(suffix[1:])
        if exponent > _EXPONENT_GUARD:
            value = Fraction(0) if value == 0 else Fraction(10) ** (_EXPONENT_GUARD + 1)
        elif exponent < -_EXPONENT_GUARD:
            value = Fraction(0)
        else:
            value *= Fraction(10) ** exponent
    else:
        value *= Fraction(10) ** _DECIMAL_SI[suffix]
    return -value if m["sign"] == "-" else value


def parse_quantity(
    text: str,
    *,
    minimum: int | None = MIN_BANDWIDTH,
    maximum: int | None = MAX_BANDWIDTH,
) -> int:
    """Parse a Kubernetes quantity and return its integer value, rounded up (resource.Quantity.Value()).

    The bounds default to kubelet's bandwidth limits, 1k and 1P inclusive, and are checked on the
    rounded value as kubelet does (`999.5` rounds to 1000 and is accepted). Pass `minimum=None` /
    `maximum=None` to parse an unbounded quantity.
    """
    value = math.ceil(_exact(text))
    if minimum is not None and value < minimum:
        raise QuantityError(f"{text!r} is unreasonably small (< {format_bits(minimum)})")
    if maximum is not None and value > maximum:
        raise QuantityError(f"{text!r} is unreasonably large (> {format_bits(maximum)})")
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
