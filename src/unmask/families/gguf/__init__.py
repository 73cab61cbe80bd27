"""GGUF files (llama.cpp's format) read into our Transformer, dequantised tensor by tensor, and written
from our checkpoints.

`load_gguf(path, device, dtype) -> (net, cfg, spec, tokenizer, metadata)`. The architectures read are
those llama.cpp has and unmask has a family for:

| GGUF `general.architecture` | our family (model_type) | attention | q/k rows |
|---|---|---|---|
| `llama` | `llama` (families/llama.py) | causal | permuted by llama.cpp's converter |
| `qwen2` | `qwen2` | causal | as in the HF checkpoint |
| `qwen3` | `qwen3` | causal | as in the HF checkpoint |
| `llada` | `llada` (LLaDA 8B / 1.5) | full | permuted |
| `dream` | `Dream` (Dream 7B, ...) | full, logits shifted | as in the HF checkpoint |

llama.cpp's `llada-moe` (LLaDA-MoE) has no unmask family, and SDAR, LLaDA2 and Fast-dLLM v2 have no
llama.cpp architecture; any other architecture is a one-line UserError listing these five.

The modules:
- `layout`: what llama.cpp's converter does to a checkpoint (architectures, tensor names, q/k rows);
- `read`: finding, opening and loading a .gguf (`load_gguf`, `find_gguf`, `read_metadata`);
- `config`: the ModelConfig and FamilySpec of a file's metadata (`gguf_config`);
- `tokenizer`: the tokenizer of a file, beside it or rebuilt from its metadata (`gguf_tokenizer`,
  `tokenizer_json`), and the metadata of a tokenizer.json for the writer;
- `write`: `write_gguf(src_dir, out, qtype)`, a checkpoint directory of these families laid out as
  llama.cpp's converter lays it out (tests build GGUF fixtures with it).
"""
from .config import gguf_config
from .layout import ARCHITECTURES, NAMES, _permute, _unpermute
from .read import find_gguf, load_gguf, read_metadata
from .tokenizer import PRE_TOKENIZERS, gguf_tokenizer, tokenizer_json
from .write import write_gguf

__all__ = ["ARCHITECTURES", "NAMES", "PRE_TOKENIZERS", "find_gguf", "gguf_config", "gguf_tokenizer", "load_gguf",
           "read_metadata", "tokenizer_json", "write_gguf"]
