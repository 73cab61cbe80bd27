"""The engine's llama.cpp backend: `Engine(model, backend="llama.cpp", quantize=None|"f16"|"q8_0")`.
runner.py explains how block-causal decoding maps onto llama.cpp's sequences; export.py writes the
GGUF it loads; library.py is the thin ctypes layer over llama-cpp-python."""
from .library import available

__all__ = ["available"]
