"""Find a pipeline (directory or hub cache), load it safely, and put a student into it.

Only safetensors are ever read and remote code is never trusted. A NitroSD-style student
is a plain UNet state dict in safetensors, loaded into the model's own UNet config, as the
public checkpoints are (`UNet2DConditionModel.from_config(...)` + `load_state_dict`).

UNet pipelines (SDXL, SD1.5 architecture) are loaded for everything. Flow-matching transformers
of the SD3 architecture (`StableDiffusion3Pipeline`: SD3-Medium, SD3.5-Large, SD3.5-Large-Turbo)
are sampled with their own scheduler (generate, evaluate, app) and distilled (distill,
make-pairs); never where a UNet is needed (`--unet`, `transfer`); other transformer pipelines
(Flux...) are refused by name (`check_architecture`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from nitrofusion.errors import UserError, first_line
from nitrofusion.scheduling import TimestepShiftLCMScheduler

Sampler = Literal["auto", "shift-lcm", "native"]
DEFAULT_SHIFT = 250
SHIFT_LCM_MAX_STEPS = 4


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(
    model: str | Path,
    option: str = "--model",
    unet_weights: bool = True,
    allow_flow: bool = False,
    unet_only: Sequence[str] = (),
    weights_of: Sequence[str] | None = None,
) -> Path:
    """A local diffusers pipeline directory for `model` (a path or a hub id in the local cache);
    `option`: what the user gave it as, for the messages. `unet_weights=False`: a student UNet
    replaces the pipeline's, so a cached copy without UNet weights will do and none is fetched.
    `allow_flow`, `unet_only`: `check_architecture`'s, applied to a hub model's index before any
    of its weights is looked for or fetched (a local directory is checked by the caller).
    `weights_of`: the only folders whose weights a download fetches (the weights commands read the
    denoiser alone: SDXL base's text encoders and VAE are 3.6 GB more in fp32); None: every component's."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        raise UserError(
            f"model '{model}' is a single weights file, where a diffusers pipeline directory is needed; "
            f"for a single-file checkpoint, {CONVERT_SINGLE_FILE}"
        )
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"model '{model}' is not a diffusers pipeline directory (no model_index.json in it)")
        return path
    looks_like_repo = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if looks_like_repo:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            cached = Path(snapshot_download(str(model), local_files_only=True))
            if (cached / "model_index.json").is_file():
                index = check_model_index(cached)
                # Before the UNet's weights are looked for: a cached SD3 has none, and is not "in part".
                check_architecture(index, str(model), allow_flow, unet_only)
                if _cached_in_full(cached, index, unet_weights, weights_of):
                    return cached
            # In part only: e.g. the public snippet's first line reads SDXL base's unet/config.json
            # alone, and its from_pretrained(..., unet=...) never fetches the base UNet's weights.
        except (LocalEntryNotFoundError, HFValidationError, OSError):
            pass
        if not _offline():
            try:
                return download_pipeline(str(model), snapshot_download, unet_weights, allow_flow, unet_only, weights_of)
            except UserError:
                raise
            except Exception as exc:  # network errors come in many types
                raise UserError(
                    f"model '{model}' is not in the Hugging Face cache and could not be downloaded "
                    f"({type(exc).__name__}); pass {option} a local pipeline directory"
                ) from None
        raise UserError(
            f"model '{model}' is not (in full) in the Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE is set; "
            f"download it where a hub is reachable or pass {option} a local pipeline directory"
        )
    raise UserError(f"model '{model}' not found: pass {option} a diffusers pipeline directory or a hub id")


# diffusers' fp16-variant file names: a single file, and shards (name.fp16-00001-of-00002.safetensors).
FP16_FILES = ("*.fp16.safetensors", "*.fp16-*.safetensors")


def weights_variant(folder: str | Path) -> str | None:
    """ "fp16" where a model directory (a pipeline or one component) holds only fp16-variant weights
    (FP16_FILES, as SDXL base's cache does after `from_pretrained(..., variant="fp16")`, the public
    NitroSD snippet's way), else None: the plain files are read when they exist."""
    folder = Path(folder)
    try:  # a pipeline: only the folders its index names (SDXL base's root holds single-file checkpoints)
        parts = [folder / name for name in component_folders(json.loads((folder / "model_index.json").read_text()))]
    except (OSError, ValueError, AttributeError):
        parts = [folder]
    files = [p.name for part in parts for p in part.rglob("*.safetensors")]
    plain = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in FP16_FILES)]
    return "fp16" if files and not plain else None


def component_folders(index: dict) -> list[str]:
    """The folders a pipeline's model_index.json names: its components that are not left out."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[:1] != [None]]


def _cached_in_full(root: Path, index: Mapping, unet_weights: bool, weights_of: Sequence[str] | None = None) -> bool:
    """Whether a cached snapshot with this model index can be loaded: the weights of every model
    folder (one with a model's config.json, not a tokenizer's or scheduler's) and of its denoiser
    are there, the UNet's only where needed (the NitroSD snippet caches SDXL base's unet/config.json
    alone); `weights_of`: those folders' only. A download for the weights commands fetches the
    denoiser alone, and a later `generate` of the same id then fetches the rest."""
    folders = [f for f in component_folders(index) if weights_of is None or f in weights_of]
    needed = {f for f in folders if (root / f / "config.json").is_file()}
    needed |= {"transformer" if is_flow_pipeline(index) else "unet"} & set(folders)
    if not unet_weights:
        needed.discard("unet")
    return all(any((root / f).glob("*.safetensors")) for f in needed)


def download_pipeline(
    repo: str,
    snapshot_download: Callable[..., str],
    unet_weights: bool = True,
    allow_flow: bool = False,
    unet_only: Sequence[str] = (),
    weights_of: Sequence[str] | None = None,
) -> Path:
    """A pipeline repo's model index, then only the folders it names, configs and safetensors in one
    precision: SDXL base's repo also holds two 6.9 GB single-file checkpoints at its root, a VAE
    variant and fp16 copies of every component (about 35 GB in all). The full-precision files are
    fetched (SDXL base: about 14 GB, twice its fp16 copies): a student trains from them, a weight
    delta is added to them, and they load in any precision. A repo of fp16 files only gives those.
    `unet_weights=False`: the UNet's config only (a student replaces its weights). `allow_flow`,
    `unet_only`: `check_architecture`'s, applied to the index before anything else is fetched.
    `weights_of`: `resolve_model`'s (the other folders' configs and tokenizers are still fetched)."""
    root = Path(snapshot_download(repo, allow_patterns=["model_index.json"]))
    index = check_model_index(root)  # refused before any weight is fetched
    # A refused SD3 or Flux repo is 20-30 GB that load_pipeline would not use.
    check_architecture(index, repo, allow_flow, unet_only)
    folders = component_folders(index)
    # *.model: a sentencepiece tokenizer's vocabulary (SD3's T5 tokenizer, spiece.model).
    files = [f"{folder}/{pattern}" for folder in folders for pattern in ("*.json", "*.txt", "*.model")]
    weighted = [
        folder
        for folder in folders
        if (unet_weights or folder != "unet") and (weights_of is None or folder in weights_of)
    ]
    plain = [f"{folder}/*.safetensors" for folder in weighted]
    root = Path(snapshot_download(repo, allow_patterns=files + plain, ignore_patterns=list(FP16_FILES)))
    if not any(root.rglob("*.safetensors")):  # a repo of fp16 files only
        fp16 = [f"{folder}/{pattern}" for folder in weighted for pattern in FP16_FILES]
        root = Path(snapshot_download(repo, allow_patterns=files + fp16))
    return root


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file '{path}' not found")
    if not path.is_file():
        raise UserError(f"weights file '{path}' is not a file (a .safetensors file is expected)")
    if path.suffix != ".safetensors":
        raise UserError(f"'{path}' is not a .safetensors file; only safetensors weights are loaded")
    return path


def unreadable_file(path: Path, exc: Exception) -> UserError:
    return UserError(f"'{path}' is not a readable safetensors file (corrupt or truncated?): {first_line(exc)}")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every kind of unreadable file into a UserError."""
    path = _weights_file(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise unreadable_file(path, exc) from None


def read_safetensors_layout(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's keys and shapes as meta tensors, from its header alone (for
    `check_state_dict` before a 10 GB file is read), with `read_safetensors`' errors."""
    path = _weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise unreadable_file(path, exc) from None


SHIFT_METADATA = "nitrofusion.shift"  # the timestep shift a student was trained with, in its safetensors header


def unet_file_metadata(shift: int | None) -> dict[str, str]:
    """The safetensors header of a student UNet file: the shift it samples at, where known."""
    return {"format": "pt"} | ({SHIFT_METADATA: str(shift)} if shift is not None else {})


SIGMAS_METADATA = "nitrofusion.sigmas"  # a flow student's levels per step count (nitrofusion.json's "sigmas")


def flow_file_metadata(sigmas: Mapping[int, list[float]]) -> dict[str, str]:
    """The safetensors header of a flow student's transformer file (and its LoRA): the `sigmas` its
    pipeline is called with per step count, where it records any (not at the stock levels)."""
    return {"format": "pt"} | ({SIGMAS_METADATA: json.dumps(dict(sigmas))} if sigmas else {})


def flow_file_sigmas(path: str | Path) -> dict[int, list[float]]:
    """`flow_file_metadata`'s sigmas, read back ({} where none are recorded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(SIGMAS_METADATA)
        recorded = json.loads(value) if value is not None else {}
        return {int(k): [float(x) for x in v] for k, v in recorded.items()}
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError):
        return {}  # read_safetensors says what is wrong with the file; a mangled header records nothing


# The public NitroSD UNets record no shift; their README samples each at its own.
PUBLIC_NITROSD_SHIFTS = {"nitrosd-realism_unet.safetensors": 250, "nitrosd-vibrant_unet.safetensors": 500}


def unet_file_shift(path: str | Path) -> int | None:
    """The shift recorded in a student UNet file by `save_unet_weights`, else a public NitroSD
    file's by its published name (None: neither; the user names it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(SHIFT_METADATA)
    except (SafetensorError, OSError, ValueError):
        return None  # read_safetensors says what is wrong with the file
    if value is None:
        return PUBLIC_NITROSD_SHIFTS.get(Path(path).name)
    return int(value) if value.isdigit() else None


# Single-file checkpoints in the original (ldm/sgm) layout: most fine-tunes of SD1.5 and SDXL ship so.
ORIGINAL_UNET_PREFIX = "model.diffusion_model."
CONVERT_SINGLE_FILE = (
    "convert it to a diffusers folder once with diffusers' own converter, e.g. "
    "StableDiffusionXLPipeline.from_single_file(FILE).save_pretrained(DIR) (offline: config= a local pipeline "
    "folder of the same architecture; StableDiffusionPipeline for SD1.5), and pass DIR"
)


def check_diffusers_layout(keys: Iterable[str], what: str) -> None:
    """Refuse a state dict in the original single-file layout, saying how to convert it: read as a
    diffusers UNet it is hundreds of "missing keys", or "not the same architecture" when it is."""
    if any(k.startswith(ORIGINAL_UNET_PREFIX) for k in keys):
        raise UserError(
            f"{what} is a single-file checkpoint in the original layout ({ORIGINAL_UNET_PREFIX}* keys), "
            f"not diffusers': {CONVERT_SINGLE_FILE}"
        )


def layout_problems(
    given: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    names: tuple[str, str] = ("file", "model"),
    label: Callable[[str], str] = str,
    limit: int = 3,
) -> list[str]:
    """How two state dicts' keys and shapes disagree, one phrase per kind, naming the first few
    keys (through `label`, e.g. the names the user's file uses); empty where they agree."""
    missing = [label(k) for k in expected if k not in given]
    extra = [label(k) for k in given if k not in expected]
    shapes = [
        f"{label(k)} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if shapes:
        problems.append(
            f"{len(shapes)} shape mismatches ({names[0]} vs {names[1]}), first: {', '.join(shapes[:limit])}"
        )
    if missing:
        problems.append(f"{len(missing)} keys missing from {names[0]}, first: {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"{len(extra)} keys only in {names[0]}, first: {', '.join(extra[:limit])}")
    return problems


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a UserError naming the first missing, unexpected or mis-shaped keys (or, for a state dict
    in the original single-file layout, how to convert it)."""
    check_diffusers_layout(state, what)
    problems = layout_problems(state, module.state_dict())
    if problems:
        raise UserError(f"{what} does not fit the model it is loaded into: " + "; ".join(problems))


def load_unet_weights(unet: UNet2DConditionModel, path: str | Path) -> UNet2DConditionModel:
    """Load a student UNet state dict (safetensors) into `unet`, checking every key and shape."""
    state = read_safetensors(path)
    check_state_dict(unet, state, f"UNet weights '{path}'")
    unet.load_state_dict(state)
    return unet


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """The device to run on (default: cuda if available): a UserError for a name torch does not know
    or a device this machine lacks, instead of an error deep inside the first `.to()`."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"device '{device}' is not supported: use cpu, cuda or cuda:N")
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available[parsed.type]():
        raise UserError(f"{parsed.type.upper()} was requested but is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"no device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(parsed)


DTYPES = {  # the names a user may give a floating-point dtype
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


@contextmanager
def quiet_loading(errors_too: bool = False) -> Iterator[None]:
    """Silence diffusers' and transformers' per-component loading bars and warnings; `errors_too`:
    their error logs as well, where the caller says a failure in one line itself."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    level = dlog.CRITICAL if errors_too else dlog.ERROR
    dlog.set_verbosity(level)
    tlog.set_verbosity(level)
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)


@contextmanager
def missing_weights_reported() -> Iterator[list[str]]:
    """The weights transformers found missing from a component's files while loading, one line
    each: it fills them with fresh random values and only logs a report (which `quiet_loading`
    hides), so a text encoder with a layer missing loaded and drew from a wrong prompt embedding
    without a word. Its handlers show errors only meanwhile, as under `quiet_loading`."""
    import logging

    import transformers.utils.logging as tlog

    found: list[str] = []

    class Reports(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            keys = re.findall(r"^(\S+)\s*\|\s*MISSING\b", text, flags=re.MULTILINE)
            if "LOAD REPORT" in text and keys:
                where = re.search(r"LOAD REPORT\S*\s+from:\s*(.+)", text)
                folder = Path(where.group(1).strip()).name if where else "a component"
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                found.append(f"'{folder}' lacks the weights {keys[0]}{more} (a damaged or partial copy)")

    errors_only = logging.Filter()
    errors_only.filter = lambda record: record.levelno >= logging.ERROR  # type: ignore[method-assign]
    root = logging.getLogger("transformers")
    shown = list(root.handlers)
    level = tlog.get_verbosity()
    reports = Reports(logging.WARNING)
    for handler in shown:
        handler.addFilter(errors_only)
    root.addHandler(reports)
    tlog.set_verbosity(logging.WARNING)
    try:
        yield found
    finally:
        tlog.set_verbosity(level)
        root.removeHandler(reports)
        for handler in shown:
            handler.removeFilter(errors_only)


def check_tokenizers(pipe: DiffusionPipeline, model_dir: Path) -> None:
    """A tokenizer folder without its vocabulary files loads as a tokenizer of a few special tokens
    that maps every word to the unknown id: refused, as is one with ids past its text encoder's
    embedding table."""
    for name, tokenizer in pipe.components.items():
        encoder = pipe.components.get(name.replace("tokenizer", "text_encoder"))
        if not name.startswith("tokenizer") or tokenizer is None or encoder is None:
            continue
        vocab = getattr(encoder.config, "vocab_size", None)
        if isinstance(vocab, int) and not vocab // 2 <= len(tokenizer) <= vocab:
            raise UserError(
                f"could not load the pipeline in '{model_dir}': '{name}' holds {len(tokenizer)} tokens for a text "
                f"encoder of {vocab} (its vocabulary files are missing or another model's)"
            )


def _scheduler_class_name(index: Mapping) -> str:
    entry = index.get("scheduler")
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 else ""


TRUSTED_LIBRARIES = ("diffusers", "transformers")  # and nitrofusion's own modules (our scheduler)


def _diffusers_pipeline_module(library: str) -> bool:
    """Whether `library` names one of diffusers' own pipeline packages, which diffusers resolves
    it to, as for SD1.5's safety checker (["stable_diffusion", "StableDiffusionSafetyChecker"]).
    Only a regular package inside diffusers/pipelines counts: no private or helper modules."""
    import importlib.util

    if not library.isidentifier() or library.startswith("_"):
        return False
    try:
        spec = importlib.util.find_spec(f"diffusers.pipelines.{library}")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is not None and spec.origin is not None


def check_model_index(model_dir: Path) -> dict:
    """Refuse a pipeline whose model_index.json names code from anywhere but diffusers, transformers
    or nitrofusion: a custom pipeline or component class would import a module shipped with the
    model, which is remote code however local the directory looks. Returns the index."""
    try:
        index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        raise UserError(f"'{model_dir / 'model_index.json'}' is not readable JSON: {exc}") from None
    if not isinstance(index, dict):
        raise UserError(f"'{model_dir / 'model_index.json'}' is not a diffusers model index")
    import diffusers

    name = index.get("_class_name")
    if not isinstance(name, str) or not name.endswith("Pipeline") or not hasattr(diffusers, name):
        raise UserError(
            f"'{model_dir}' names pipeline class {name!r}, which is not one of diffusers' own; "
            "custom pipelines (code shipped with a model) are never loaded"
        )
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library = value[0]
        if key == "scheduler" and value == ["__main__", TimestepShiftLCMScheduler.__name__]:
            continue  # the public snippet's class, saved from its script: read as ours (_read_pipeline)
        if not isinstance(library, str) or not (
            library in TRUSTED_LIBRARIES or library.startswith("nitrofusion.") or _diffusers_pipeline_module(library)
        ):
            raise UserError(
                f"'{model_dir}': component '{key}' comes from {library!r}; only diffusers, transformers and "
                "nitrofusion classes are loaded (never code shipped with a model)"
            )
    return index


# UNet text-to-image pipelines: what is distilled and sampled (SD1.5 and SDXL architecture).
UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

# Flow-matching transformer pipelines that are sampled (generate, evaluate, app), by their index entries.
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "SD3Transformer2DModel"}


def _component_class(index: Mapping, key: str) -> object:
    """The class name a model index gives component `key` (None where it has none, or not as a
    [library, class] pair: `"unet": null` is a hand-edited index's, refused by name below)."""
    value = index.get(key)
    return value[1] if isinstance(value, list) and len(value) == 2 else None


def is_flow_pipeline(index: Mapping) -> bool:
    """Whether a model index names a supported flow-matching transformer pipeline (SD3 architecture)."""
    kind = index.get("_class_name")
    return kind in FLOW_PIPELINES and _component_class(index, "transformer") == FLOW_PIPELINES[kind]


def unet_only_options(
    unet: object = None, shift: int | None = None, sampler: str = "auto", compile: bool = False
) -> tuple[str, ...]:
    """The options given that only a UNet pipeline takes (a flow pipeline is refused with them)."""
    given = {"--unet": unet is not None, "--shift": shift is not None, "--sampler shift-lcm": sampler == "shift-lcm"}
    given["--compile"] = compile
    return tuple(name for name, on in given.items() if on)


def check_architecture(index: dict, where: str, allow_flow: bool = False, unet_only: Sequence[str] = ()) -> bool:
    """Refuse what cannot be loaded for the caller, naming what it is; True for a flow pipeline.

    A UNet text-to-image pipeline (SDXL or SD1.5 architecture) passes. An SD3-architecture flow-matching
    transformer passes where `allow_flow` (sampling with its own scheduler), unless options only a
    UNet pipeline takes (`unet_only`, e.g. "--unet") were given (a teacher to distil is one).
    Any other transformer pipeline (Flux...) is refused by name."""
    kind = index.get("_class_name")
    if _component_class(index, "unet") == UNet2DConditionModel.__name__:
        if kind not in UNET_PIPELINES:
            # The refiner, inpainting, image-to-image and upscaler pipelines hold the same UNet class but
            # take an image: called with a prompt alone they fail deep inside their own __call__.
            raise UserError(
                f"'{where}' is a {kind}, not a text-to-image pipeline distilled or sampled here: use a "
                f"{' or '.join(UNET_PIPELINES)} (SD1.5 or SDXL architecture), or a StableDiffusion3Pipeline"
            )
        return False
    if is_flow_pipeline(index):
        if not allow_flow:
            raise UserError(
                f"'{where}' is a {kind} (a flow-matching transformer), where a UNet pipeline "
                "(SDXL or SD1.5 architecture) is needed"
            )
        if unet_only:
            raise UserError(
                f"{unet_only[0]} is for UNet pipelines: '{where}' is a {kind} (a flow-matching transformer), "
                "sampled with its own scheduler"
            )
        return True
    if isinstance(index.get("transformer"), list) and index["transformer"][:1] != [None]:
        raise UserError(
            f"'{where}' is a {kind} with a transformer ({index['transformer'][-1]}): it is not supported yet; "
            "use an SDXL or SD1.5-architecture pipeline, or for sampling an SD3-architecture one "
            "(StableDiffusion3Pipeline)"
        )
    raise UserError(f"'{where}' ({kind}) is not a UNet text-to-image pipeline (SDXL or SD1.5 architecture)")


def _recorded(model_dir: Path) -> dict:
    """A folder's nitrofusion.json (how a distill run's export, or a world pipeline, samples); {} without
    one. One that is there but unreadable is refused: without it a flow student would sample at CFG 7
    and at levels it was not trained at, quietly worse."""
    path = model_dir / "nitrofusion.json"
    if not path.is_file():
        return {}
    try:
        about = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"'{path}' cannot be read as JSON: {exc}") from None
    if not isinstance(about, dict):
        raise UserError(f"'{path}' must hold a JSON object")
    return about


def recorded_guidance(model_dir: Path) -> float | None:
    """The guidance scale a folder's nitrofusion.json records: a distill run's exported flow student's
    (0: it learnt the teacher's guided samples), the embedded flow teacher's (5, the world's CFG);
    None where none is recorded."""
    value = _recorded(model_dir).get("guidance_scale")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def recorded_steps(model_dir: Path) -> int | None:
    """The step count a folder's nitrofusion.json records as its own (`num_inference_steps`: the
    embedded teacher's 25, at which the world's tables score it); None where none is recorded."""
    value = _recorded(model_dir).get("num_inference_steps")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise UserError(f"'{model_dir / 'nitrofusion.json'}': num_inference_steps must be a step count, got {value!r}")
    return value


def recorded_sigmas(model_dir: Path) -> dict[int, list[float]]:
    """The `sigmas` a flow student's folder records per step count: its pipeline is called with
    them to sample at the levels it was trained at ({} where none are recorded: its scheduler's
    own spacing). Malformed ones are refused: sampled at other levels, the student degrades quietly."""
    recorded = _recorded(model_dir).get("sigmas", {})
    where = model_dir / "nitrofusion.json"
    if not isinstance(recorded, dict):
        raise UserError(f"'{where}': 'sigmas' must map step counts to lists of noise levels")
    sigmas: dict[int, list[float]] = {}
    for steps, levels in recorded.items():
        ok = re.fullmatch(r"[1-9][0-9]{0,2}", steps) is not None and isinstance(levels, list)
        ok = ok and len(levels) == int(steps) and levels[0] == 1
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in levels)
        if not ok or any(a <= b for a, b in zip(levels, levels[1:])):
            raise UserError(
                f"'{where}': sigmas for {steps!r} steps must be that many decreasing levels in (0, 1], from 1"
            )
        sigmas[int(steps)] = [float(v) for v in levels]
    return sigmas


def load_pipeline(
    model: str | Path,
    unet: str | Path | None = None,
    shift: int | None = None,
    sampler: Sampler = "auto",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    safety_checker: bool = True,
    option: str = "--model",
    allow_flow: bool = True,
    lora: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a text-to-image pipeline ready for few-step sampling.

    sampler: "shift-lcm" installs `TimestepShiftLCMScheduler` (1-4 steps, no CFG by default);
    "native" keeps the pipeline's own scheduler (a multi-step teacher; a distilled pipeline's
    own is the shift-LCM one, and is recorded as such); "auto" picks
    shift-lcm when the pipeline already has it, or a student UNet, an `export-lora` LoRA or a shift is given.
    The chosen sampler is recorded as `pipe.nitro_sampler`. `compile` (CUDA) compiles the
    networks (`nitrofusion.pipelines.fast`); never for training, since its fused projections
    add keys to the UNet's state dict. `safety_checker=False` leaves out a pipeline's safety
    checker (SD1.5's), as evaluations on COCO do: it is not loaded, and no image is blacked out.
    `pipe.nitro_unfiltered` records that one was left out. `option`: how the user named the
    model (a flag or config key), for the error messages.

    An SD3-architecture flow-matching transformer (`check_architecture`) is sampled with its own
    scheduler ("native"); a student UNet, a shift, the shift-LCM sampler and `compile` are refused
    for it before any weight is read (a flow student's pipeline, without CFG: `nitro_guidance`, and
    at the levels it was trained at: `nitro_sigmas`, passed to the pipeline as `sigmas`).
    `allow_flow=False` (where only a UNet will do) refuses it.

    `lora`: a LoRA fused into the denoiser (`nitrofusion.pipelines.adapters`). One of `export-lora`
    makes the pipeline its student: sampled as the student's file would be with `unet` (its recorded
    shift), or for a flow student at its recorded levels, without CFG. `pipe.nitro_lora` records it.
    """
    from nitrofusion.pipelines.adapters import apply_lora, check_lora_option

    adapter = check_lora_option(lora, unet)  # before any model is looked for
    if shift is not None and sampler == "native":  # it would be ignored: the native sampler has no shift
        raise UserError("--shift is for the shift-lcm sampler; the native sampler has none")
    unet_only = unet_only_options(unet, shift, sampler, compile)
    model_dir = resolve_model(model, option, unet_weights=unet is None, allow_flow=allow_flow, unet_only=unet_only)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    index = check_model_index(model_dir)
    flow = check_architecture(index, str(model_dir), allow_flow, unet_only)
    steps = recorded_steps(model_dir)  # refused before any weight is read
    if flow:
        if sampler not in ("auto", "native"):
            raise UserError(
                f"unknown sampler '{sampler}': use auto or native for '{model_dir}' ({index['_class_name']})"
            )
        guidance, sigmas = recorded_guidance(model_dir), recorded_sigmas(model_dir)  # refused before any weight
        pipe = _read_pipeline(model_dir, index, torch_dtype, safety_checker)[0]
        if adapter is not None:
            apply_lora(pipe, adapter, str(model_dir))
            if adapter.distilled:  # the student's: it learnt the teacher's guided samples, at its levels
                guidance, sigmas = 0.0, adapter.sigmas
        pipe.nitro_guidance, pipe.nitro_sigmas, pipe.nitro_steps = guidance, sigmas, steps
        pipe.nitro_lora = "" if adapter is None else str(adapter.path)
        return _loaded(pipe, "native", model, model_dir, False, device)
    student = {}
    if unet is not None:
        student["unet"] = _student_unet(model_dir, unet, torch_dtype, option)
    pipe, drop_checker = _read_pipeline(model_dir, index, torch_dtype, safety_checker, **student)
    if adapter is not None:
        apply_lora(pipe, adapter, str(model_dir))
    # The file a student's sampling settings are read from: its UNet's, or its LoRA's (export-lora's).
    recorded = unet if unet is not None else (adapter.path if adapter is not None and adapter.distilled else None)
    num_train = pipe.scheduler.config.get("num_train_timesteps", 1000)
    if shift is not None and not 1 <= shift <= num_train:
        raise UserError(f"--shift must be a timestep in 1..{num_train}, got {shift}")
    if shift is None and recorded is not None:  # as trained (a distill run and export-lora record it)
        shift = unet_file_shift(unet) if unet is not None else adapter.shift
        if shift is not None and not 1 <= shift <= num_train:
            raise UserError(f"'{recorded}' records shift {shift}, outside 1..{num_train}: give --shift")
    has_shift = _scheduler_class_name(index) == TimestepShiftLCMScheduler.__name__
    if sampler == "native" and has_shift and isinstance(pipe.scheduler, TimestepShiftLCMScheduler):
        # A distilled pipeline's own scheduler is the shift-LCM one: sampled as `shift-lcm` samples it
        # (a student file's recorded shift, 4 original steps), not as stored.
        sampler = "shift-lcm"
    if shift is None and recorded is not None and sampler != "native":
        # The public NitroSD files record none, and the two differ: a wrong shift samples at wrong timesteps.
        own = pipe.scheduler.config.get("shifted_timestep") if has_shift else None
        used = f"{own} (the pipeline's scheduler's)" if own is not None else f"{DEFAULT_SHIFT} (NitroSD-Realism's)"
        warnings.warn(
            f"'{recorded}' records no timestep shift: sampling at {used}; NitroSD-Vibrant needs --shift 500",
            stacklevel=2,
        )
    if sampler == "auto":
        sampler = "shift-lcm" if (has_shift or recorded is not None or shift is not None) else "native"
    if sampler == "shift-lcm":
        if has_shift and isinstance(pipe.scheduler, TimestepShiftLCMScheduler):
            # original_inference_steps is 4 in NitroSD's recipe, but the snippet sets it on the config
            # object, which save_pretrained never writes: its saved pipelines record LCM's 50, and
            # 3 or 4 steps would land on other timesteps (999, 759, 499, 259 instead of ..., 249).
            fixed = {"original_inference_steps": 4} if pipe.scheduler.config.original_inference_steps != 4 else {}
            if shift is not None:
                fixed["shifted_timestep"] = shift
            scheduler = (
                TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, **fixed) if fixed else pipe.scheduler
            )
        else:
            # A base model's scheduler config with a student UNet: its noise schedule and prediction
            # type, never its sampling-time clipping (distill trains without it, as NitroSD's README samples).
            scheduler = TimestepShiftLCMScheduler.from_base_config(
                pipe.scheduler.config,
                shifted_timestep=DEFAULT_SHIFT if shift is None else shift,
            )
        pipe.scheduler = scheduler
    elif sampler != "native":
        raise UserError(f"unknown sampler '{sampler}': use auto, shift-lcm or native")
    pipe = _loaded(pipe, sampler, model, model_dir, drop_checker, device)
    pipe.nitro_steps = steps
    pipe.nitro_unet = "" if unet is None else str(unet)  # the student in the model's place, for provenance
    pipe.nitro_lora = "" if adapter is None else str(adapter.path)
    if compile:
        from nitrofusion.pipelines.fast import compile_pipeline

        compile_pipeline(pipe)
    return pipe


def _loaded(
    pipe: DiffusionPipeline, sampler: str, model: str | Path, folder: Path, unfiltered: bool, device: str
) -> DiffusionPipeline:
    """`pipe` with what `load_pipeline` records on it, on `device`, its CPU weights aligned."""
    pipe.nitro_sampler = sampler
    pipe.nitro_model = str(model)  # as given (a name, a hub id, a path)
    pipe.nitro_folder = str(folder)  # the folder read
    pipe.nitro_unfiltered = unfiltered
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    align_weights(pipe)
    return pipe


def _read_pipeline(
    model_dir: Path, index: dict, dtype: torch.dtype, safety_checker: bool, **overrides: object
) -> tuple[DiffusionPipeline, bool]:
    """The pipeline as stored (safetensors only, no remote code; `index` checked by
    `check_model_index`), and whether its safety checker was left out. `overrides` are components
    not read from disk (`unet=None`: none at all)."""
    entry = index.get("safety_checker")
    drop_checker = not safety_checker and isinstance(entry, list) and entry[:1] != [None]
    if drop_checker:
        overrides = {**overrides, "safety_checker": None, "requires_safety_checker": False}
    # The public snippet's class saved from its script: read as ours, "__main__" never looked into.
    snippet = index.get("scheduler") == ["__main__", TimestepShiftLCMScheduler.__name__]
    if snippet:
        overrides = {**overrides, "scheduler": None}
    if is_flow_pipeline(index):
        # An SD3 saved without its T5 encoder (diffusers' way to save memory) records it as
        # [null, null], which from_pretrained then asks for: it is given as left out.
        left_out = [k for k, v in index.items() if not k.startswith("_") and v == [None, None]]
        overrides = {**{k: None for k in left_out}, **overrides}
    try:
        with quiet_loading(), missing_weights_reported() as missing:
            pipe = DiffusionPipeline.from_pretrained(
                str(model_dir),
                dtype=dtype,
                use_safetensors=True,
                local_files_only=True,
                variant=weights_variant(model_dir),
                **overrides,
            )
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:  # transformers' damaged files: SafetensorError
        # Of the RuntimeErrors, only weights of another shape are the folder's fault; out of memory,
        # e.g., the CLI says in its own words.
        wrong_shape = "loading state_dict" in str(exc) or "ignore_mismatched_sizes" in str(exc)
        if isinstance(exc, RuntimeError) and not wrong_shape:
            raise
        pickled = sorted(str(p.relative_to(model_dir)) for p in model_dir.glob("*/*.bin"))
        if pickled and "no file named" in str(exc):  # an older folder, its weights in .bin files only
            raise UserError(
                f"could not load the pipeline in '{model_dir}': its weights are pickle files ({pickled[0]}), "
                "which are never unpickled here; convert the folder to safetensors on a machine you trust "
                "(diffusers: DiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR))"
            ) from None
        raise UserError(f"could not load the pipeline in '{model_dir}': {first_line(exc)}") from None
    if missing:
        raise UserError(f"could not load the pipeline in '{model_dir}': {missing[0]}")
    check_tokenizers(pipe, model_dir)
    if snippet:  # registered, so that the pipeline's config (and a save_pretrained) names it
        pipe.register_modules(scheduler=_shift_lcm_from_folder(model_dir / "scheduler"))
    return pipe, drop_checker


def _shift_lcm_from_folder(folder: Path) -> TimestepShiftLCMScheduler:
    try:
        # from_base_config samples at NitroSD's 4 original steps: the snippet sets them on the config
        # object, which save_pretrained never writes.
        config = TimestepShiftLCMScheduler.load_config(str(folder))
        return TimestepShiftLCMScheduler.from_base_config(config)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the scheduler config in '{folder}': {exc}") from None


def _student_unet(model_dir: Path, path: str | Path, dtype: torch.dtype, option: str) -> UNet2DConditionModel:
    """The pipeline's UNet architecture holding a student's weights, built without reading the
    pipeline's own UNet weights: the public NitroSD snippet passes its UNet to from_pretrained,
    so a cache it made holds SDXL base's unet/config.json and no weights (which are 5-10 GB).
    The file is checked against it from its header before it is read (5 GB at SDXL size)."""
    from accelerate import init_empty_weights

    from nitrofusion.world.spec import assets_dir

    try:
        config = UNet2DConditionModel.load_config(str(model_dir / "unet"))
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the UNet config in '{model_dir / 'unet'}': {exc}") from None
    with init_empty_weights():  # no 2.6B random numbers drawn only to be replaced
        unet = UNet2DConditionModel.from_config(config)
    into = f"the pipeline in '{model_dir}'"
    if model_dir.resolve().is_relative_to(assets_dir().resolve()):  # e.g. no --model: the shipped world
        into = f"the embedded model (a student of another base needs {option} <its base pipeline>)"
    check_state_dict(unet, read_safetensors_layout(path), f"UNet weights '{path}' for {into}")
    state = read_safetensors(path)
    # In the pipeline's dtype before the load (ModelMixin.to would log its fp32-modules notice each
    # time), and in eval mode, as from_pretrained leaves a model.
    unet.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return unet.eval()


def load_frozen_parts(
    model: str | Path, dtype: torch.dtype = torch.float32, safety_checker: bool = True, option: str = "--model"
) -> dict[str, object]:
    """A pipeline's components other than its UNet (an SD3 pipeline's transformer) and scheduler, on
    the CPU: what a distilled pipeline takes over from its teacher unchanged. The UNet is never
    read (at SDXL size it is 10 GB of host memory and tens of seconds, only to be discarded)."""
    model_dir = resolve_model(model, option, unet_weights=False, allow_flow=True)
    index = check_model_index(model_dir)
    network = "transformer" if check_architecture(index, str(model_dir), allow_flow=True) else "unet"
    pipe, _ = _read_pipeline(model_dir, index, dtype, safety_checker, **{network: None})
    return {k: v for k, v in pipe.components.items() if k not in (network, "scheduler")}


CPU_ALIGN = 64  # bytes: torch's CPU allocator's alignment (a cache line, an AVX-512 vector)


def align_weights(pipe: DiffusionPipeline) -> None:
    """Copy CPU weights that sit at unaligned addresses into aligned memory. Weights mapped straight
    from a safetensors file lie at the file's 8-byte offsets, and CPU matmul kernels round
    differently with alignment: the same weights loaded from another file layout, or copied
    (a deepcopy, an offload), gave other bits (seen on AVX-512 machines). A device copy is aligned."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for t in (*module.parameters(), *module.buffers()):
                if t.device.type == "cpu" and t.data_ptr() % CPU_ALIGN:
                    t.data = t.data.clone()


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors atomically (a crash never leaves a half-written file), a tensor
    at a time in host memory."""
    from nitrofusion.weights.io import write_state_dict  # which reads this module's helpers

    return write_state_dict(path, state, metadata)


def save_unet_weights(unet: UNet2DConditionModel, path: str | Path, shift: int | None = None) -> Path:
    """Write a UNet state dict as safetensors, the format of the public NitroSD checkpoints, with
    the shift it samples at in the header (read back when no --shift is given)."""
    return save_state_dict(unet.state_dict(), path, metadata=unet_file_metadata(shift))
