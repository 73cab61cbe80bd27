"""`unmask convert SRC DST [--to FAMILY] [--dtype bf16|fp32|keep]`: any loadable model written in our
layout or in a registered family's Hugging Face layout.

SRC is anything `unmask.load` reads: our layout, a family's directory, a .gguf file. `--to` is a
registered model_type (`unmask.families.supported()`): `unmask` (our layout, the default), `llama`,
`qwen2`, `qwen3` (what transformers' `AutoModelForCausalLM` and llama.cpp's converter read), `llada`,
`sdar`, `Dream`, `Fast_dLLM_Qwen`, `llada2_moe`. The weights go through the source family's
`state_from_hf` into our tensor names, in their stored dtypes, then through the target's
`state_to_hf`; config.json is the target's `config_to_hf`. Nothing is converted through float32
unless asked, so with `--dtype keep` (the default) every tensor is written bit for bit as stored.

What a target can hold is decided by reading its config.json back: the target's `config_from_hf` of
what `config_to_hf` wrote must describe the same network (attention and block size, logit shift,
widths, norms, biases, RoPE, experts, vocabulary, special ids). A model the target reads differently
is refused with one line naming the first feature it cannot hold and the layouts that can. Exact
rewrites are made and said on stderr: `token_shift` of a causal model is dropped (its tables only
feed [MASK] inputs, which an AR model never sees), q/k/v biases a target always has (Qwen2, Dream,
Fast-dLLM v2) are written as zeros. Settings the network does not depend on are the target's: the
block size of a causal or full-attention model, the logit shift of a causal one, the family name.

Nothing is lost on a round trip through a foreign layout: its config.json also keeps, under the key
`unmask`, our ModelConfig and GenerationConfig of the source (Hugging Face configs keep unknown keys;
every family reader ignores them). Converting such a directory back restores the family, those
settings, the decoding defaults and, for our own models, our tokenizer, provided the record still
describes the network config.json does (else it is ignored, and said so).

Our layout (`--to unmask`) is what `pretrained.save` writes; config.json stays our strict
ModelConfig (no Hugging Face keys: `ModelConfig` forbids unknown fields, and no Hugging Face class
runs model_type "unmask" anyway). Its tokenizer files are Hugging Face's: tokenizer.json, and
tokenizer_config.json with the special tokens and the chat template, so `AutoTokenizer` reads every
directory written here. Foreign layouts also get generation_config.json in Hugging Face's format
(bos/eos/pad ids, the end-of-turn token among the eos ids, greedy or sampling).

Everything is written into a temporary directory beside DST and renamed into place.

The modules: `source` opens what is converted (configs, tokenizer, a reader of its tensors), `target`
decides what the target layout can hold (the checks and the exact rewrites), `tokenizer_files` writes
the tokenizer files, `write` runs the conversion (`convert`).
"""
from .tokenizer_files import our_chat_template, our_tokenizer_config
from .write import DTYPES, convert

__all__ = ["DTYPES", "convert", "our_chat_template", "our_tokenizer_config"]
