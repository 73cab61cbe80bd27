"""model_type -> FamilySpec. A family registers itself by listing its model_types in its spec; adding
one is a new file and one line here, never a branch elsewhere."""
from __future__ import annotations

from ..errors import UserError
from . import dream, fastdllm, llada, llada2, llama, sdar, unmask
from .spec import FamilySpec

_SPECS: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> None:
    for model_type in spec.model_types:
        if model_type in _SPECS and _SPECS[model_type] is not spec:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _SPECS[model_type] = spec


for _module in (unmask, llada, dream, sdar, llada2, fastdllm):
    register(_module.SPEC)
for _spec in llama.SPECS:  # plain AR families: llama, qwen2, qwen3
    register(_spec)


def supported() -> list[str]:
    """Every model_type a checkpoint may declare."""
    return list(_SPECS)


def get(model_type: str) -> FamilySpec:
    """The family of `model_type`; a UserError listing the supported ones if there is none."""
    try:
        return _SPECS[model_type]
    except (KeyError, TypeError):
        raise UserError(f"model_type {model_type!r} is not supported; supported: {', '.join(supported())}") from None
