"""Sizes as people read them, in decimal units (469.8 KB, 4.1 GB): the `readable` of the
daemon's byte descriptors and the command line's columns say the same."""

from __future__ import annotations


def format_bytes(n: float | None) -> str:
    """`n` bytes in decimal units; "-" when unknown."""
    if n is None or n < 0:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
