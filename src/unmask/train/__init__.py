"""Pretraining: single process or torchrun (DDP), exact resume, periodic bits-per-byte evaluation."""
from .trainer import train

__all__ = ["train"]
