"""What one generation returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationOutput:
    text: str  # the completion, special tokens removed, cut at the first EOS
    token_ids: list[int] = field(default_factory=list)  # completion ids, without EOS and what follows
    nfe: int = 0  # forward passes of the network
    seconds: float = 0.0
    finish_reason: str = "length"  # "stop" when EOS was produced, else "length"
    prompt_tokens: int = 0  # every token of the canvas that was given, not generated (suffix included)
    completion_tokens: int = 0  # len(token_ids)

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "nfe": self.nfe,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }
