"""Atomic, pickle-free checkpoints: every tensor in one safetensors file, the rest in JSON.

A checkpoint is a directory `step-XXXXXXXX/` holding `state.safetensors` and `meta.json`.
It is written under a temporary name, flushed to disk and renamed into place only when
complete, so a crash, a `kill -9` or a full disk mid-write never leaves a half-written
checkpoint under a real name (the unfinished `.tmp-*` directory is removed by the next
writer). meta.json records the state file's size and CRC-32, so a checkpoint damaged later
(truncated copy, flipped bits) is found at load and skipped for the previous one.
Optimizer states are flattened to tensors plus JSON hyper-parameters (no torch.load).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nitrofusion.errors import UserError
from nitrofusion.training.faults import kill_point
from nitrofusion.userfiles import plain_permissions

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CorruptCheckpoint(ValueError):
    """The state file does not match the size or checksum recorded when it was written."""


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(
    opt: torch.optim.Optimizer, prefix: str, to_host: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into named tensors and the rest into JSON: its param groups and
    the state's plain numbers (bitsandbytes keeps `step` as an int, and its quantisation state in a
    nested dict, flattened here to dotted names; a tensor shared between parameters is stored once
    per parameter). `to_host=False` leaves the tensors where they are, for `save`, which brings
    them to host memory one at a time (AdamW's moments at SDXL size are 20.6 GB)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, int | float] = {}
    storages: set[int] = set()  # bitsandbytes shares one quantisation map among all its parameters

    def flatten(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{name}.{key}", inner)
        elif torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous() if to_host else value.detach()
            if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[f"{prefix}.{name}"] = tensor
        elif isinstance(value, int | float):
            numbers[name] = value
        else:
            raise TypeError(f"optimizer state {prefix}.{name} is a {type(value).__name__}: cannot be checkpointed")

    for idx, state in sd["state"].items():
        flatten(str(idx), state)
    meta: dict[str, Any] = {"param_groups": sd["param_groups"]}
    if numbers:
        meta["numbers"] = numbers
    return tensors, meta


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}

    def put(name: str, value: Any) -> None:
        idx, *path = name.split(".")
        node = state.setdefault(int(idx), {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            put(key[len(prefix) + 1 :], value)
    for name, value in meta.get("numbers", {}).items():
        put(name, value)
    # The checkpoint gives the state (moments, step counts); the hyper-parameters (learning rate,
    # betas, weight decay) and the kernels (fused, foreach: this run's device) are this run's
    # config, which a resumed run may change. load_state_dict would take every group entry from
    # the saved groups, and places `step` by their kernel flags.
    saved, live = meta["param_groups"], opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in live]:
        raise ValueError(f"{prefix}: the checkpoint's parameter groups differ from this run's")
    groups = [{**now, "params": then["params"]} for then, now in zip(saved, live)]
    opt.load_state_dict({"state": state, "param_groups": groups})


def fingerprint(state: dict[str, torch.Tensor], samples: int = 1024) -> str:
    """A digest that tells one set of weights from another without storing or reading them whole:
    per tensor, its name, its shape and `samples` evenly spaced values rounded to bf16. The same
    weights held in fp32 or bf16, on any device, give the same digest (a run may resume at another
    precision, as a full student may); another model's weights give another. Weights that differ
    only between the sampled values are not told apart: it identifies models, it is no checksum."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        flat = state[name].detach().reshape(-1)
        digest.update(f"{name}{tuple(state[name].shape)};".encode())
        if flat.numel() > samples:  # integer positions: the same on every device
            index = torch.arange(samples) * (flat.numel() - 1) // (samples - 1)
            flat = flat[index.to(flat.device)]
        if flat.is_floating_point():
            flat = flat.to(torch.bfloat16).float()
        digest.update(flat.cpu().numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> dict[str, torch.Tensor]:
    """torch's global random state, and CUDA's where it is in use (sampling on a GPU draws from it)."""
    state = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under root atomically; keep the newest `keep` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_unfinished(root)  # left by a writer that was killed; one writer at a time (rank 0)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        state = tmp / STATE_FILE
        # A tensor at a time in host memory: the whole state at SDXL size is 43 GB.
        from nitrofusion.weights.io import write_state_dict  # diffusers: not for reading a checkpoint

        write_state_dict(state, tensors)
        kill_point("checkpoint", step)
        record = {"step": step, "state_bytes": state.stat().st_size, "state_crc32": file_crc32(state)}
        (tmp / META_FILE).write_text(json.dumps({**record, **meta}, indent=1))
        for f in (STATE_FILE, META_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        plain_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)  # the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


ABANDONED_PREFIX = "abandoned-"


def set_aside_later(root: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints after `step` to abandoned-step-...: a run resumed from an earlier
    checkpoint would otherwise prune its own new ones as the oldest, and `latest` would return to
    the abandoned run. Set aside, not deleted: they are the user's. Returns the new names."""
    moved = []
    for path in list_checkpoints(root):
        if int(path.name[len(PREFIX) :]) > step:
            target = path.with_name(ABANDONED_PREFIX + path.name)
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"{ABANDONED_PREFIX}{n}-{path.name}")
            os.replace(path, target)
            moved.append(target)
    return moved


def remove_unfinished(root: str | Path) -> list[Path]:
    """Delete checkpoint writes that never completed (their process died); returns them."""
    root = Path(root)
    stale = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_checkpoints(root: str | Path) -> list[Path]:
    """The checkpoints under root, oldest first: folders named exactly step-<digits>, as `save`
    names them. A user's copy (step-00000002-good) is no checkpoint, never pruned or resumed from."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's record, without its tensors: what a run checks before it loads a teacher
    (a mistyped --resume should not wait for the teacher pairs to be made)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory '{path}'")
    meta = json.loads((path / META_FILE).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CorruptCheckpoint(f"{META_FILE} is not a checkpoint record (no step)")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in '{path}'")
    return meta


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    meta = read_meta(path)
    state = path / STATE_FILE
    if "state_crc32" in meta:  # checkpoints written before the checksum was recorded load unchecked
        size = state.stat().st_size
        if size != meta["state_bytes"]:
            raise CorruptCheckpoint(f"{STATE_FILE} has {size} bytes, {meta['state_bytes']} were written")
        if file_crc32(state) != meta["state_crc32"]:
            raise CorruptCheckpoint(f"{STATE_FILE} does not match the checksum recorded when it was written")
    return load_file(str(state)), meta


def load_latest(
    root: str | Path, log: Callable[[str], object] = print
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint under root; unreadable ones are reported and skipped. None
    where there is no checkpoint. Where there are some and none can be read (a disk gone bad, files
    another user's), a UserError: starting afresh would set the run's outputs aside as an earlier
    run's and train again from step 0, where the run asked to go on."""
    found = list_checkpoints(root)
    reasons = []
    for path in reversed(found):
        try:
            return load(path)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            reasons.append(f"{type(exc).__name__}: {exc}")
            log(f"checkpoint {path} is unreadable ({reasons[-1]}); trying the previous one")
    if found:
        raise UserError(
            f"none of the {len(found)} checkpoints under '{root}' can be read (the newest: {reasons[0]}); "
            "move them aside to start again from step 0, or give --resume one of them"
        )
    return None
