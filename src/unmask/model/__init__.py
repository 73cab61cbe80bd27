"""The network: a single-device transformer that knows nothing of caching policy, batching or HTTP."""
from .inputs import ForwardBatch
from .masks import block_causal_mask
from .transformer import Transformer

__all__ = ["ForwardBatch", "Transformer", "block_causal_mask"]
