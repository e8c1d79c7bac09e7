"""The one way simmoe writes a number of bytes: binary units (KiB, MiB, GiB, ... = 2^10, 2^20,
2^30 bytes), one decimal (``512 B``, ``4.0 KiB``, ``27.0 MiB``, ``1.5 GiB``). Every terminal
line, report and plot label uses it (or the fixed unit ``MIB``/``GIB`` below for a column)."""
from __future__ import annotations

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def fmt_bytes(n: float) -> str:
    """``512`` -> ``512 B``, ``28311552`` -> ``27.0 MiB``, ``1.5 * 2**30`` -> ``1.5 GiB``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
