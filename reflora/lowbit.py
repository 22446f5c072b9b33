"""The low-bit state transports under their first name; they live in :mod:`reflora.transport.lowbit`."""

from __future__ import annotations

from reflora.transport.lowbit import BNB_BLOCKSIZE, BitsAndBytesTransport, LowBitTransport, TorchaoTransport

__all__ = ["BNB_BLOCKSIZE", "BitsAndBytesTransport", "LowBitTransport", "TorchaoTransport"]
