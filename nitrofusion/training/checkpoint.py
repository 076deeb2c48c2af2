"""Atomic, pickle-free checkpoints: every tensor in one safetensors file, the rest in JSON.

A checkpoint is a directory `step-XXXXXXXX/` holding `state.safetensors` and `meta.json`.
It is written under a temporary name and renamed into place only when complete, so a crash
or a full disk mid-write never leaves a half-written checkpoint under a real name.
Optimizer states are flattened to tensors plus JSON hyper-parameters (no torch.load).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
PREFIX = "step-"


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into named tensors and its param groups into JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        idx, name = key[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state()}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def save(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under root atomically; keep the newest `keep` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1))
        for f in (STATE_FILE, META_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    tensors = load_file(str(path / STATE_FILE))
    meta = json.loads((path / META_FILE).read_text())
    return tensors, meta


def load_latest(root: str | Path, log=print) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint under root; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load(path)
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            log(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); trying the previous one")
    return None
