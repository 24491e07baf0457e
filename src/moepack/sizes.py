"""Byte counts for people: every size moepack prints goes through `human_bytes`, so a toy
artifact reads `1.3 MiB`, not `0.00 GB`. Torch-free (the CLI, verify and inspect use it)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | float) -> str:
    """`n` bytes in the largest binary unit that keeps the number at least 1, three significant
    figures (`512 B`, `1.50 KiB`, `12.3 MiB`, `75.0 GiB`)."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{int(value)} B"
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{sign}{value:.{digits}f} {_UNITS[unit]}"
