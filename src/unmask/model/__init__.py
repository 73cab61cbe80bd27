"""The network: a single-device transformer that knows nothing of caching policy, batching or HTTP."""
from .masks import block_causal_mask
from .transformer import Transformer

__all__ = ["Transformer", "block_causal_mask"]
