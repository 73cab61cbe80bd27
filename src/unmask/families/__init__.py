"""Checkpoint families as data: each foreign layout (LLaDA, Dream, SDAR, LLaDA2, Fast-dLLM v2) and our
own is a `FamilySpec` (config mapping, tensor-name adapters, special ids, decoding defaults, chat
template location), registered by model_type. `load_network` reads any of them into our Transformer."""
from .load import load_network, read_config
from .registry import get, register, supported
from .spec import FamilySpec

__all__ = ["FamilySpec", "get", "load_network", "read_config", "register", "supported"]
