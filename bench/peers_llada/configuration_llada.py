"""A minimal Hugging Face config class for LLaDA-layout checkpoints (model_type "llada"), written for
bench/peers.py: the peer engines load LLaDA only through `trust_remote_code`, and our checkpoints carry
no Python files. bench/peers.py places this file (and modeling_llada.py) beside symlinks to a
checkpoint's files in a temporary directory; it is never put into a checkpoint."""
from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=None, mlp_hidden_size=None,
                 mlp_ratio=4, vocab_size=126464, embedding_size=None, max_sequence_length=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-5, weight_tying=False, include_qkv_bias=False,
                 mask_token_id=126336, **kwargs):
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.mlp_hidden_size = mlp_hidden_size or mlp_ratio * d_model
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        self.weight_tying, self.include_qkv_bias = weight_tying, include_qkv_bias
        self.mask_token_id = mask_token_id
        # The names other code looks for (dlmserve reads these through getattr).
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = d_model, n_layers, n_heads
        self.max_position_embeddings = max_sequence_length
        self.head_dim = d_model // n_heads
        kwargs["tie_word_embeddings"] = bool(weight_tying)
        super().__init__(**kwargs)
