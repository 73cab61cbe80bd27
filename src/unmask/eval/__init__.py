"""Quality evaluations: bits per byte, and (later) code benchmarks."""
from .bpb import bits_per_byte

__all__ = ["bits_per_byte"]
