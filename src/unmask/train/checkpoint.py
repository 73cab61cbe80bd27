"""Training checkpoints: weights, optimizer, RNG and data position, written atomically.

Everything tensor-valued is stored as safetensors and the rest as JSON, so resuming never unpickles.
A checkpoint directory is assembled under a temp name and renamed into place; `latest` is a small
file updated by rename, so a crash at any instant leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import atomic_write_text
from ..errors import UserError


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _commit(root: Path, step: int, keep: int, write) -> Path:
    """`write(tmp)` fills a temp directory, which is renamed into place as step_<step>; `latest` then
    points at it (by rename) and only the newest `keep` checkpoints stay. A crash at any instant
    leaves the previous checkpoint usable."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}."))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    extra: dict, keep: int = 2, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    def write(tmp: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr():
            state.pop("lm_head.weight")
        save_file(state, tmp / "model.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if ema_state is not None:
            save_file(ema_state, tmp / "ema.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=2))

    return _commit(root, step, keep, write)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer.json").exists():
        raise UserError(f"{pointer}: points at {path.name}, which is missing or incomplete; delete {pointer} "
                        "to restart or point it at an earlier step_* directory")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ema=None) -> dict:
    meta = json.loads((path / "trainer.json").read_text())
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise UserError(f"{path}: checkpoint does not match the model in the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the config it was trained with")
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    om = meta["optimizer"]
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    for key, v in om["scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": om["param_groups"]})
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise UserError(f"{path}: has no EMA state but the config sets train.ema; resume with the "
                            "config it was trained with")
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    return meta


def save_full_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict,
                         param_groups: list, extra: dict, keep: int = 2,
                         ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint of full (gathered) state keyed by parameter name (train/parallel.py: written by
    rank 0 whatever the number of ranks, so it resumes on any): model.safetensors, optimizer.safetensors
    ("<name>/<exp_avg|exp_avg_sq|step>"), trainer.json. Atomic like `save_checkpoint`."""
    def write(tmp: Path) -> None:
        state, seen = {}, set()
        for k, v in model_state.items():
            if v.data_ptr() in seen and k == "lm_head.weight":  # tied to the embedding: stored once
                continue
            seen.add(v.data_ptr())
            state[k] = v.detach().cpu().contiguous()
        save_file(state, tmp / "model.safetensors")
        tensors = {f"{name}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
                   for name, st in optim_state.items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        if ema_state is not None:
            save_file(ema_state, tmp / "ema.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "param_groups": param_groups, **extra}, indent=2))

    return _commit(root, step, keep, write)


def load_full_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state {name: {key: tensor}}, trainer.json) of `save_full_checkpoint`;
    restores the torch RNG."""
    meta = json.loads((path / "trainer.json").read_text())
    model = load_file(path / "model.safetensors")
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    optim: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        optim.setdefault(name, {})[k] = v
    return model, optim, meta
