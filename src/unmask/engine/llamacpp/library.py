"""llama.cpp's library through `llama-cpp-python`'s low-level (ctypes) API: one model, one context,
batches of input embeddings, the context's KV memory by sequence id, and the logits.

Only what the runner (runner.py) needs is wrapped. Batches are numpy arrays handed to llama.cpp by
pointer (no per-token Python objects), and logits come back as one numpy view copied once.
`llama-cpp-python` is optional: without it, `load_library()` raises one UserError saying how to
install it.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from ...errors import UserError

INSTALL_HINT = ("pip install llama-cpp-python (a source build of llama.cpp, ~10 minutes on 2 cores; "
                "`make llamacpp` does it with the options the README gives)")

_lib = None


def load_library():
    """The llama_cpp module, its backend initialised once and its logging silenced; UserError when it
    is not installed."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"backend 'llama.cpp' needs the llama-cpp-python package: {INSTALL_HINT}") from None
    except OSError as e:  # the shared library is present but does not load
        raise UserError(f"llama-cpp-python is installed but its library does not load ({e}); reinstall it: "
                        f"{INSTALL_HINT}") from None
    llama_cpp.llama_backend_init()
    if not os.environ.get("UNMASK_LLAMA_LOG"):
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    _lib = llama_cpp
    return _lib


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, user_data):  # llama.cpp's log callback: drop everything (UNMASK_LLAMA_LOG=1 keeps it)
    return None


def available() -> bool:
    try:
        load_library()
    except UserError:
        return False
    return True


@dataclass
class ContextOptions:
    n_ctx: int  # KV cells, all sequences together (one unified cache)
    n_seq_max: int  # sequence ids 0 .. n_seq_max - 1
    n_ubatch: int  # most tokens one decode call may carry
    n_threads: int
    kv_f32: bool  # KV cache in F32 (else F16, llama.cpp's default)
    causal: bool  # causal attention, else every token sees every cell of its first sequence


class LlamaContext:
    """A GGUF model and one llama.cpp context over it."""

    def __init__(self, gguf_path: str, opts: ContextOptions):
        lib = self.lib = load_library()
        mp = lib.llama_model_default_params()
        mp.use_mmap = True
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise UserError(f"{gguf_path}: llama.cpp could not load this GGUF file (UNMASK_LLAMA_LOG=1 shows why)")
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = opts.n_ctx, opts.n_ubatch, opts.n_ubatch
        cp.n_seq_max = opts.n_seq_max
        cp.n_threads = cp.n_threads_batch = opts.n_threads
        cp.kv_unified = True  # sequences share cells (a prefix is in every sequence that copies it)
        cp.no_perf = True
        # Flash attention accumulates in F16 on the CPU (logits ~3e-3 from PyTorch's at F32, against
        # ~1e-5 without it); F32 weights ask for F32 fidelity, the others get llama.cpp's default.
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED if opts.kv_f32 else lib.LLAMA_FLASH_ATTN_TYPE_AUTO
        if opts.kv_f32:
            cp.type_k = cp.type_v = lib.GGML_TYPE_F32
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise UserError(f"llama.cpp could not create a context of {opts.n_ctx} cells for {gguf_path}; "
                            f"lower kv_budget_tokens (UNMASK_LLAMA_LOG=1 shows why)")
        lib.llama_set_causal_attn(self.ctx, opts.causal)
        self.mem = lib.llama_get_memory(self.ctx)
        self.opts = opts
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    # ---- memory, by sequence ---------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Forget seq's cells at positions [p0, p1) (-1: open end); a cell no sequence holds is freed."""
        self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Add dst to the cells of src at positions [p0, p1): shared cells, nothing copied."""
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return self.lib.llama_memory_seq_pos_max(self.mem, seq)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)

    # ---- one decode call -------------------------------------------------------------------------
    def decode(self, embd: np.ndarray, pos: np.ndarray, seq_ids: np.ndarray, n_seq: np.ndarray,
               out: np.ndarray) -> np.ndarray:
        """Run one batch: embd (N, n_embd) float32, pos (N,) int32, seq_ids (N, K) int32 of which the first
        n_seq[i] count (the first one decides what the token sees), out (N,) int8: which tokens return
        logits. Returns their logits (n_out, n_vocab) float32 in batch order."""
        lib = self.lib
        n = embd.shape[0]
        if n > self.opts.n_ubatch:
            raise ValueError(f"a decode call of {n} tokens exceeds n_ubatch {self.opts.n_ubatch}")
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        seq_ids = np.ascontiguousarray(seq_ids, dtype=np.int32)
        n_seq = np.ascontiguousarray(n_seq, dtype=np.int32)
        out = np.ascontiguousarray(out, dtype=np.int8)
        row = seq_ids.strides[0]
        ptrs = (ctypes.POINTER(ctypes.c_int32) * n)()
        base = seq_ids.ctypes.data
        for i in range(n):
            ptrs[i] = ctypes.cast(base + i * row, ctypes.POINTER(ctypes.c_int32))
        batch = lib.llama_batch()
        batch.n_tokens = n
        batch.token = ctypes.POINTER(ctypes.c_int32)()
        batch.embd = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        batch.pos = pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.n_seq_id = n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ptrs
        batch.logits = out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on a batch of {n} tokens "
                               f"(1: no room in the KV cache; UNMASK_LLAMA_LOG=1 shows why)")
        k = int(out.astype(bool).sum())
        if k == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        ptr = lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(k, self.n_vocab)).copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
