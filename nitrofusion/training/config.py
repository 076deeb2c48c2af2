"""The distillation run's configuration: one YAML file, a documented schema, CLI overrides.

Every key is a field of a dataclass below; loading rejects unknown keys and ill-typed
values by name. Presets live in `nitrofusion/configs/<name>.yaml`; `--set a.b=value`
overrides any key (values parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nitrofusion.data.teacher_timesteps import check_teacher_timesteps
from nitrofusion.errors import UserError
from nitrofusion.training.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS
from nitrofusion.training.optimizers import OPTIMIZERS, check_available
from nitrofusion.userfiles import read_user_text, write_text_replacing

# A flow student's (SD3) noise levels (training/flow_student.py); the first is the default.
FLOW_LEVELS = ("trailing", "stock")
MAX_SAMPLING_STEPS = 4  # refinement's last stage: students sample in 1 to 4 steps


@dataclass
class ModelConfig:
    teacher: str = "embedded"  # pipeline dir, hub id in the cache, or "embedded"; SDXL, SD1.5 or SD3 architecture
    student_init: str | None = None  # UNet (SD3: transformer) safetensors to start from; None = the teacher's weights
    shift: int = 250  # LCM timestep shift, the same in training and sampling (UNet students; SD3: its own scheduler)
    # A flow student's (SD3) noise levels: trailing = 1, (k-1)/k, ..., 1/k before the scheduler's shift,
    # recorded in the export for its pipeline's `sigmas`; stock = the scheduler's own (training/flow_student.py).
    flow_levels: str = "trailing"
    gradient_checkpointing: bool = False
    teacher_offload: bool = False  # teacher parts used without gradients live in host memory (training/offload.py)
    safety_checker: bool = True  # the teacher's (SD1.5) safety checker: judges validation grids, ships in the export
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the whole UNet (training/lora.py)
    lora_alpha: float | None = None  # adapter scale alpha / rank; None = rank (scale 1)
    # Left at this (the UNet's layers), an SD3 teacher's run uses its transformer's (lora.FLOW_TARGETS).
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class DataConfig:
    prompts: str = "embedded"  # a prompt file (.txt a prompt a line, .jsonl, .json, .csv, .tsv) or "embedded"
    pairs: str | None = None  # directory of `make-pairs` shards (made first if empty); None = teacher samples online
    num_pairs: int = 2048  # how many pairs to make when `pairs` is empty
    pairs_batch_size: int = 64  # teacher samples per call while making them (no gradients: larger than batch_size)
    teacher_steps: int = 25
    teacher_timesteps: list[int] | None = None  # the teacher's own schedule, e.g. DMD2's [999, 749, 499, 249]
    teacher_guidance: float | None = None  # None: the teacher pipeline's own (SDXL 5, SD1.5 7.5, SD3 7)
    batch_size: int = 8
    resolution: int | None = None  # pixels; None = the model's default


@dataclass
class DiscriminatorConfig:
    t_stars: list[int] = field(default_factory=lambda: [10, 250, 500, 750])
    kinds: list[str] = field(default_factory=lambda: ["global_cond", "local_cond", "local_uncond"])
    candidates: int = 4  # heads per (kind, t*, feature level) in the pool
    t_stars_per_step: int = 1  # noise levels judged per micro-batch (one backbone pass each)
    refresh_fraction: float = 0.01  # share of the pool re-initialised every step
    pool: bool = True  # False: one static head per (kind, feature level), shared by every t*
    width: int = 32
    downsamples: int = 2  # local heads' halvings: a patch logit sees 3 * 2**d - 2 positions a side
    # Global heads' halvings; None: as many as take each map down to 1x1, so the logit sees the
    # whole map (DMD2's head). The embedded presets keep 2, what their results were measured with.
    global_downsamples: int | None = None
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    # neutral: a conditional head's text projection starts at zero, so a fresh head's logit is
    # ~0 whatever the prompt; he: He-initialised like the trunk (logits ~0.5-1 from the text term
    # alone), what the embedded presets' results were measured with.
    text_init: str = "neutral"


@dataclass
class LossConfig:
    objective: str = "nitrofusion"  # nitrofusion | dmd2 | adm (docs/distill.md, "Other objectives")
    kind: str = "non_saturating"  # or "hinge"
    r1_weight: float = 0.0
    d_steps_per_g: int = 1  # critic updates (heads, fake score) per student update
    pretrain_steps: int = 0  # pre-training on teacher pairs before the main objective
    pretrain_kind: str = "mse"  # mse: regression to the teacher's x0; adversarial: DMDX's hybrid GAN
    pool_weight: float = 0.0  # dmd2 only: NitroFusion's head-pool GAN loss added to the student's loss
    # + this x MSE to the teacher's x0 in the student's main loss (ADD-style), at step index 0 of a UNet
    # student; at every step of a flow student, whose sample depends on the pair's noise alone
    regression_weight: float = 0.0

    @property
    def adversarial_pretraining(self) -> bool:
        return self.pretrain_kind == "adversarial" and self.pretrain_steps > 0

    @property
    def head_pool(self) -> bool:
        """Whether the run trains the head pool: NitroFusion's and ADM's loss, dmd2's pool term,
        or DMDX's adversarial pre-training."""
        return self.objective in ("nitrofusion", "adm") or self.pool_weight > 0 or self.adversarial_pretraining


@dataclass
class DMDConfig:
    """The real and fake scores of score distillation (objectives dmd2 and adm)."""

    real_guidance: float = 8.0  # CFG of the frozen real score (the teacher); DMD2's SDXL value
    min_t: float = 0.02  # scores are queried at t ~ U[min_t, max_t] * T
    max_t: float = 0.98
    # The fake score learns by denoising at t ~ U[fake_min_t, fake_max_t] * T: DMD2's whole [0, T),
    # so that the level it is queried at is never at the edge of what it learnt. The family presets
    # keep [min_t, max_t], what their results were measured with.
    fake_min_t: float = 0.0
    fake_max_t: float = 1.0
    fake_lr: float = 1e-5  # the fake score's (and dmd2's classifier's) optimizer: optim.optimizer
    fake_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    fake_weight_decay: float = 0.01
    gan_g_weight: float = 5e-3  # dmd2: the classifier's generator loss in the student's loss
    gan_d_weight: float = 1e-2  # dmd2: the classifier's loss next to the fake score's denoising loss
    classifier_width: int = 32  # dmd2: the head on the fake score's bottleneck
    classifier_downsamples: int | None = None  # None: down to 1x1, the whole bottleneck (DMD2's head)
    # own: the classifier's real and fake inputs are each noised at a t (the fake score's range) and
    # noise of their own, as DMD2's; shared: at the distribution-matching query's t and noise.
    classifier_noise: str = "own"


@dataclass
class PretrainConfig:
    """Adversarial pre-training on teacher pairs (loss.pretrain_kind=adversarial, DMDX's first stage)."""

    latent_weight: float = 1.0  # heads of the pool on the frozen teacher encoder
    pixel_weight: float = 1.0  # a small conv discriminator on VAE-decoded images
    pixel_width: int = 32
    pixel_downsamples: int = 3
    pixel_crop: int = 0  # decode only a random latent crop of this side for the pixel critic; 0 = all
    regression_weight: float = 0.0  # + this x MSE to the teacher's x0 in the student's loss (ADD-style anchor)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit: the student's and the fake score's (training/optimizers.py)
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    grad_accumulation: int = 1
    warmup_steps: int = 0
    ema_decay: float = 0.99
    ema_offload: bool = False  # the EMA's copy in host memory, averaged on the GPU a tensor at a time (training/ema.py)
    mixed_precision: str = "no"  # no | bf16 (fp16 is refused: see validate)
    fused: bool = True  # AdamW's fused kernel on CUDA: no optimizer-sized temporaries (training/optimizers.py)


@dataclass
class RefineConfig:
    # Bottom-up: iterations for 1 step first, then for 2, 3, 4 steps (0 skips a stage).
    steps_per_stage: list[int] = field(default_factory=lambda: [100])
    mix: str = "uniform"  # uniform: train every step index up to the stage's count; last: only the new one


@dataclass
class RunConfig:
    output_dir: str = "runs/distill"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    validate_every: int = 50
    log_every: int = 10
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    validation_prompts: int = 10
    log_with: str = "tensorboard"  # an accelerate tracker (TRACKERS), or "none"
    # How long a process waits for the others in a collective before the run aborts. NCCL's own
    # default is 10 minutes; the main process alone writes checkpoints (SDXL with the EMA: 43 GB)
    # and draws validation grids while the others wait in the next all-reduce.
    process_timeout_minutes: int = 60


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def total_steps(self) -> int:
        return self.loss.pretrain_steps + sum(self.refine.steps_per_stage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# accelerate's trackers, each imported under its own name. accelerate drops a tracker whose
# package is missing with a warning and trains on unlogged; here that is a config error instead.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "none")
CHOICES = {
    "loss.objective": {"nitrofusion", "dmd2", "adm"},
    "loss.pretrain_kind": {"mse", "adversarial"},
    "loss.kind": {"non_saturating", "hinge"},
    "optim.optimizer": set(OPTIMIZERS),
    "optim.mixed_precision": {"no", "fp16", "bf16"},  # fp16: refused below, with the reason
    "refine.mix": {"uniform", "last"},
    "discriminator.text_init": {"neutral", "he"},
    "model.flow_levels": set(FLOW_LEVELS),
    "run.log_with": set(TRACKERS),
}
KINDS = {"global_cond", "local_cond", "local_uncond"}


_YAML11_BOOLS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false. YAML 1.1 (PyYAML's default) also reads a bare
    yes/no/on/off as a bool, so `run.output_dir=on` became the folder 'yes', `model.teacher=No` 'no'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _mapping_without_repeats(loader: _Yaml12Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping; a key given twice is refused (YAML keeps the last, losing the first section)."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """A config's YAML (safe: no object construction), with only true/false as booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is str and isinstance(value, bool):
        return "true" if value else "false"  # as written (load_yaml reads only true/false as bools)
    if tp is bool and isinstance(value, str) and value.lower() in _YAML11_BOOLS:
        return _YAML11_BOOLS[value.lower()]  # YAML 1.1's spellings, which configs may still use
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "5e-5" (no dot) as a string; accept any numeric spelling.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise UserError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if isinstance(value, _Override):
            value = value.value if dataclasses.is_dataclass(current) else _as_given(full, value, hints[key])
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' must be a mapping")
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _check_type(full, value, hints[key]))


def _numbers(node: object, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every float in a config as (dotted key, value), lists included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value, prefix)
    elif isinstance(node, float):
        yield prefix[:-1], node


def validate(cfg: DistillConfig) -> DistillConfig:
    # nan passes every comparison below (nan < 0 is False), and no setting here means inf.
    for key, value in _numbers(cfg.to_dict()):
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"config key '{key}' must be one of {sorted(allowed)}, got {value!r}")
    package = cfg.run.log_with
    if package != "none" and importlib.util.find_spec(package) is None:
        raise UserError(f"config key 'run.log_with' is {package}: it needs {package} (pip install {package})")
    bad = set(cfg.discriminator.kinds) - KINDS
    if bad or not cfg.discriminator.kinds:
        raise UserError(f"config key 'discriminator.kinds' must be a non-empty subset of {sorted(KINDS)}")
    if not all(0 <= t < 1000 for t in cfg.discriminator.t_stars) or not cfg.discriminator.t_stars:
        raise UserError("config key 'discriminator.t_stars' must be noise levels in 0..999")
    for key in ("discriminator.kinds", "discriminator.t_stars"):  # a repeat would build heads never sampled
        values = getattr(cfg.discriminator, key.split(".")[1])
        if len(set(values)) != len(values):
            raise UserError(f"config key '{key}' lists a value twice: {values}")
    if not 0 <= cfg.discriminator.refresh_fraction <= 1:
        raise UserError("config key 'discriminator.refresh_fraction' must be in [0, 1]")
    if len(cfg.refine.steps_per_stage) > MAX_SAMPLING_STEPS or not cfg.refine.steps_per_stage:
        raise UserError(
            f"config key 'refine.steps_per_stage' lists iterations for 1 to {MAX_SAMPLING_STEPS} sampling steps"
        )
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.num_pairs": cfg.data.num_pairs,
        "data.pairs_batch_size": cfg.data.pairs_batch_size,
        "discriminator.candidates": cfg.discriminator.candidates,
        "discriminator.t_stars_per_step": cfg.discriminator.t_stars_per_step,
        "discriminator.width": cfg.discriminator.width,
        "loss.d_steps_per_g": cfg.loss.d_steps_per_g,
        "dmd.classifier_width": cfg.dmd.classifier_width,
        "pretrain.pixel_width": cfg.pretrain.pixel_width,
        "optim.grad_accumulation": cfg.optim.grad_accumulation,
        "run.checkpoint_every": cfg.run.checkpoint_every,
        "run.max_bad_steps": cfg.run.max_bad_steps,
        "run.log_every": cfg.run.log_every,
        "run.process_timeout_minutes": cfg.run.process_timeout_minutes,
        "run.validation_prompts": cfg.run.validation_prompts,
        "data.teacher_steps": cfg.data.teacher_steps,
        "model.shift": cfg.model.shift,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config key '{key}' must be at least 1, got {value}")
    if cfg.data.teacher_timesteps is not None:
        what = "config key 'data.teacher_timesteps'"
        check_teacher_timesteps(cfg.data.teacher_timesteps, cfg.data.teacher_steps, what, "data.teacher_steps")
    if cfg.discriminator.t_stars_per_step > len(cfg.discriminator.t_stars):
        raise UserError("config key 'discriminator.t_stars_per_step' exceeds the number of t_stars")
    non_negative = {
        "loss.pool_weight": cfg.loss.pool_weight,
        "dmd.real_guidance": cfg.dmd.real_guidance,
        "dmd.gan_g_weight": cfg.dmd.gan_g_weight,
        "dmd.gan_d_weight": cfg.dmd.gan_d_weight,
        "dmd.classifier_downsamples": cfg.dmd.classifier_downsamples or 0,
        "pretrain.latent_weight": cfg.pretrain.latent_weight,
        "pretrain.pixel_weight": cfg.pretrain.pixel_weight,
        "pretrain.pixel_downsamples": cfg.pretrain.pixel_downsamples,
        "pretrain.pixel_crop": cfg.pretrain.pixel_crop,
        "pretrain.regression_weight": cfg.pretrain.regression_weight,
        "loss.regression_weight": cfg.loss.regression_weight,
        "model.lora_rank": cfg.model.lora_rank,
        "data.teacher_guidance": cfg.data.teacher_guidance or 0,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "discriminator.weight_decay": cfg.discriminator.weight_decay,
        "discriminator.downsamples": cfg.discriminator.downsamples,
        "discriminator.global_downsamples": cfg.discriminator.global_downsamples or 0,
        "loss.r1_weight": cfg.loss.r1_weight,
        "loss.pretrain_steps": cfg.loss.pretrain_steps,
        "run.validate_every": cfg.run.validate_every,  # 0: no validation
        "run.keep_checkpoints": cfg.run.keep_checkpoints,  # 0: keep all
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key '{key}' must not be negative, got {value}")
    if any(n < 0 for n in cfg.refine.steps_per_stage):
        raise UserError(f"config key 'refine.steps_per_stage' must not be negative, got {cfg.refine.steps_per_stage}")
    if sum(cfg.refine.steps_per_stage) + cfg.loss.pretrain_steps == 0:  # the export would be the teacher
        raise UserError("nothing to train: refine.steps_per_stage and loss.pretrain_steps add up to 0 iterations")
    if not str(cfg.run.output_dir).strip():
        raise UserError("config key 'run.output_dir' is empty: name a folder")
    if not 1 <= cfg.model.shift <= 1000:
        raise UserError(f"config key 'model.shift' must be a timestep in 1..1000, got {cfg.model.shift}")
    if cfg.optim.lr <= 0:
        raise UserError(f"config key 'optim.lr' must be positive, got {cfg.optim.lr}")
    if cfg.discriminator.lr <= 0:  # 0 was accepted: heads that never learn, judging at their init
        raise UserError(f"config key 'discriminator.lr' must be positive, got {cfg.discriminator.lr}")
    if cfg.optim.grad_clip <= 0:  # clipping to a norm of 0 zeroes every gradient
        raise UserError(
            f"config key 'optim.grad_clip' must be a positive gradient norm, got {cfg.optim.grad_clip} "
            "(a large value such as 1e9 never clips)"
        )
    if not 0 <= cfg.optim.ema_decay < 1:
        raise UserError(f"config key 'optim.ema_decay' must be in [0, 1) (0: no EMA), got {cfg.optim.ema_decay}")
    if cfg.data.resolution is not None and (cfg.data.resolution < 8 or cfg.data.resolution % 8):
        raise UserError(f"config key 'data.resolution' must be a positive multiple of 8, got {cfg.data.resolution}")
    if cfg.data.resolution is not None and cfg.data.resolution > 8192:  # generation.MAX_SIDE
        raise UserError(f"config key 'data.resolution' must be at most 8192 px, got {cfg.data.resolution}")
    if cfg.optim.ema_offload and cfg.optim.ema_decay == 0:
        raise UserError("config key 'optim.ema_offload' needs an EMA to offload: set optim.ema_decay > 0")
    if cfg.optim.ema_offload and cfg.model.lora_rank > 0:
        raise UserError(
            "config key 'optim.ema_offload' is for a whole student's EMA; a LoRA student's EMA is its adapters only"
        )
    if cfg.optim.mixed_precision == "fp16":
        # accelerate's loss scaler wraps the student's optimizer only: the critics' (heads, fake
        # score) would step on scaled gradients, and an overflow would be skipped without the
        # scale ever coming down. bf16 has fp32's range and needs no scaler.
        raise UserError("optim.mixed_precision=fp16 is not supported for training: use bf16 (or no)")
    check_available(cfg.optim.optimizer)
    alpha = cfg.model.lora_alpha
    if alpha is not None and alpha <= 0:
        raise UserError(f"config key 'model.lora_alpha' must be positive (or null: the rank), got {alpha}")
    if cfg.model.lora_rank > 0 and not cfg.model.lora_targets:
        raise UserError("LoRA training needs model.lora_targets (module names)")
    if cfg.model.lora_rank == 0:
        # Without a rank the whole UNet trains: a LoRA setting given alone would be ignored without a word.
        defaults = ModelConfig()
        given = [k for k in ("lora_alpha", "lora_targets") if getattr(cfg.model, k) != getattr(defaults, k)]
        if given:
            raise UserError(f"config key 'model.{given[0]}' is for LoRA training: set model.lora_rank too")
    for low, high in (("min_t", "max_t"), ("fake_min_t", "fake_max_t")):
        lo, hi = getattr(cfg.dmd, low), getattr(cfg.dmd, high)
        if not 0 <= lo <= hi <= 1 or lo >= 1:
            raise UserError(
                f"config keys 'dmd.{low}' and 'dmd.{high}' must satisfy 0 <= {low} <= {high} <= 1, {low} < 1"
            )
    if cfg.dmd.classifier_noise not in ("own", "shared"):
        raise UserError(f"config key 'dmd.classifier_noise' must be own or shared, got {cfg.dmd.classifier_noise!r}")
    if not 0 <= cfg.run.seed < 2**32:
        # Seeds are mixed into other seeds (make-pairs: seed * 1000003 + index) that must stay in int64.
        raise UserError(f"config key 'run.seed' must be in 0..2^32-1, got {cfg.run.seed}")
    if cfg.dmd.fake_lr <= 0:
        raise UserError(f"config key 'dmd.fake_lr' must be positive, got {cfg.dmd.fake_lr}")
    if cfg.loss.r1_weight > 0 and not cfg.loss.head_pool:
        raise UserError(
            "config key 'loss.r1_weight' regularises the head pool, which dmd2 trains only with loss.pool_weight > 0"
        )
    if cfg.loss.pool_weight > 0 and cfg.loss.objective != "dmd2":
        # nitrofusion's loss is the pool already; adm's pool judges the scores' predictions instead.
        raise UserError("config key 'loss.pool_weight' adds the head pool to loss.objective=dmd2 only")
    if cfg.pretrain.latent_weight == 0 and cfg.pretrain.pixel_weight == 0 and cfg.loss.pretrain_kind != "mse":
        raise UserError("config keys 'pretrain.latent_weight' and 'pretrain.pixel_weight' are both 0")
    for key in ("dmd.fake_betas", "discriminator.betas", "optim.betas"):
        section, name = key.split(".")
        betas = getattr(getattr(cfg, section), name)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise UserError(f"config key '{key}' must be two numbers in [0, 1), got {betas}")
    for section, keys in unread_settings(cfg).items():
        # Warned, not refused: reproduce's --set goes to every run, and a family run reads what a
        # NitroFusion run does not.
        warnings.warn(
            f"config keys {', '.join(keys)} are not read by this run ({UNREAD_BECAUSE[section]}): ignored", stacklevel=2
        )
    return cfg


CLASSIFIER_KEYS = ("gan_g_weight", "gan_d_weight", "classifier_width", "classifier_downsamples", "classifier_noise")


def as_trained(saved: dict) -> dict:
    """A saved config (a checkpoint's, a run's) with the keys it predates filled in as its run
    trained: global heads at the local heads' depth (before discriminator.global_downsamples); the
    fake score learning where the scores are queried and DMD2's classifier judging at the query's
    t and noise (before dmd.fake_min_t/fake_max_t/classifier_noise)."""
    out = dict(saved)
    heads = saved.get("discriminator")
    if isinstance(heads, dict) and "downsamples" in heads and "global_downsamples" not in heads:
        out["discriminator"] = {**heads, "global_downsamples": heads["downsamples"]}
    dmd = saved.get("dmd")
    if isinstance(dmd, dict) and "fake_min_t" not in dmd:
        before = {"fake_min_t": dmd.get("min_t", 0.02), "fake_max_t": dmd.get("max_t", 0.98)}
        out["dmd"] = {**before, "classifier_noise": "shared", **dmd}
    return out


def unread_keys(values: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The `section.key`s that a run of these settings (a config as `to_dict` writes it, perhaps
    from before some keys existed) never reads, whatever their values: what a resumed or a reused
    run need not agree on. The scores' under NitroFusion's objective, DMD2's classifier's where
    none is built, the head pool's where none is trained, adversarial pre-training's without it."""
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    loss = LossConfig(**{k: v for k, v in values.get("loss", {}).items() if k in loss_fields})
    dmd = {**dataclasses.asdict(DMDConfig()), **values.get("dmd", {})}

    def keys(section: str, config: type) -> set[str]:
        return {f"{section}.{f.name}" for f in dataclasses.fields(config)}

    unread = set()
    if loss.objective == "nitrofusion":
        unread |= keys("dmd", DMDConfig)
    elif loss.objective == "adm":
        unread |= {f"dmd.{k}" for k in CLASSIFIER_KEYS}
    elif not (dmd["gan_g_weight"] > 0 or dmd["gan_d_weight"] > 0):  # dmd2 without its classifier
        unread |= {f"dmd.{k}" for k in CLASSIFIER_KEYS if k.startswith("classifier")}
    if not loss.head_pool:
        unread |= keys("discriminator", DiscriminatorConfig)
    if not loss.adversarial_pretraining:
        unread |= keys("pretrain", PretrainConfig)
    return unread


UNREAD_BECAUSE = {
    "dmd": "they are for loss.objective dmd2 and adm",
    "classifier": "they are DMD2's classifier's: loss.objective=adm has none",
    "pretrain": "they are for loss.pretrain_kind=adversarial with loss.pretrain_steps > 0",
    "pool": "a static head set (discriminator.pool=false) has one head per kind and level, never refreshed",
}


def unread_settings(cfg: DistillConfig) -> dict[str, list[str]]:
    """Keys set away from their defaults that this run never reads: the scores' (dmd.*) under
    NitroFusion's objective, DMD2's classifier's under ADM's, adversarial pre-training's
    (pretrain.*) without it, and the pool's candidates and refresh under a static head set
    (discriminator.pool=false)."""
    # (why, section, its values, its defaults, the keys unread; None: all of them)
    sections = []
    if cfg.loss.objective == "nitrofusion":
        sections.append(("dmd", "dmd", cfg.dmd, DMDConfig(), None))
    elif cfg.loss.objective == "adm":
        sections.append(("classifier", "dmd", cfg.dmd, DMDConfig(), CLASSIFIER_KEYS))
    if not cfg.loss.adversarial_pretraining:
        sections.append(("pretrain", "pretrain", cfg.pretrain, PretrainConfig(), None))
    if not cfg.discriminator.pool:
        pool_keys = ("candidates", "refresh_fraction")
        sections.append(("pool", "discriminator", cfg.discriminator, DiscriminatorConfig(), pool_keys))
    unread = {}
    for name, section, values, defaults, only in sections:
        keys = [
            f"{section}.{f.name}"
            for f in dataclasses.fields(values)
            if (only is None or f.name in only) and getattr(values, f.name) != getattr(defaults, f.name)
        ]
        if keys:
            unread[name] = keys
    return unread


@dataclass(frozen=True)
class _Override:
    """A --set value: YAML, except for a key that takes text, which gets the text as typed (YAML
    would read `runs/exp #2` as `runs/exp`, a comment cut off, and `2024` as a number)."""

    text: str
    value: Any


def _takes_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _as_given(key: str, value: _Override, tp: Any) -> Any:
    quoted = isinstance(value.value, str) and value.text[:1] in ("'", '"')  # a YAML-quoted string: its content
    if not _takes_text(tp) or quoted or value.value is None:  # null / ~ / empty stay None where allowed
        return value.value
    return value.text


def parse_override(text: str) -> dict:
    """'a.b=3' -> {'a': {'b': 3}} with the value parsed as YAML (kept as typed for text keys)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = _Override(raw.strip(), load_yaml(raw))
    except yaml.YAMLError:
        raise UserError(f"override '{text}': value is not valid YAML") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nitrofusion.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: str | Path, what: str, packaged: bool = False) -> dict:
    text = Path(path).read_text(encoding="utf-8") if packaged else read_user_text(path, what)
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{what} '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must be a mapping of sections")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The problem and where it is (line, column), on one line."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    settings: dict | None = None,
) -> DistillConfig:
    """Defaults <- preset <- config file <- overrides (`--set` texts) <- settings (values as they
    are, e.g. a folder named on the command line), validated."""
    cfg = DistillConfig()
    if preset:
        if preset not in preset_names():
            raise UserError(f"unknown preset '{preset}' (available: {', '.join(preset_names())})")
        _merge(cfg, _read_yaml(resources.files("nitrofusion.configs") / f"{preset}.yaml", "preset", packaged=True))
    if path:
        _merge(cfg, _read_yaml(path, "config file"))
    for text in overrides or []:
        _merge(cfg, parse_override(text))
    if settings:
        _merge(cfg, settings)
    return validate(cfg)


def save_config(cfg: DistillConfig, path: str | Path) -> None:
    write_text_replacing(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
