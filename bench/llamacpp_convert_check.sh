#!/usr/bin/env bash
# Does llama.cpp's own converter (convert_hf_to_gguf.py) accept what `unmask convert --to llama` writes?
# A one-off check, not part of the test suite (it downloads the llama-cpp-python sdist from PyPI, about
# 75 MB, and builds a throwaway venv with torch, transformers 4.x and llama.cpp's gguf-py).
#
#   bench/llamacpp_convert_check.sh [MODEL] [WORKDIR]     # defaults: models/unmask-coder-ar, /tmp/lcpp
#
# Steps, each printed with its result:
#  1. `unmask convert MODEL WORKDIR/hf --to llama` (the LlamaForCausalLM directory);
#  2. the converter's pinned transformers (4.57) in the throwaway venv runs that directory: its logits
#     and tokenizer ids against unmask's, computed in .venv;
#  3. the stock convert_hf_to_gguf.py on it. The tensors and config are accepted; the vocabulary is not:
#     the converter names a BPE pre-tokenizer by hashing the token ids of a test text, and our
#     vocabulary's hash is in none of its tables ("BPE pre-tokenizer was not recognized"), as for any
#     model llama.cpp has not listed;
#  4. the same converter with that hash registered as "gpt-2", which is what our pre-tokenizer is
#     (GPT-2's ByteLevel split: tokenizer.json says so, and the wrapper checks it), the step llama.cpp
#     asks of a new model (convert_hf_to_gguf_update.py);
#  5. the GGUF read back by unmask (tokenizer rebuilt from the GGUF metadata alone): logits and token
#     ids against the original model.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/unmask-coder-ar}
WORK=${2:-/tmp/lcpp}
PY=.venv/bin/python
VERSION=0.3.36  # llama-cpp-python; any version whose sdist vendors llama.cpp's converter
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
LC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

if [ ! -f "$SDIST" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
fi
if [ ! -f "$LC/convert_hf_to_gguf.py" ]; then
  tar -xzf "$SDIST" -C "$WORK" --wildcards "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion/*" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py/*"
fi
if [ ! -x "$WORK/venv/bin/python" ]; then
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q torch==2.13.0  # pinned first, so nothing below pulls another torch
  "$WORK/venv/bin/pip" install -q "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" "transformers==4.57.6" \
    "protobuf>=4.21.0,<5.0.0"
  "$WORK/venv/bin/pip" install -q "$LC/gguf-py"
fi
VPY="$WORK/venv/bin/python"

echo "== 1. unmask convert $MODEL -> llama"
rm -rf "$WORK/hf" "$WORK/gguf" && mkdir -p "$WORK/gguf"
$PY -m unmask.cli convert "$MODEL" "$WORK/hf" --to llama --dtype fp32

echo "== 2. transformers $("$VPY" -c 'import transformers; print(transformers.__version__)') runs it"
$PY - "$MODEL" "$WORK" <<'EOF'
import sys, torch
from safetensors.torch import save_file
import unmask
model = unmask.load(sys.argv[1])
prompts = ["def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self", "for i in range(10):"]
out = {}
for i, p in enumerate(prompts):
    ids = torch.tensor([model.tokenizer.encode(p)])
    out[f"ids{i}"], out[f"raw{i}"] = ids, model.net(ids).detach().float()
save_file(out, f"{sys.argv[2]}/unmask_logits.safetensors", metadata={"prompts": "\x1f".join(prompts)})
EOF
"$VPY" - "$WORK" <<'EOF'
import sys, torch, transformers
from safetensors import safe_open
work = sys.argv[1]
with safe_open(f"{work}/unmask_logits.safetensors", "pt") as f:
    ref = {k: f.get_tensor(k) for k in f.keys()}
    prompts = f.metadata()["prompts"].split("\x1f")
hf = transformers.AutoModelForCausalLM.from_pretrained(f"{work}/hf", dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained(f"{work}/hf")
worst = 0.0
for i, p in enumerate(prompts):
    assert tok.encode(p, add_special_tokens=False) == ref[f"ids{i}"][0].tolist(), p
    with torch.no_grad():
        worst = max(worst, (hf(ref[f"ids{i}"]).logits - ref[f"raw{i}"]).abs().max().item())
print(f"transformers {transformers.__version__}: same token ids, logits max |diff| vs unmask {worst:.2e}")
assert worst < 1e-4
EOF

echo "== 3. stock convert_hf_to_gguf.py"
if "$VPY" "$LC/convert_hf_to_gguf.py" "$WORK/hf" --outfile "$WORK/gguf/stock.gguf" --outtype f32 \
    >"$WORK/stock.log" 2>&1; then
  echo "accepted: $WORK/gguf/stock.gguf"
  GGUF="$WORK/gguf/stock.gguf"
else
  echo "refused: $(grep -E 'Error|error' "$WORK/stock.log" | tail -1)"
  grep -E "chkhsh:" "$WORK/stock.log" | head -1 || true

  echo "== 4. convert_hf_to_gguf.py with our tokenizer's hash registered as gpt-2 (log: $WORK/patched.log)"
  "$VPY" - "$LC" "$WORK" >"$WORK/patched.log" 2>&1 <<'EOF' || { tail -5 "$WORK/patched.log"; exit 1; }
import json, runpy, sys
from pathlib import Path
lc, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(lc))
import conversion.base as base  # noqa: E402

stock = base.TextModel.get_vocab_base_pre
GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}

def get_vocab_base_pre(self, tokenizer):
    try:
        return stock(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(self.dir_model) / "tokenizer.json").read_text())["pre_tokenizer"]
        if pre != GPT2:
            raise
        return "gpt-2"  # GPT-2's ByteLevel regex split, which llama.cpp implements as "gpt-2"

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", str(work / "hf"), "--outfile", str(work / "gguf" / "model.gguf"),
            "--outtype", "f32"]
runpy.run_path(str(lc / "convert_hf_to_gguf.py"), run_name="__main__")
EOF
  echo "accepted: $WORK/gguf/model.gguf ($(grep -o 'n_tensors = [0-9]*' "$WORK/patched.log"))"
  GGUF="$WORK/gguf/model.gguf"
fi

echo "== 5. unmask reads the GGUF"
$PY - "$MODEL" "$GGUF" <<'EOF'
import sys, torch
import unmask
from unmask.families.gguf import read_metadata, _open
model, g = unmask.load(sys.argv[1]), unmask.load(sys.argv[2])
meta = read_metadata(_open(__import__("pathlib").Path(sys.argv[2])))
print("architecture", meta["general.architecture"], "| tokenizer.ggml.pre", meta.get("tokenizer.ggml.pre"),
      "| chat template", "yes" if meta.get("tokenizer.chat_template") else "no",
      "| eos", meta.get("tokenizer.ggml.eos_token_id"))
worst = 0.0
for p in ["def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self", "for i in range(10):"]:
    ids = model.tokenizer.encode(p)
    assert g.tokenizer.encode(p) == ids, p
    worst = max(worst, (g.logits([ids]) - model.logits([ids])).abs().max().item())
print(f"GGUF in unmask: same token ids, logits max |diff| vs {sys.argv[1]} {worst:.2e}")
assert worst < 1e-4
EOF
echo "ok"
