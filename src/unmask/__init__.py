"""unmask: train, fine-tune and serve masked-diffusion language models."""
from .config import GenerationConfig, ModelConfig
from .engine import Engine, RequestOutput, SamplingParams
from .frontend.template import FilledHole, Hole
from .errors import UserError
from .pretrained import Pretrained, load, save
from .sampling import reference_generate
from .structured import OutputFormat

__version__ = "0.1.0"

__all__ = [
    "Engine", "FilledHole", "GenerationConfig", "Hole", "ModelConfig", "OutputFormat", "Pretrained", "RequestOutput", "SamplingParams", "UserError",
    "load", "reference_generate", "save",
]
