"""The one typed config system: pydantic models, shared by checkpoints, training and generation.

Configs are strict (unknown keys are errors) so that a typo in a config file fails loudly instead of
silently training the wrong model.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .fsutil import atomic_write_text  # noqa: F401  (re-exported: config writers use it)

Attention = Literal["full", "block", "causal"]
Objective = Literal["mdlm", "bd3lm", "ar"]

# Which attention each objective trains; a mismatch would silently train a broken model.
OBJECTIVE_ATTENTION: dict[str, str] = {"mdlm": "full", "bd3lm": "block", "ar": "causal"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class RopeScaling(Strict):
    """Context extension of RoPE, as Hugging Face configs declare it in `rope_scaling` (model/rope.py)."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    factor: float = Field(gt=0)
    # The context the model was pretrained with (dynamic, yarn); None -> max_seq_len.
    original_max_position_embeddings: int | None = Field(None, ge=1)
    # YaRN: the ramp between interpolated and extrapolated frequencies, in rotations over the original
    # context; the attention scale (None -> 0.1 ln(factor) + 1, or the mscale ratio when both are given).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3 (Llama 3.1+): wavelengths below original / high_freq_factor kept, above original /
    # low_freq_factor divided by factor, a smooth blend between.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


class MoEConfig(Strict):
    """A mixture-of-experts MLP (model/mlp.py), LLaDA2 / DeepSeek-V3 routing: the router's scores
    (sigmoid or softmax, in fp32) plus an optional per-expert bias pick the experts, group-limited
    when n_group > 1 (groups ranked by the sum of their two best biased scores, the best topk_group
    kept); the chosen experts' unbiased scores, renormalised if norm_topk_prob, times
    routed_scaling_factor, weight their outputs; shared experts are added with weight 1."""

    n_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    expert_hidden: int = Field(ge=1)  # each routed expert's SwiGLU width
    n_shared_experts: int = Field(0, ge=0)  # one shared SwiGLU of width expert_hidden * n_shared_experts
    first_k_dense: int = Field(0, ge=0)  # the first k layers keep the dense MLP (width mlp_hidden)
    n_group: int = Field(1, ge=1)
    topk_group: int = Field(1, ge=1)
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False  # a learned/balanced bias added to the scores for choosing only

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_experts % self.n_group:
            raise ValueError(f"n_experts={self.n_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.n_experts // self.n_group):
            raise ValueError("top_k exceeds the experts of the topk_group groups kept")
        return self


class ArchConfig(Strict):
    """Network shape. Token ids and vocabulary come from the tokenizer (see ModelConfig)."""

    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # None -> n_heads (no GQA)
    mlp_hidden: int | None = None  # None -> SwiGLU's usual 8/3 * d_model, rounded up to 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: Attention = "block"
    block_size: int = 16
    objective: Objective = "bd3lm"
    # Give each [MASK] input embeddings of the nearest visible token on its left and of its
    # distance (model/shift.py). A masked query has nothing of its own; without this it must learn
    # to find its neighbours by attention, and a BD3 model at block 1 (the AR objective) measured
    # far slower to train than the AR twin. Clean inputs are unchanged, so an AR model (which never
    # sees [MASK]) computes the same function with or without it.
    token_shift: bool = False
    # Features of other checkpoint families (src/unmask/families/); the defaults are today's model.
    head_size: int | None = Field(None, ge=2)  # per-head width of q, k, v; None -> d_model // n_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2: Dream, Fast-dLLM v2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3: SDAR; LLaDA2)
    rotary_dim: int | None = Field(None, ge=2)  # RoPE on the first rotary_dim dims of each head; None -> all
    rope_scaling: RopeScaling | None = None
    moe: MoEConfig | None = None  # None -> every layer has the dense SwiGLU

    @model_validator(mode="after")
    def _check(self):
        if self.head_size is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}")
        if self.moe is not None and self.moe.first_k_dense > self.n_layers:
            raise ValueError(f"moe.first_k_dense={self.moe.first_k_dense} exceeds n_layers={self.n_layers}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        want = OBJECTIVE_ATTENTION[self.objective]
        if self.attention != want:
            raise ValueError(f"objective {self.objective!r} needs attention {want!r}, got {self.attention!r}")
        return self

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64


class ModelConfig(ArchConfig):
    """What `config.json` of a checkpoint in our layout holds."""

    model_type: Literal["unmask"] = "unmask"
    # The checkpoint family whose semantics these weights follow (src/unmask/families/): "unmask", or a
    # Hugging Face model_type such as "llada", "Dream", "sdar", "llada2_moe", "Fast_dLLM_Qwen".
    # model_type stays "unmask": it names this file's layout, family names the model's conventions.
    family: str = "unmask"
    # 1: the logits at position i predict token i + 1 (Dream, Fast-dLLM v2: AR-initialised models).
    # The network never shifts; whoever reads its logits does (model/logit_shift.py).
    logit_shift: int = Field(0, ge=0, le=1)
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int

    @model_validator(mode="after")
    def _ids(self):
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"{name}={v} is outside the vocabulary of {self.vocab_size}")
        return self


class DecodingPreset(Strict):
    """What a `reasoning_effort` level means for a model (None: the model's default for that field)."""

    policy: str | None = None
    threshold: float | None = None
    fallback: Literal["best", "leftmost"] | None = None
    steps: int | None = None


EFFORTS = ("instant", "low", "medium", "high")
# Used for a level a model's generation_config.json does not define: faster to more careful commits
# (threshold policy, which every family decodes with); "medium" is the model's own default.
DEFAULT_PRESETS = {"instant": DecodingPreset(policy="threshold", threshold=0.5),
                   "low": DecodingPreset(policy="threshold", threshold=0.6),
                   "medium": DecodingPreset(),
                   "high": DecodingPreset(policy="threshold", threshold=0.9)}


class GenerationConfig(Strict):
    """Defaults for decoding, stored as `generation_config.json` beside the weights."""

    policy: str = "topk"
    threshold: float = 0.9
    # What a step commits when the policy's rule picks nothing (sampling/policies.py FALLBACKS): the
    # position the rule ranks first ("best", Fast-dLLM) or the leftmost masked one.
    fallback: Literal["best", "leftmost"] = "best"
    steps: int | None = None  # None -> one step per token (the exact, slow end)
    block_size: int = 32
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    # How a block or causal model is shown a fill-in-the-middle request: the layout it was trained
    # on (data.fim_layout; train/batches.py FimSpec has both).
    fim_layout: Literal["psm", "spm"] = "psm"
    # reasoning_effort (Mercury's instant / low / medium / high) -> decoding settings; levels left
    # out take DEFAULT_PRESETS.
    presets: dict[Literal["instant", "low", "medium", "high"], DecodingPreset] = Field(default_factory=dict)

    def preset(self, effort: str) -> DecodingPreset:
        return self.presets.get(effort, DEFAULT_PRESETS[effort])


class DataConfig(Strict):
    dir: str = "corpus/default"
    seq_len: int = 256
    fim_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of training windows rearranged prefix-suffix-middle
    # End each middle with EOS. Without it a model never learns where an infill stops (version 3's
    # models filled a HumanEval line 0 times in 164).
    fim_end: bool = False
    fim_line_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of FIM windows cut at line starts
    fim_max_lines: int = Field(3, ge=1)  # such a middle is 1..fim_max_lines whole lines
    fim_layout: Literal["psm", "spm"] = "psm"  # stored in the export's generation_config.json
    # Train on the first N tokens of the split only (0: all of it). Windows are drawn from the array the
    # trainer sees, so a run on a prefix is reproducible from the full corpus.
    train_tokens: int = Field(0, ge=0)


class OptimConfig(Strict):
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # "cosine": warmup, then cosine decay to min_lr over the run. "wsd" (warmup-stable-decay): lr held
    # flat until the last decay_frac of max_steps, then decayed to min_lr. A run whose length is only
    # known later (a time-boxed GPU lease) can therefore be extended on resume by raising max_steps,
    # without changing a single step already taken.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_frac: float = Field(0.2, gt=0.0, le=1.0)


class DiffusionConfig(Strict):
    schedule: Literal["linear", "cosine"] = "linear"
    eps: float = 1e-3
    antithetic: bool = True
    # How the training loss samples the NELBO: "time" masks each token with probability t (weight
    # 1/t); "count" masks exactly k of n tokens per block, k uniform (weight n/k, capped at n).
    # Same expectation, lower variance for "count". Evaluation always uses "time".
    estimator: Literal["time", "count"] = "time"


class LoopConfig(Strict):
    max_steps: int = 1000
    batch_size: int = 32  # global, in sequences, per optimizer step
    micro_batch_size: int = 0  # 0 -> batch_size / world size (no accumulation)
    eval_interval: int = 200
    eval_batches: int = 8
    ckpt_interval: int = 200
    log_interval: int = 10
    seed: int = 0
    threads: int = 0  # CPU intra-op threads; 0 -> torch's default
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model (measured: ~5% on the 2-core CPU, more on GPU)
    ema: float = Field(0.0, ge=0.0, lt=1.0)  # EMA decay; 0 disables
    peak_tflops: float = 0.0  # for MFU on devices the trainer does not know; 0 -> known GPUs only
    # Fine-tune: start from this model directory's weights (its architecture must equal [model]);
    # the optimizer, schedule and step count start afresh. "" trains from scratch.
    init_from: str = ""
    # Under torchrun: "ddp" (replicas) or "fsdp" (FSDP2: parameters, gradients and optimizer state
    # sharded); "auto" = ddp with several ranks (train/parallel.py). `unmask train --parallel` overrides.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass


class FinetuneConfig(Strict):
    """`unmask finetune`: supervised fine-tuning of a saved model on a JSONL file (train/finetune.py)."""

    epochs: float = Field(3.0, gt=0.0)  # passes over the training examples (fractions allowed)
    # examples per optimizer step (4: twice the steps of 8 for the same epochs; measured on
    # bench/facts.py with the rest of today's defaults, 8 learned fewer facts)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(0, ge=0)  # longest example in tokens; 0 -> the model's max_seq_len
    skip_long: bool = False  # leave out longer examples (counted) instead of stopping at the first
    # 0 -> finetune: by the model's size (train/finetune.py default_lr: 2e-3 at 28M parameters, 2.5e-5
    # at 8B; LoRA 2e-3 to 2e-4); distill: 1e-3 with LoRA, 5e-5 for all weights
    lr: float = Field(0.0, ge=0.0)
    min_lr_frac: float = Field(0.1, ge=0.0, le=1.0)  # cosine decay ends at lr * this
    warmup_frac: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    lora: bool = False  # train low-rank adapters (peft) and merge them into the saved weights
    # rank 64 (as QLoRA on 7-65B models), scale alpha / rank = 2. bench/facts.py, 200 facts, lr 2e-3:
    # rank 8 taught 13, rank 64 128, rank 256 3 (unstable at that rate)
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float = Field(128.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # every linear layer of the blocks; the LM head is tied to the embedding and stays as it is
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    val_frac: float = Field(0.1, ge=0.0, lt=1.0)  # examples held out to measure the loss before and after
    seed: int = 0
    threads: int = Field(0, ge=0)  # CPU intra-op threads; 0 -> torch's default
    ckpt_interval: int = Field(0, ge=0)  # steps between checkpoints for --resume; 0 -> a tenth of the run (>= 25)
    # Under torchrun: "ddp" (replicas) or "fsdp" (FSDP2: parameters, gradients and optimizer state sharded);
    # "auto" = ddp with several ranks, a plain single process otherwise (train/parallel.py)
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # Diffusion objectives: each example is noised this many times per step (its copies' losses are
    # averaged), spread over mask levels and over the answer's tokens (rotate_noise: train/finetune.py
    # rotate_copies), so every answer token is masked, hence learned, in the steps that see it. One
    # noising per step masks a token in about half of them: bench/facts.py, 200 facts, 8 epochs: 27%
    # exact with 1, 91% with 4 independent copies, 97% with 4 rotated ones.
    noise_samples: int = Field(4, ge=1, le=16)
    rotate_noise: bool = True
    diffusion: DiffusionConfig = DiffusionConfig(estimator="count")

    @property
    def learning_rate(self) -> float:
        return self.lr or (1e-3 if self.lora else 5e-5)


class DistillConfig(FinetuneConfig):
    """`unmask distill` (train/distill.py): the model's own careful decoding of corpus prompts, then a
    fine-tune that makes what it writes confident earlier. The optimiser fields are finetune's."""

    epochs: float = Field(2.0, gt=0.0)
    batch_size: int = Field(8, ge=1)
    noise_samples: int = Field(1, ge=1, le=16)  # distill's loss draws its own masks (train/distill.py)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    val_frac: float = Field(0.05, ge=0.0, lt=1.0)
    prompts: int = Field(512, ge=2)  # teacher prompts drawn from the corpus's train split
    fim_frac: float = Field(0.25, ge=0.0, le=1.0)  # share of them fill-in-the-middle (1-3 lines cut out)
    prompt_chars: int = Field(800, ge=64)  # the longest prompt (prefix + suffix) in characters
    max_tokens: int = Field(64, ge=4)  # teacher completion length
    concurrency: int = Field(16, ge=1)  # teacher requests in flight
    certainty: float = Field(1.0, ge=0.0)  # weight of the entropy term on masked positions predicted right
    block_size: int = Field(0, ge=0)  # block models: train (and save) this decode block size; 0 keeps the model's


class TrainConfig(Strict):
    model: ArchConfig = ArchConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: LoopConfig = LoopConfig()
    generation: GenerationConfig = GenerationConfig()


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{where}: {first['msg']}"


def parse(cls: type[Strict], data: dict, source: str | os.PathLike):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: invalid config: {_format_validation(e)}; fix that field") from None


def load_json(cls: type[Strict], path: str | os.PathLike):
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is corrupt") from None
    return parse(cls, data, path)


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found; pass a file under configs/") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    return parse(TrainConfig, data, path)


def save_json(obj: BaseModel, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(obj.model_dump(), indent=2) + "\n")
