"""unmask: train, fine-tune and serve masked-diffusion language models."""
from .config import GenerationConfig, ModelConfig
from .errors import UserError
from .pretrained import Pretrained, load, save

__version__ = "0.1.0"


def reference_generate(model, prompt, **kwargs):
    """The plain LLaDA-style sampler (see unmask.sampling.reference)."""
    from .sampling import reference_generate as _ref

    return _ref(model, prompt, **kwargs)


__all__ = ["GenerationConfig", "ModelConfig", "Pretrained", "UserError", "load", "reference_generate", "save"]
