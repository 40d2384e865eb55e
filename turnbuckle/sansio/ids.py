"""Injected randomness: every id the pure core makes comes from an IdSource."""

from __future__ import annotations

from typing import Protocol

__all__ = ["IdSource", "random_hex"]


class IdSource(Protocol):
    """Where randomness comes from: the system's CSPRNG in production, a seed in simulation."""

    def random_bits(self, k: int) -> int:
        """Return a uniformly random int of ``k`` bits."""
        ...


def random_hex(ids: IdSource, bits: int = 128) -> str:
    """``bits`` random bits as fixed-width lowercase hex (an unguessable token or id)."""
    return f"{ids.random_bits(bits):0{(bits + 3) // 4}x}"
