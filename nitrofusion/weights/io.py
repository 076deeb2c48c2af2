"""Read a UNet (or SD3 transformer) state dict from a safetensors file, a model folder or a pipeline directory.

The tensors stay memory-mapped from their files (safetensors' own loading): a weight-arithmetic
command over three SDXL UNets then holds in RAM only what it writes, where building each
UNet with `from_pretrained` would hold ~10 GB of fp32 parameters apiece.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import (
    check_diffusers_layout,
    check_model_index,
    is_flow_pipeline,
    layout_problems,
    read_safetensors,
    resolve_model,
    weights_variant,
)
from nitrofusion.userfiles import replacing

WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file stem for a model's weights


DENOISERS = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}
SD3_KEY = "pos_embed.proj.weight"  # an SD3 transformer's patch embedding; a UNet has conv_in instead


def unet_state_dict(source: str | Path, what: str, component: str | None = "unet") -> dict[str, torch.Tensor]:
    """`source`: a .safetensors state dict, a diffusers UNet folder, or a pipeline directory
    (or hub id in the local cache) whose `unet/` is read (sharded and fp16 variants included).
    Tensors keep the dtype they are stored in. `component="transformer"`: an SD3 transformer's;
    None: whichever of the two the source holds (a pipeline's by its model index)."""
    path = Path(source).expanduser()
    if path.is_file() or path.suffix == ".safetensors":
        state = read_safetensors(path)
        check_diffusers_layout(state, f"{what} '{source}'")
        return state
    if (path / "config.json").is_file():
        folder = path
    else:
        denoisers = list(DENOISERS) if component is None else [component]
        root = resolve_model(source, option=what, allow_flow=component != "unet", weights_of=denoisers)
        if component is None:
            component = "transformer" if is_flow_pipeline(check_model_index(root)) else "unet"
        folder = root / component
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{what} '{source}' is neither a .safetensors file nor a pipeline with a {component or 'unet'}/ folder"
        )
    try:
        kind = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{what} '{source}': {folder / 'config.json'} is not a readable model config") from None
    wanted = list(DENOISERS.values()) if component is None else [DENOISERS[component]]
    if kind not in wanted:
        raise UserError(f"{what} '{source}' holds a {kind}, not a {' or '.join(wanted)}")
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, f"{what} '{source}'"):
        part = read_safetensors(file)
        twice = state.keys() & part.keys()
        if twice:
            raise UserError(f"{what} '{source}': {sorted(twice)[0]} is in two of its weight files")
        state.update(part)
    return state


def weight_files(folder: Path, what: str) -> list[Path]:
    """A diffusers model folder's safetensors files, as `from_pretrained` picks them: the sharded
    index where there is one, else the single file; the fp16 variant where only it is there."""
    variant = weights_variant(folder)
    infix = f".{variant}" if variant else ""
    index = folder / f"{WEIGHTS_NAME}.safetensors.index{infix}.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{what}: {index} is not a readable shard index") from None
        if not all(isinstance(s, str) and s == Path(s).name for s in shards):
            raise UserError(f"{what}: {index} names shards outside its folder")
        return [folder / s for s in sorted(shards)]
    single = folder / f"{WEIGHTS_NAME}{infix}.safetensors"
    if not single.is_file():
        raise UserError(f"{what}: {folder} holds no {single.name} (only safetensors weights are read)")
    return [single]


def check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: tuple[str, str]) -> None:
    """One line naming the first keys or shapes on which two state dicts disagree."""
    problems = layout_problems(a, b, names)
    if problems:
        raise UserError(f"{names[0]} and {names[1]} are not the same architecture: " + "; ".join(problems))


# The safetensors format's names of the dtypes a UNet's state dict holds.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
NEWER_DTYPES = {"uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
SAFETENSORS_DTYPES.update({getattr(torch, n): code for n, code in NEWER_DTYPES.items() if hasattr(torch, n)})


def check_not_an_input(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Refuse an output path that is one of the inputs (by option name): it would be replaced."""
    target = Path(out).expanduser().resolve()
    for option, source in inputs.items():
        path = Path(source).expanduser()
        if path.exists() and path.resolve() == target:
            raise UserError(f"--out '{out}' is the {option} file: write the result to a new file")


def write_state_dict(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """`state` as safetensors, each tensor brought to host memory as it is written: safetensors'
    `save_file` needs them all there at once (a checkpoint at SDXL size is 43 GB). The widest
    dtypes first (then by name), so that every tensor's data starts aligned to its element size."""
    names = sorted(state, key=lambda k: (-state[k].dtype.itemsize, k))
    layout = [(k, state[k].dtype, tuple(state[k].shape)) for k in names]
    return write_safetensors_streaming(path, layout, (state[k] for k in names), metadata)


def write_safetensors_streaming(
    path: str | Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file a tensor at a time: `layout` (name, dtype, shape) makes the header
    before any tensor exists, and `tensors` yields them in that order, each written and dropped.
    `save_file` needs every tensor at once: a moved SDXL UNet held whole is 5-10 GB of RAM.
    Atomic like `save_state_dict` (written beside `path`, renamed when complete)."""
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")  # or the file is unreadable
    header: dict[str, dict] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: safetensors has no {dtype}")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for (name, dtype, shape), tensor in zip(layout, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
            fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
    return path
