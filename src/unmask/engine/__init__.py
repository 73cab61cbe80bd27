"""The inference engine: scheduler, paged KV cache, model runner, quantization."""
from .engine import Engine, Event
from ..frontend.params import SamplingParams
from .request import RequestOutput

__all__ = ["Engine", "Event", "RequestOutput", "SamplingParams"]
