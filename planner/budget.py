"""`--memory-budget` parsing: bytes with a unit ("1.5GB", "800MB", "512MiB", "2e9") or a percentage of
the model's weight bytes ("60%").

Decimal units are powers of 1000 and binary units (KiB, MiB, GiB) powers of 1024, as `df -H`/`df -h`
print them, so that a number read off one of them means what it meant there.
"""

from __future__ import annotations

import re

from engine.errors import PlanError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_budget(text: str, weight_bytes: int) -> int:
    """The budget in bytes. weight_bytes is what 100% means (the model's weights as loaded)."""
    m = _PATTERN.match(str(text))
    if not m:
        raise PlanError(f"memory budget {text!r} is not a size; write it like 1.5GB, 800MB, 512MiB or 60%")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 1000:
            raise PlanError(f"memory budget {text!r}: a percentage must be in (0, 1000]")
        return int(round(weight_bytes * value / 100.0))
    if unit not in _UNITS:
        raise PlanError(f"memory budget {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, KiB, MiB, GiB or %")
    n = int(round(value * _UNITS[unit]))
    if n <= 0:
        raise PlanError(f"memory budget {text!r} must be positive")
    return n


def parse_quality_budget(text: str) -> float:
    """`--quality-budget` ("2%") -> the allowed perplexity rise as a fraction (0.02)."""
    m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%\s*", str(text))
    if not m:
        raise PlanError(f"quality budget {text!r} is not a percentage; write the perplexity rise you accept, like 2%")
    return float(m.group(1)) / 100.0


def format_bytes(n: float) -> str:
    """Binary units with one decimal, for summaries: 98.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    raise AssertionError("unreachable")
