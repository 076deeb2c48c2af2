"""`nitrofusion distill`: NitroFusion's dynamic adversarial distillation on accelerate.

The whole iteration is `Distiller.train_step`: the student's sample, the objective's losses
(NitroFusion, DMD2 or ADM; regression or adversarial pre-training first), the student's and
the critics' updates. Everything else here is set-up, saving and looking at samples.
Randomness is drawn from generators seeded by (seed, step, purpose [, rank]), never from a
running stream, so a resumed run repeats an uninterrupted one exactly, and every rank
refreshes the same heads.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from nitrofusion.data.conditioning import Conditioning, TextEncoder, is_sd3
from nitrofusion.data.prompts import load_prompts
from nitrofusion.data.teacher import (
    FEW_STEP_SCHEDULERS,
    SHARD_GLOB,
    SHARD_SIZE,
    PairShards,
    ShardsNotDelivered,
    TeacherSampler,
    check_own_files,
    make_pairs,
    missing_shards,
    noise_for_seeds,
    planned_pairs,
    planned_shards,
    sampler_recipe,
    wait_for_shards,
)
from nitrofusion.discriminator.backbone import TransformerBlockFeatures, UNetEncoderFeatures
from nitrofusion.discriminator.heads import DiscriminatorHead, max_downsamples
from nitrofusion.discriminator.pool import HeadPool
from nitrofusion.errors import UserError
from nitrofusion.evaluation.grid import make_grid
from nitrofusion.objectives.adm import ADM
from nitrofusion.objectives.base import Critic, Objective
from nitrofusion.objectives.dmd2 import DMD2
from nitrofusion.objectives.nitrofusion import NitroFusion, NitroFusionObjective, PoolDiscriminator
from nitrofusion.objectives.pretrain import AdversarialPretraining, PixelDiscriminator, Regression
from nitrofusion.objectives.scores import FakeScore, RealScore
from nitrofusion.pipelines.generation import (
    check_side,
    default_guidance,
    default_size,
    denoiser,
    generate,
    largest_side,
    size_multiple,
)
from nitrofusion.pipelines.loading import (
    check_state_dict,
    flow_file_metadata,
    layout_problems,
    load_frozen_parts,
    load_pipeline,
    read_safetensors,
    read_safetensors_layout,
    save_state_dict,
    unet_file_metadata,
)
from nitrofusion.pipelines.saving import save_pipeline
from nitrofusion.scheduling import TimestepShiftLCMScheduler
from nitrofusion.training import checkpoint
from nitrofusion.training.config import DistillConfig, as_trained, save_config, unread_keys
from nitrofusion.training.curves import MetricsLog, try_plot_curves
from nitrofusion.training.ema import EMA
from nitrofusion.training.faults import fires, kill_point
from nitrofusion.training.flow_student import FlowStudent
from nitrofusion.training.lora import (
    DEFAULT_TARGETS,
    FLOW_TARGETS,
    add_lora,
    check_lora_targets,
    merged_state_dict,
    plain_unet,
)
from nitrofusion.training.offload import HostOffload, teacher_groups
from nitrofusion.training.optimizers import make_optimizer
from nitrofusion.training.schedule import Phase, Schedule
from nitrofusion.training.student import ShiftedStudent
from nitrofusion.userfiles import folder_lock, replacing, replacing_folder
from nitrofusion.weights.io import unet_state_dict
from nitrofusion.weights.provenance import teacher_samples_metadata, weight_samples

log = logging.getLogger(__name__)

PURPOSES = {
    "data": 1,
    "heads": 2,
    "refresh": 3,
    "judge": 4,
    "simulate": 5,
    "stepidx": 6,
    "dmd": 7,  # DMD2/ADM: the scores' t and noise
    "critic": 8,  # the fake score's denoising t and noise
    "pixel": 9,  # the pixel discriminator's crop
    "heads_micro": 10,  # the pool's draws for micro-batches after the first
    "gan": 11,  # DMD2's classifier: its inputs' own t and noise (dmd.classifier_noise=own)
}


class TrainingStopped(RuntimeError):
    """Training cannot go on: too many non-finite losses in a row (the last good checkpoint is
    kept), or another process's teacher pairs never arrived."""


def check_depth(key: str, downsamples: int, side: int) -> None:
    """Found when the networks are built, not at the first judgement (after pre-training, at SDXL)."""
    if downsamples > max_downsamples(side):
        raise UserError(
            f"config key '{key}'={downsamples} halves a {side}-pixel map below one pixel: "
            f"at most {max_downsamples(side)} at this resolution"
        )


def has_accelerator_device() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def make_accelerator(cfg: DistillConfig) -> Accelerator:
    """The run's accelerator: its mixed precision, tracker, and how long a rank waits for the others.

    Several processes on a machine without a GPU (`torchrun --nproc_per_node 2`) are gloo ranks on
    the CPU: accelerate, not told `cpu=True`, gave each process a run of its own, and they trained
    apart into one output folder.

    The student's gradients are views into DDP's all-reduce buckets: by default DDP keeps the
    buckets beside the gradients, one more fp32 copy of the student a rank (10 GB for an SDXL UNet).
    So under DDP they are zeroed, not set to None: the micro-batches before the last run under
    `no_sync`, where DDP does not see them, and a gradient that is None there is made anew beside
    the buckets. One process has no buckets, and frees its gradients between iterations."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=several and not has_accelerator_device(),
        mixed_precision=cfg.optim.mixed_precision,
        log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
        project_dir=str(cfg.run.output_dir),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.run.process_timeout_minutes)),
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
        ],
    )


def changed_settings(saved: dict, now: dict) -> list[str]:
    """`section.key: was -> now` for each setting of a checkpoint's config that differs now and that
    this run reads (keys a checkpoint predates are not counted)."""
    unread = unread_keys(now)
    return [
        f"{section}.{key}: {was!r} -> {now[section][key]!r}"
        for section, values in saved.items()
        if isinstance(values, dict) and isinstance(now.get(section), dict)
        for key, was in values.items()
        if key in now[section] and now[section][key] != was and f"{section}.{key}" not in unread
    ]


def resolve_teacher(name: str) -> str:
    """`embedded` is the embedded world's UNet teacher, `embedded-flow-teacher` its SD3-architecture one."""
    from nitrofusion.world.spec import EMBEDDED_NAMES, embedded_model

    if name in EMBEDDED_NAMES:  # as a teacher, "embedded" is the multi-step one, not the shipped student
        found = embedded_model("embedded-teacher" if name == "embedded" else name)
        if found is None:
            how = (
                "--stages flow --vae nitrofusion/world/assets/teacher, docs/world.md"
                if "flow" in name
                else "docs/world.md"
            )
            raise UserError(f"the {name} teacher is not installed (build it with 'nitrofusion train-teacher', {how})")
        return str(found.model)
    return name


@contextmanager
def decoding_one_by_one(pipe: DiffusionPipeline) -> Iterator[None]:
    """The VAE decodes a batch an image at a time (diffusers' slicing), then as it did before: a
    validation grid is drawn on top of the whole training state (on several GPUs the main
    process also holds DDP's gradient buckets, 9.6 GiB at SDXL), and the decoder's activations
    at 1024² grow with the batch, where the UNet's at one to four steps are small."""
    vae = pipe.vae
    was = getattr(vae, "use_slicing", None)
    if was is None:  # a VAE without slicing
        yield
        return
    vae.enable_slicing()
    try:
        yield
    finally:
        if not was:
            vae.disable_slicing()


def means(values: dict[str, list[float]]) -> dict[str, float]:
    """Each logged quantity's mean over the values it has (micro-batches, or a logging window)."""
    return {key: sum(v) / len(v) for key, v in values.items()}


class Distiller:
    def __init__(self, cfg: DistillConfig, accelerator: Accelerator | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.schedule = Schedule(cfg.loss.pretrain_steps, cfg.refine.steps_per_stage, cfg.loss.pretrain_kind)
        self.acc = accelerator or make_accelerator(cfg)
        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Untested, and built for replicated students: the EMA pairs parameters by position, the
            # backward simulation runs the unwrapped student, and only rank 0 gathers a checkpoint.
            raise UserError(
                f"{self.acc.distributed_type.value} is not supported by distill: launch with DDP "
                "(accelerate launch --multi_gpu); the sdxl preset fits one 80 GB GPU (docs/benchmarks.md)"
            )
        self.progress = progress and self.acc.is_main_process
        device = str(self.acc.device)
        # Before the teacher loads (minutes at SDXL size, on every process): a prompt file that is
        # not there, or not readable, is said at once.
        self.prompts = load_prompts(cfg.data.prompts)

        self.teacher = load_pipeline(
            resolve_teacher(cfg.model.teacher),
            sampler="native",
            device=device,
            dtype=torch.float32,
            safety_checker=cfg.model.safety_checker,
            option="model.teacher",
        )
        self.flow = is_sd3(self.teacher)  # an SD3-architecture flow transformer, not a UNet
        if cfg.data.teacher_guidance is None:  # as make-pairs' default; recorded so in the run's config.yaml
            cfg.data.teacher_guidance = default_guidance("native", self.teacher)
        self.teacher_model = denoiser(self.teacher)
        # Recorded in the student's file, for transfer/export-lora to check their base against: taken
        # now, in the teacher's own precision, before any adapter renames its weights.
        self.teacher_samples = weight_samples(self.teacher_model.state_dict())
        if self.flow:
            self._refuse_for_flow()
            if cfg.model.lora_rank > 0 and cfg.model.lora_targets == DEFAULT_TARGETS:
                # The UNet's names: a transformer's own instead, recorded so in the run's config.yaml
                # (not without LoRA, where the key is refused unless left at its default).
                cfg.model.lora_targets = list(FLOW_TARGETS)
        elif not isinstance(self.teacher.unet, UNet2DConditionModel):
            raise UserError("the teacher's UNet must be a diffusers UNet2DConditionModel")
        else:
            self._refuse_for_unet()
        # Said before any teacher pairs are made (hours at SDXL size).
        if getattr(self.teacher_model.config, "time_cond_proj_dim", None) is not None:
            # An LCM-distilled UNet (e.g. LCM Dreamshaper) takes a guidance embedding, which its
            # pipeline computes from guidance_scale: the student would train without it and sample with it.
            raise UserError("the teacher's UNet takes a guidance embedding (time_cond_proj_dim): not supported")
        if cfg.loss.objective in ("dmd2", "adm"):  # their scores read the teacher as a diffusion model
            prediction = self.teacher.scheduler.config.get("prediction_type", "epsilon")
            if prediction != "epsilon":
                raise UserError(
                    f"loss.objective {cfg.loss.objective} reads the teacher as epsilon-prediction, "
                    f"it predicts {prediction}"
                )
            scheduler = type(self.teacher.scheduler).__name__
            if scheduler in FEW_STEP_SCHEDULERS or cfg.data.teacher_guidance <= 1:
                # The real score queries the teacher at every noise level, with CFG on top: a guidance-
                # distilled few-step teacher (DMD2's own 4-step model) is no diffusion model's score.
                log.warning(
                    "loss.objective %s uses the teacher as a diffusion model's score (CFG %s at any noise level): "
                    "a few-step or guidance-distilled teacher (its %s, data.teacher_guidance %s) gives a wrong score",
                    cfg.loss.objective,
                    cfg.dmd.real_guidance,
                    scheduler,
                    cfg.data.teacher_guidance,
                )
        # The student's sampler and maths, before any teacher pairs are made: a teacher scheduler it
        # cannot follow is refused here, not after hours of pairs.
        self.maths: ShiftedStudent | FlowStudent
        if self.flow:  # the teacher's own scheduler samples the student (its shift; levels: model.flow_levels)
            if not isinstance(self.teacher.scheduler, FlowMatchEulerDiscreteScheduler):
                raise UserError(
                    f"the SD3 teacher's scheduler is a {type(self.teacher.scheduler).__name__}: a flow student "
                    "trains for, and samples with, the teacher's FlowMatchEulerDiscreteScheduler"
                )
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.teacher.scheduler.config)
            try:
                self.maths = FlowStudent(self.scheduler, cfg.model.flow_levels)
            except ValueError as exc:
                raise UserError(f"the teacher's scheduler: {exc}") from None
        else:
            # The teacher's noise schedule and prediction type; never its sampling-time clipping, which
            # the student is not trained with (the exported pipeline samples as the student learnt).
            self.scheduler = TimestepShiftLCMScheduler.from_base_config(
                self.teacher.scheduler.config,
                shifted_timestep=cfg.model.shift,
            )
            self.maths = ShiftedStudent(self.scheduler)
        self.size = cfg.data.resolution or default_size(self.teacher)
        self._refuse_before_pairs()
        self.text = TextEncoder(self.teacher, self.size, self.size)
        self.sampler = TeacherSampler(
            self.teacher,
            cfg.data.teacher_steps,
            cfg.data.teacher_guidance,
            self.size,
            self.size,
            cfg.data.teacher_timesteps,
        )
        self.pairs = self._load_or_make_pairs(cfg.data.pairs) if cfg.data.pairs else None

        for module in self.teacher.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)  # frozen: the teacher, its text encoders and VAE
        # A LoRA student of the teacher's own weights never changes them: it shares them with the
        # teacher instead of copying them (SDXL: 4.8 GiB in bf16) and trains adapters on top.
        self.student_shares_teacher = cfg.model.lora_rank > 0 and not cfg.model.student_init
        shared = {id(p): p for p in self.teacher_model.parameters()} if self.student_shares_teacher else {}
        student = copy.deepcopy(self.teacher_model, shared).train()
        if not self.student_shares_teacher:
            student.requires_grad_(True)
        if cfg.model.student_init:
            state = read_safetensors(cfg.model.student_init)
            check_state_dict(student, state, f"student init '{cfg.model.student_init}'")
            student.load_state_dict(state)
        if cfg.model.lora_rank > 0:
            add_lora(student, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets, cfg.run.seed)
        # DMD2/ADM's fake score starts as the teacher (a copy taken before any hooks or half precision).
        fake_unet = copy.deepcopy(self.teacher_model) if cfg.loss.objective in ("dmd2", "adm") else None
        if cfg.model.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            self.teacher_model.enable_gradient_checkpointing()
            if fake_unet is not None:
                fake_unet.enable_gradient_checkpointing()
        self.lora_in_half_precision = False
        if cfg.optim.mixed_precision != "no":
            # The teacher is frozen: keep it in half precision; the student keeps fp32 master weights.
            # On any device, so the CPU tests run the path a GPU run takes.
            half = torch.bfloat16  # the only mixed precision the config accepts (fp16 is refused)
            self.teacher.to(half)
            if cfg.model.lora_rank > 0:  # the student's frozen base weights too; the adapters stay fp32
                self.lora_in_half_precision = True  # merged at export against the weights on disk
                for p in student.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(half)
        # Only the main process reads the EMA (checkpoints, grids, exports): the other ranks keep none.
        self.ema = EMA(student, cfg.optim.ema_decay, host=cfg.optim.ema_offload, keep=self.acc.is_main_process)
        self._build_objectives(fake_unet)
        # The teacher's decoder stays where the whole teacher UNet runs every iteration: DMD2's and
        # ADM's real score, or a LoRA student sharing its weights.
        whole_unet = "fake" in self.critics or self.student_shares_teacher
        read = self.backbone.blocks if self.flow and self.pool is not None else None
        groups = teacher_groups(self.teacher, whole_unet, "pixel" in self.critics, read)
        self.offload = HostOffload(groups if cfg.model.teacher_offload else {}, self.acc.device)
        self.text.onload = partial(self.offload.onloaded, "text")
        trainable = [p for p in student.parameters() if p.requires_grad]  # all, or the LoRA adapters
        o = cfg.optim
        opt_g = make_optimizer(trainable, o.optimizer, o.lr, tuple(o.betas), o.weight_decay, o.fused)
        self.student, self.opt_g = self.acc.prepare(student, opt_g)
        self.step = 0
        self.bad_steps = 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.curves_drawn_at: int | None = None  # the iteration curves.png was last drawn at

    def _refuse_for_unet(self) -> None:
        """What a UNet student would ignore: a flow student's settings, an anchor it never gets."""
        cfg = self.cfg
        if cfg.model.flow_levels != DistillConfig().model.flow_levels:
            raise UserError(
                "model.flow_levels is a flow student's (SD3) noise levels; a UNet student's are set by "
                "model.shift and its shift-LCM scheduler: leave model.flow_levels out"
            )
        if cfg.loss.regression_weight > 0 and cfg.refine.mix == "last" and cfg.refine.steps_per_stage[0] == 0:
            # A UNet student's anchor is at step index 0 (later steps start from fresh noise), which
            # `last` trains in the one-step stage only. A flow student's is at every step.
            raise UserError(
                "loss.regression_weight would never apply: a UNet student's anchors step index 0, which "
                "refine.mix=last trains only in the one-step stage, and refine.steps_per_stage[0] is 0"
            )

    def _refuse_for_flow(self) -> None:
        """What a flow transformer teacher (SD3) cannot be distilled with, said before any weight of
        the student is made or any teacher pair sampled."""
        cfg = self.cfg
        if cfg.model.shift != DistillConfig().model.shift:
            raise UserError(
                "model.shift is the UNet student's LCM timestep shift; a flow student samples with the "
                f"teacher's own scheduler (shift {self.teacher.scheduler.config.get('shift')}): leave model.shift out"
            )

    def _refuse_before_pairs(self) -> None:
        """What the config asks of the teacher's UNet that it cannot give, said before any teacher
        pairs are made (hours at SDXL size), from configs and file headers only."""
        cfg, unet = self.cfg, self.teacher_model
        if cfg.data.pairs:
            check_own_files(Path(cfg.data.pairs))
        if cfg.model.student_init:
            layout = read_safetensors_layout(cfg.model.student_init)
            check_state_dict(unet, layout, f"student init '{cfg.model.student_init}'")
        if cfg.model.lora_rank > 0:
            check_lora_targets(unet, cfg.model.lora_targets)
        # SD3: a multiple of the VAE's factor times the patch size (16), within its position embedding.
        teacher = self.teacher
        check_side("data.resolution", self.size, size_multiple(teacher), largest_side(teacher), "this teacher")
        f = self.teacher.vae_scale_factor
        latent = self.size // f
        deepest = self._deepest_side()
        loss = cfg.loss
        if loss.head_pool:  # the pool's heads read every encoder map, down to the deepest
            check_depth("discriminator.downsamples", cfg.discriminator.downsamples, deepest)
            if cfg.discriminator.global_downsamples is not None:
                check_depth("discriminator.global_downsamples", cfg.discriminator.global_downsamples, deepest)
        gan = cfg.dmd.gan_g_weight > 0 or cfg.dmd.gan_d_weight > 0
        if loss.objective == "dmd2" and gan and cfg.dmd.classifier_downsamples is not None:
            check_depth("dmd.classifier_downsamples", cfg.dmd.classifier_downsamples, deepest)
        if loss.adversarial_pretraining and cfg.pretrain.pixel_weight > 0:
            crop = min(cfg.pretrain.pixel_crop or latent, latent) * f
            check_depth("pretrain.pixel_downsamples", cfg.pretrain.pixel_downsamples, crop)

    def _deepest_side(self) -> int:
        """The side of the backbone's deepest map (the fake score's bottleneck, the same network)."""
        side = self.size // self.teacher.vae_scale_factor
        if self.flow:  # every map read from the transformer is its token grid
            return side // self.teacher_model.config.patch_size
        for _ in self.teacher_model.config.block_out_channels[1:]:  # every down block but the last
            side = (side + 1) // 2  # halves it, rounding up
        return side

    def _build_objectives(self, fake_unet: torch.nn.Module | None) -> None:
        """The critics this config trains, the pre-training objective and the main one."""
        cfg, device = self.cfg, str(self.acc.device)
        d, loss = cfg.discriminator, cfg.loss
        self.critics: dict[str, Critic] = {}
        self.pool: HeadPool | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        if loss.head_pool:
            self.backbone = (TransformerBlockFeatures if self.flow else UNetEncoderFeatures)(self.teacher_model)
            shapes = self.backbone.feature_shapes(self.size // self.teacher.vae_scale_factor, device)
            self.pool = HeadPool(
                shapes,
                d.kinds,
                d.t_stars,
                self.text.pooled_dim,
                d.width,
                d.downsamples,
                d.candidates,
                dynamic=d.pool,
                seed=cfg.run.seed,
                text_init=d.text_init,
                global_downsamples=d.global_downsamples,
            ).to(device)
            judgement = NitroFusionObjective(self.backbone, self.pool, self.maths.add_noise, loss.kind, loss.r1_weight)
            self.opt_d = make_optimizer(
                self.pool.parameters(), "adamw", d.lr, tuple(d.betas), d.weight_decay, cfg.optim.fused
            )
            self.critics["pool"] = PoolDiscriminator(judgement, self.opt_d, d.t_stars_per_step, d.refresh_fraction)
        pool = self.critics.get("pool")

        if fake_unet is not None:
            k = cfg.dmd
            classifier = None
            if loss.objective == "dmd2" and (k.gan_g_weight > 0 or k.gan_d_weight > 0):
                c = fake_unet.config  # the mid block's output, or the width of a transformer's tokens
                deepest = c.num_attention_heads * c.attention_head_dim if self.flow else c.block_out_channels[-1]
                init = torch.Generator().manual_seed(cfg.run.seed * 1009 + 17)
                depth = k.classifier_downsamples
                depth = max_downsamples(self._deepest_side()) if depth is None else depth
                classifier = DiscriminatorHead(
                    "global_uncond", deepest, k.classifier_width, self.text.pooled_dim, depth, init
                ).to(device)
            process = self.maths.process  # diffusion models at any noise level: the teacher's own, unshifted
            self.critics["fake"] = FakeScore(
                fake_unet.to(device),
                process,
                k.min_t,
                k.max_t,
                partial(
                    make_optimizer,
                    name=cfg.optim.optimizer,
                    lr=k.fake_lr,
                    betas=tuple(k.fake_betas),
                    weight_decay=k.fake_weight_decay,
                    fused=cfg.optim.fused,
                ),
                cfg.optim.grad_clip,
                classifier,
                loss.kind,
                train_t=(k.fake_min_t, k.fake_max_t),
            )
            real = RealScore(self.teacher_model, process, k.real_guidance, self.text.negative)
        if loss.adversarial_pretraining and cfg.pretrain.pixel_weight > 0:
            p = cfg.pretrain
            init = torch.Generator().manual_seed(cfg.run.seed * 1009 + 29)
            head = DiscriminatorHead(
                "local_cond", 3, p.pixel_width, self.text.pooled_dim, p.pixel_downsamples, init, d.text_init
            ).to(device)
            opt = make_optimizer(head.parameters(), "adamw", d.lr, tuple(d.betas), d.weight_decay, cfg.optim.fused)
            self.critics["pixel"] = PixelDiscriminator(self.teacher.vae, head, opt, p.pixel_crop, loss.kind)

        self.objective: Objective
        self.pretrain_objective: Objective
        if loss.objective == "nitrofusion":
            self.objective = NitroFusion(pool)
            main = [pool]
        elif loss.objective == "dmd2":
            with_pool = pool if loss.pool_weight > 0 else None
            self.objective = DMD2(
                real,
                self.critics["fake"],
                k.gan_g_weight,
                k.gan_d_weight,
                with_pool,
                loss.pool_weight,
                k.classifier_noise,
            )
            main = [self.critics["fake"]] + ([pool] if with_pool else [])
        else:
            self.objective = ADM(real, self.critics["fake"], pool)
            main = [self.critics["fake"], pool]
        if loss.adversarial_pretraining:
            latent = pool if cfg.pretrain.latent_weight > 0 else None
            pixel = self.critics.get("pixel")
            self.pretrain_objective = AdversarialPretraining(
                latent, pixel, cfg.pretrain.latent_weight, cfg.pretrain.pixel_weight, cfg.pretrain.regression_weight
            )
            before = [c for c in (latent, pixel) if c is not None]
        else:
            self.pretrain_objective = Regression()
            before = []
        # Which critics learn in which phase (all of them every iteration of it).
        self.trained_critics: dict[str, list[Critic]] = {"pretrain": before, "distill": main}

    def _load_or_make_pairs(self, directory: str) -> PairShards:
        """Missing pairs are made first (a folder stopped half-way is completed, to the count it
        was started for), each process making its share of the shards: one process alone would
        take hours at SDXL size, past the time the others may wait in a barrier
        (run.process_timeout_minutes). The others' shards are waited for on disk, then the
        processes meet."""
        plan = planned_pairs(directory)
        make = not list(Path(directory).glob(SHARD_GLOB)) or bool(missing_shards(directory))
        self.acc.wait_for_everyone()  # every process decides on the folder before any writes to it
        if make:
            count, shard_size = plan or (self.cfg.data.num_pairs, SHARD_SIZE)
            # The teacher is in fp32 until the student is copied from it, then cast to bf16: in a
            # bf16 run its pairs are drawn under bf16 autocast (fp32 matmuls at SDXL size are
            # several times slower). A pair's precision is not part of its recipe: make-pairs'
            # fp16 pairs may complete a folder too.
            half = self.cfg.optim.mixed_precision == "bf16"
            with torch.autocast(self.acc.device.type, torch.bfloat16, enabled=half):
                make_pairs(
                    self.sampler,
                    self.prompts,
                    count,
                    directory,
                    seed=self.cfg.run.seed,
                    batch_size=self.cfg.data.pairs_batch_size,
                    shard_size=shard_size,
                    rank=self.acc.process_index,
                    world=self.acc.num_processes,
                    progress=self.progress,
                )
            planned = planned_shards(directory, count, shard_size)
            try:  # outside any collective, so the process group's own timeout never fires here
                wait_for_shards(planned, Path(directory), self.cfg.run.process_timeout_minutes)
            except ShardsNotDelivered as exc:
                raise TrainingStopped(str(exc)) from None
        self.acc.wait_for_everyone()
        # Pairs from another teacher setting or image size would be wrong data, not an error, later.
        pairs = PairShards.load(directory, sampler_recipe(self.sampler))
        # The run trains on the pairs' prompts: a data.prompts they were not made from would be
        # read for the validation grid only, and the run's prompts silently not the ones asked for.
        # Not the seed: finished pairs are data, which runs of other seeds may share.
        if pairs.prompts != self.prompts:
            raise UserError(
                f"the teacher pairs in '{directory}' were made from another prompt list ({len(pairs.prompts)} "
                f"prompts) than data.prompts={self.cfg.data.prompts!r} ({len(self.prompts)}): set data.prompts "
                "to the list they were made from, or give a new pairs directory"
            )
        if len(pairs) != self.cfg.data.num_pairs and self.acc.is_main_process:
            # The folder's own count is the data (runs of other presets share it), said rather than
            # taken silently for the count asked for.
            log.warning(
                "data.pairs '%s' holds %d pairs: the run trains on those, not on data.num_pairs %d "
                "(`nitrofusion make-pairs --n %d --out %s` with the same settings extends the folder)",
                directory,
                len(pairs),
                self.cfg.data.num_pairs,
                self.cfg.data.num_pairs,
                directory,
            )
        return pairs

    # ---- randomness ------------------------------------------------------------------
    def rng(self, purpose: str, per_rank: bool = False, micro: int = 0) -> torch.Generator:
        rank = self.acc.process_index if per_rank else 0
        # One stream per (rank, micro-batch) of the iteration; a single process's are its micro-batches.
        # `micro` also goes up to 1000 (the pool's first draw keys its t* groups by t* + 1): the
        # width holds those on every rank, or they ran into the next purpose's streams.
        streams = max(self.cfg.optim.grad_accumulation, 1001) * self.acc.num_processes
        stream = micro * self.acc.num_processes + rank
        key = ((self.cfg.run.seed * 1_000_003 + self.step) * 101 + PURPOSES[purpose]) * max(1009, streams) + stream
        return torch.Generator().manual_seed(key % (2**63 - 1))

    # ---- schedule --------------------------------------------------------------------
    def phase(self, step: int) -> Phase:
        return self.schedule.phase(step)

    # ---- data --------------------------------------------------------------------------
    def batch(self, micro: int) -> tuple[Conditioning, torch.Tensor, torch.Tensor]:
        """(conditioning, starting noise, teacher x0) for this rank and micro-batch."""
        g = self.rng("data", per_rank=True, micro=micro)
        n = self.cfg.data.batch_size
        device = self.acc.device
        if self.pairs is not None:
            idx = torch.randint(0, len(self.pairs), (n,), generator=g)
            prompts = [self.pairs.prompts[int(i)] for i in self.pairs.prompt_ids[idx]]
            noise = noise_for_seeds(self.pairs.seeds[idx].tolist(), self.sampler.latent_shape)
            real = self.pairs.latents[idx]
        else:
            prompts = [self.prompts[int(i)] for i in torch.randint(0, len(self.prompts), (n,), generator=g)]
            noise = torch.randn((n, *self.sampler.latent_shape), generator=g)
            # The VAE too, which a latent-only sample never runs (0.16 GiB): the pipeline's device
            # then never depends on how diffusers picks among components on different devices.
            with self.offload.onloaded("text", "vae", "decoder"):
                real = self.sampler(prompts, noise, g)
        return self.text(prompts).to(device), noise.to(device), real.to(device)

    # ---- one iteration -----------------------------------------------------------------
    def student_x0(
        self, phase: Phase, noise: torch.Tensor, cond: Conditioning, micro: int, train: bool
    ) -> tuple[torch.Tensor, int, int]:
        """The student's x0 at step j of its k-step schedule, and (k, j).

        Bottom-up refinement: in stage k, j is drawn from 0..k-1 (or is k-1 with refine.mix=last);
        the student's own first j steps run under no_grad (backward simulation) to make the input.
        j is drawn per micro-batch (an iteration of the sdxl preset's 20 covers the steps evenly, not
        one step 20 times), the same on every rank (their backward simulations take equal time).
        """
        k = phase.num_steps
        draw = self.rng("stepidx", micro=micro)
        j = k - 1 if self.cfg.refine.mix == "last" else int(torch.randint(0, k, (1,), generator=draw))
        raw = self.acc.unwrap_model(self.student)
        x_in, level = self.maths.simulate(raw, noise, k, j, cond, self.rng("simulate", True, micro))
        with torch.set_grad_enabled(train):
            return self.maths.x0(self.student, x_in, level, cond).float(), k, j

    def train_step(self) -> dict[str, float]:
        cfg, phase = self.cfg, self.phase(self.step)
        accum = cfg.optim.grad_accumulation
        # Two time scales: critics learn every iteration, the student every d_steps_per_g-th.
        update_g = phase.name == "pretrain" or self.step % cfg.loss.d_steps_per_g == 0
        objective = self.pretrain_objective if phase.name == "pretrain" else self.objective
        critics = self.trained_critics[phase.name]
        for critic in critics:
            critic.begin_step(self)
        parts: dict[str, list[float]] = defaultdict(list)  # each logged value, one per micro-batch
        for micro in range(accum):
            cond, noise, real = self.batch(micro)
            sync = self.acc.no_sync(self.student) if micro < accum - 1 else nullcontext()
            with sync, self.acc.autocast():
                fake, k, j = self.student_x0(phase, noise, cond, micro, update_g)
                losses = objective(self, fake, real, cond, micro, update_g)
                g_loss, d_loss = losses.g_loss, losses.d_loss
                anchored = j == 0 or self.maths.deterministic
                if phase.name == "distill" and anchored and cfg.loss.regression_weight > 0:
                    # The anchor needs the teacher's x0 from the student's input noise: step 0 has it,
                    # and every step of a sampler that draws no noise after the first (a flow student's).
                    anchor = F.mse_loss(fake, real)
                    g_loss = g_loss + cfg.loss.regression_weight * anchor
                    losses.logs["regression"] = float(anchor.detach())
                total = (g_loss if update_g else 0) + (d_loss if d_loss is not None else 0)
                if fires("loss.nan", self.step):  # fault injection (docs/reliability.md)
                    total = total * float("nan")
                finite = self.on_every_rank(torch.isfinite(torch.as_tensor(total, dtype=torch.float32)).all())
                if not finite:
                    break
                self.acc.backward(total / accum)
            for key, value in losses.logs.items():
                parts[key].append(value)
            if update_g:  # an iteration where only the critics learn has no student loss to show
                parts["g_loss"].append(float(g_loss.detach()))
            if d_loss is not None:
                parts["d_loss"].append(float(d_loss.detach()))
        # A finite loss can still give inf/NaN gradients: one bad step must not poison the weights.
        if not finite or not self._gradients_finite(critics, update_g):
            return self._skip_step()
        # The micro-batches' mean (a value some of them lack, e.g. the anchor's, over those that have it).
        logs = {**means(parts), "steps": k, "index": j}
        kill_point("step", self.step)  # fault injection: gradients computed, no optimizer has stepped yet
        self.bad_steps = 0
        if update_g:
            self._warmup_lr()
            self.acc.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip)
            self.opt_g.step()
            self.ema.update(self.acc.unwrap_model(self.student))
        self._clear_student_gradients()
        for critic in critics:
            logs.update(critic.update(self))
        for critic in self.critics.values():
            critic.zero_grad()
        return logs

    def _gradients_finite(self, critics: list[Critic], update_g: bool) -> bool:
        params = list(self.student.parameters()) if update_g else []
        for critic in critics:
            params += [p for opt in critic.optimizers.values() for group in opt.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        return self.on_every_rank(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)))

    def on_every_rank(self, ok: torch.Tensor) -> bool:
        """Whether `ok` holds on every rank (all ranks skip a step together, or none does): the
        ranks' failures summed (accelerate's reduce knows sum and mean on every version it allows)."""
        failed = (~ok.bool()).float().to(self.acc.device)
        return not bool(self.acc.reduce(failed, "sum") > 0)

    def _skip_step(self) -> dict[str, float]:
        self._clear_student_gradients()
        for critic in self.critics.values():
            critic.zero_grad()
        self.bad_steps += 1
        self.log_line(f"step {self.step}: non-finite loss or gradient, step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.run.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_steps} non-finite losses in a row at step {self.step}; stopped, last good checkpoint kept"
            )
        return {"skipped": 1.0}

    def _clear_student_gradients(self) -> None:
        # Freed on one process; zeroed under DDP, where they are views into its buckets (make_accelerator).
        self.opt_g.zero_grad(set_to_none=self.acc.num_processes == 1)

    def _warmup_lr(self) -> None:
        w = self.cfg.optim.warmup_steps
        scale = min(1.0, (self.step + 1) / w) if w > 0 else 1.0
        for group in self.opt_g.param_groups:
            group["lr"] = self.cfg.optim.lr * scale

    def average_gradients(self, params: Iterable[torch.nn.Parameter], bucket: int = 2**24) -> None:
        """Average gradients over ranks, for modules kept out of DDP (the pool: a different subset of
        heads each step and rank; the fake score: called with and without parameter gradients in
        one step). A parameter some rank has a gradient for is averaged on every rank, zero where
        it had none (a head another rank drew): as one process summing its micro-batches would."""
        if self.acc.num_processes == 1:
            return
        params = list(params)
        local = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.acc.device)
        anywhere = (self.acc.reduce(local, "sum") > 0).tolist()
        for p, used in zip(params, anywhere, strict=True):
            if used and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, used in zip(params, anywhere, strict=True) if used]
        while grads:
            n, size = 0, 0
            while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket):
                size += grads[n].numel()
                n += 1
            chunk, grads = grads[:n], grads[n:]
            flat = self.acc.reduce(torch.cat([g.flatten() for g in chunk]), "mean")
            offset = 0
            for g in chunk:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # ---- the loop -----------------------------------------------------------------------
    def train(self, resume: str | None = None) -> Path:
        """Train to the end (from the checkpoint `resume` names: a path, or `latest`), one run at a
        time in run.output_dir; the exported pipeline's folder."""
        with ExitStack() as held:
            refused = None
            try:
                held.enter_context(folder_lock(self.out, "run.output_dir", enabled=self.acc.is_main_process))
            except UserError as exc:
                refused = exc
            # The main process alone takes the lock: the other ranks stop with it, where they waited in
            # their first collective for run.process_timeout_minutes.
            if not self.on_every_rank(torch.tensor(refused is None)):
                raise refused or UserError(
                    f"run.output_dir '{self.out}' is in use by another run (see the main process)"
                )
            return self._train(resume)

    def _train(self, resume: str | None) -> Path:
        cfg = self.cfg
        if resume:
            self.resume(resume)
            # Each process reads the checkpoint on its own: on disks that are not shared (several
            # machines), one could resume at step N and another start afresh, their weights apart.
            # Every rank's step, gathered (accelerate's reduce summed for "max" before 1.14: N ranks at
            # step S compared S with N*S, and every multi-rank resume was refused).
            steps = self.acc.gather(torch.tensor([float(self.step)], device=self.acc.device)).cpu()
            if self.acc.num_processes > 1 and not bool((steps == steps[0]).all()):
                raise UserError(
                    "the processes resumed from different checkpoints (is run.output_dir on a disk every "
                    "machine shares?): resume from one path they can all read"
                )
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step == 0:  # a fresh run in an earlier run's folder: its student is the user's
                moved = self.set_aside_earlier_run()
                if moved is not None:
                    self.log_line(f"{moved}: the earlier run in this folder (its student, pipeline, grids), set aside")
            save_config(cfg, self.out / "config.yaml")
            self.metrics.keep_until(self.step)  # a fresh run in an old directory: not the old run's curves
            if self.step == 0:  # nor its checkpoints: they would outrank this run's, which pruning would delete
                for path in checkpoint.set_aside_later(self.out / "checkpoints", 0):
                    self.log_line(f"{path}: a checkpoint of an earlier run in this folder, set aside")
        self.acc.init_trackers("distill")
        total = cfg.total_steps
        # Each process runs every micro-batch: N processes train on N times the batch of one.
        n, b, a = self.acc.num_processes, cfg.data.batch_size, cfg.optim.grad_accumulation
        if self.step < total:
            self.log_line(
                f"iterations {self.step + 1}..{total}; batch {n * b * a} an iteration "
                f"({n} process{'es' if n > 1 else ''} x data.batch_size {b} x optim.grad_accumulation {a})"
            )
        stage_ends = self.schedule.stage_ends()
        bar = tqdm(total=total, initial=self.step, desc="distill", disable=not self.progress)
        # The tracker gets each value's mean over the window's iterations that logged it (the student's
        # loss from the iterations where it stepped: with loss.d_steps_per_g = 5 and log_every = 10 the
        # logged iteration itself never is one), and the training time per iteration (checkpoints and
        # validation grids are not iterations). A resumed run's first window and the last may be shorter.
        trained, iterations, window = 0.0, 0, defaultdict(list)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                logs = self.train_step()
                trained, iterations = trained + time.perf_counter() - t0, iterations + 1
                self.step += 1
                for key, value in logs.items():
                    window[key].append(value)
                if self.acc.is_main_process:
                    self.metrics.record(self.step, self.curve_values(logs))
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("g_loss", "d_loss")}, refresh=False)
                if self.step % cfg.run.log_every == 0 or self.step == total:
                    self.acc.log({**means(window), "seconds_per_step": trained / iterations}, step=self.step)
                    trained, iterations, window = 0.0, 0, defaultdict(list)
                    self.metrics.flush()
                # Before the checkpoint of the same step, so a resumed run never misses it.
                if self.step in stage_ends:
                    self.export_stage(stage_ends[self.step])
                # A skipped step changed nothing: keep the last good checkpoint as the newest.
                if (self.step % cfg.run.checkpoint_every == 0 or self.step == total) and not self.bad_steps:
                    self.save_checkpoint()
                if cfg.run.validate_every and (self.step % cfg.run.validate_every == 0 or self.step == total):
                    self.validate()
        finally:
            bar.close()  # before any error message, which must be the last line the user sees
            # The iterations since the last flush are the ones that show why a run stopped.
            self.draw_curves()
        exported = self.export()  # waits for every rank: before end_training, which ends the process group
        self.acc.end_training()
        return exported

    # ---- persistence ----------------------------------------------------------------------
    EARLIER_RUN = (
        "student_unet.safetensors",
        "student_transformer.safetensors",
        "pipeline",
        "stages",
        "validation",
        "curves.png",
        "metrics.jsonl",
    )

    def set_aside_earlier_run(self) -> Path | None:
        """Move what an earlier run exported into this folder (and its config, log and grids) to
        abandoned-run[-N]/, as its checkpoints are set aside: a fresh run would replace them."""
        found = [self.out / name for name in self.EARLIER_RUN if (self.out / name).exists()]
        if not found:
            return None
        target, n = self.out / "abandoned-run", 1
        while target.exists():
            n += 1
            target = self.out / f"abandoned-run-{n}"
        target.mkdir()
        if (self.out / "config.yaml").is_file():  # the config those were made with
            found.append(self.out / "config.yaml")
        for path in found:
            os.replace(path, target / path.name)
        return target

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        self.metrics.flush()
        raw = self.acc.unwrap_model(self.student)
        if not all(torch.isfinite(p).all() for p in raw.parameters()):
            self.log_line(f"step {self.step}: the student's weights are not finite; checkpoint not written")
            return
        # A LoRA student's frozen base is the teacher's (or model.student_init's) weights, which the
        # resumed run loads anyway: the checkpoint records which weights they were, not a copy of them
        # (SDXL: 4.8 of the student's 5.5 GiB).
        frozen = self.frozen_student_weights(raw)
        tensors = {f"student.{k}": v for k, v in raw.state_dict().items() if k not in frozen}
        tensors.update({f"ema.{k}": v for k, v in self.ema.own_state_dict().items()})
        # opt_g went through accelerator.prepare: its state lives in the wrapped optimizer.
        g_t, g_meta = checkpoint.optimizer_tensors(self.opt_g.optimizer, "opt_g", to_host=False)
        tensors.update(g_t)
        meta = {"opt_g": g_meta, "teacher_fingerprint": self.teacher_fingerprint()}
        if frozen:
            meta["student_frozen_fingerprint"] = checkpoint.fingerprint(frozen)
        for critic in self.critics.values():  # pool (+ opt_d), fake_score/classifier (+ opt_fake), pixel (+ opt_pixel)
            for name, module in critic.modules.items():
                tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
            for name, opt in critic.optimizers.items():
                opt_t, meta[name] = checkpoint.optimizer_tensors(opt, name, to_host=False)
                tensors.update(opt_t)
        checkpoint.save(
            self.out / "checkpoints",
            self.step,
            tensors,
            {**meta, "config": self.cfg.to_dict()},
            keep=self.cfg.run.keep_checkpoints,
        )

    # The keys that decide what a checkpoint holds (which networks, their shapes): resuming across a
    # change of any of them cannot load, or would change what the loaded weights compute (the LoRA
    # scale alpha/r, the timestep shift the student is told); the rest (learning rates, stage
    # lengths, logging) may change.
    STATE_KEYS = (
        "model.lora_rank",
        "model.lora_alpha",
        "model.lora_targets",
        "model.shift",
        "model.flow_levels",
        "data.resolution",
        "discriminator.t_stars",
        "discriminator.kinds",
        "discriminator.candidates",
        "discriminator.pool",
        "discriminator.width",
        "discriminator.downsamples",
        "discriminator.global_downsamples",
        "loss.objective",
        "loss.pretrain_kind",
        "optim.optimizer",
        "dmd.classifier_width",
        "dmd.classifier_downsamples",
        "pretrain.pixel_width",
        "pretrain.pixel_downsamples",
    )

    def _check_resumable(self, saved: dict) -> None:
        now = self.cfg.to_dict()

        def setting(config: dict, section: str, name: str) -> object:
            value = config[section][name]
            if (section, name) == ("model", "lora_alpha") and value is None:
                return config[section].get("lora_rank")  # None means "the rank": compared as the scale it gives
            if (section, name) == ("model", "lora_targets") and not config[section].get("lora_rank"):
                return None  # no adapters (a flow run recorded its transformer's names here until 2026-11-29)
            return value

        inferred = self.flow and "model" in saved and "flow_levels" not in saved["model"]
        if inferred:  # a checkpoint from before the key trained at the scheduler's own levels, the only ones
            saved = {**saved, "model": {**saved["model"], "flow_levels": "stock"}}
        heads = saved.get("discriminator", {})
        old_heads = "downsamples" in heads and "global_downsamples" not in heads
        saved = as_trained(saved)  # e.g. from before the key, global heads had the local heads' depth
        # run.seed keys every random draw of the run: another would make the rest of it another run's.
        unread = unread_keys(now)  # e.g. the pool's shape in a run that trains none
        for key in (*self.STATE_KEYS, "run.seed"):
            section, name = key.split(".")
            if section not in saved or name not in saved[section] or key in unread:
                continue
            was, is_now = setting(saved, section, name), setting(now, section, name)
            if was != is_now:
                own = f"the run's own config ({self.out / 'config.yaml'})"
                if inferred and key == "model.flow_levels":
                    own = "--set model.flow_levels=stock (its config.yaml predates the key)"
                elif old_heads and key == "discriminator.global_downsamples":
                    own = f"--set discriminator.global_downsamples={was} (its config.yaml predates the key)"
                raise UserError(
                    f"the checkpoint was made with {key}={was!r}, this run has {is_now!r}: resume with "
                    f"{own} or start in a new run.output_dir"
                )

    def resume(self, which: str) -> None:
        root = self.out / "checkpoints"
        if self.acc.is_main_process:
            for stale in checkpoint.remove_unfinished(root):
                self.log_line(f"removed {stale}: a checkpoint write that never finished (its process died)")
        if which == "latest":
            found = checkpoint.load_latest(root, log=self.log_line)
            if found is None:
                self.log_line(f"no checkpoint under {root}; starting from scratch")
                return
        else:
            try:
                found = checkpoint.load(which)
            except Exception as exc:
                raise UserError(f"cannot resume from '{which}': {exc}") from None
        tensors, meta = found
        self._check_resumable(meta.get("config", {}))
        changed = changed_settings(as_trained(meta.get("config", {})), self.cfg.to_dict())
        if changed:  # allowed (learning rates, stage lengths, logging...), but said
            self.log_line(f"resumed with settings changed since the checkpoint: {'; '.join(changed)}")
        raw = self.acc.unwrap_model(self.student)
        saved_teacher = meta.get("teacher_fingerprint")  # absent from checkpoints written before it was
        # Checkpoints written before the safety checker was left out hashed it too.
        if saved_teacher is not None and saved_teacher not in (
            self.teacher_fingerprint(),
            self.teacher_fingerprint(()),
        ):
            raise UserError(
                f"the checkpoint was made with another teacher than model.teacher={self.cfg.model.teacher!r} "
                "(its weights differ): resume with the teacher it was made with, or start in a new run.output_dir"
            )

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

        # Each network's keys and shapes against the checkpoint's first: a config change that
        # STATE_KEYS does not name (e.g. a critic that one config has and the other not) is
        # reported by the keys it concerns, not as load_state_dict's multi-line error.
        frozen = self.frozen_student_weights(raw)
        student = self._student_without_frozen(part("student"), frozen, meta)
        pairs = {"student": (student, {k: v for k, v in raw.state_dict().items() if k not in frozen})}
        pairs |= {n: (part(n), m.state_dict()) for c in self.critics.values() for n, m in c.modules.items()}
        for name, (saved, live) in pairs.items():
            problems = layout_problems(saved, live, names=("checkpoint", "this run"))
            if problems:
                raise UserError(
                    f"the checkpoint's {name} does not fit this run's ({'; '.join(problems)}): "
                    "resume with the run's own config"
                )
        try:
            raw.load_state_dict(student, strict=not frozen)  # keys and shapes checked above, frozen ones aside
            if not self.ema.load_own_state_dict(part("ema"), raw):
                self.log_line("the checkpoint holds no EMA (made with optim.ema_decay=0): it starts from the student")
            checkpoint.load_optimizer(self.opt_g.optimizer, tensors, meta["opt_g"], "opt_g")
            for critic in self.critics.values():
                for name, module in critic.modules.items():
                    module.load_state_dict(part(name))
                for name, opt in critic.optimizers.items():
                    if name not in meta:
                        raise UserError(f"checkpoint has no '{name}': it was made with another loss configuration")
                    checkpoint.load_optimizer(opt, tensors, meta[name], name)
        except (RuntimeError, KeyError, ValueError) as exc:  # a network that the checkpoint's config did not have
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"the checkpoint does not fit this run's networks ({first[:200]}): resume with the run's own config"
            ) from None
        self.step = int(meta["step"])
        self.log_line(f"resumed from step {self.step}")
        if self.acc.is_main_process:
            if which == "latest" or Path(which).resolve().parent == root.resolve():
                for path in checkpoint.set_aside_later(root, self.step):
                    self.log_line(f"{path}: a later checkpoint of the run resumed before it, set aside")
            else:
                # Another folder's checkpoint continues here: whatever this folder holds is another
                # run's, which it would otherwise prune (checkpoints) and overwrite (student, pipeline).
                moved = self.set_aside_earlier_run()
                if moved is not None:
                    self.log_line(f"{moved}: the earlier run in this folder (its student, pipeline, grids), set aside")
                for path in checkpoint.set_aside_later(root, -1):
                    self.log_line(f"{path}: a checkpoint of an earlier run in this folder, set aside")
        # A run killed while validating after its checkpoint: draw the grid it never wrote.
        every = self.cfg.run.validate_every
        due = every and (self.step % every == 0 or self.step == self.cfg.total_steps)
        if due and not self.validation_path().is_file():
            self.validate()

    def frozen_student_weights(self, raw: UNet2DConditionModel) -> dict[str, torch.Tensor]:
        """The student's weights that never train (a LoRA student's base), by state-dict key (every
        key of a tied weight, which named_parameters would name once)."""
        state = raw.state_dict(keep_vars=True)
        return {k: v.detach() for k, v in state.items() if isinstance(v, torch.nn.Parameter) and not v.requires_grad}

    def teacher_fingerprint(self, without: tuple[str, ...] = ("safety_checker",)) -> str:
        """The teacher's weights, as a checkpoint records them. Not the safety checker's, which never
        touches training (`model.safety_checker` may change between a run and its resume)."""
        state = {
            f"{name}.{key}": value
            for name, module in self.teacher.components.items()
            if isinstance(module, torch.nn.Module) and name not in without
            for key, value in module.state_dict().items()
        }
        return checkpoint.fingerprint(state)

    def _student_without_frozen(
        self, saved: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], meta: dict
    ) -> dict[str, torch.Tensor]:
        """The checkpoint's student weights to load: never its frozen base, which this run already
        holds (shared with the teacher, or read from model.student_init) and which must be the base
        the checkpoint was trained on. Loading one would write into the teacher (backbone, real score)."""
        if not frozen:
            return saved
        expected = meta.get("student_frozen_fingerprint")
        if expected is None and frozen.keys() <= saved.keys():  # a checkpoint that still holds its base
            expected = checkpoint.fingerprint({k: saved[k] for k in frozen})
        if expected is not None and expected != checkpoint.fingerprint(frozen):
            raise UserError(
                "the checkpoint's LoRA student was trained on other frozen weights than this run's "
                "(another model.teacher or model.student_init): resume with the run's own config"
            )
        return {k: v for k, v in saved.items() if k not in frozen}

    @property
    def weights_name(self) -> str:
        """The student's own weights file in a run's folder (the UNet's, or the flow transformer's)."""
        return "student_transformer.safetensors" if self.flow else "student_unet.safetensors"

    @property
    def weights_metadata(self) -> dict[str, str]:
        """Its header: a UNet student's the shift it samples at, as the public NitroSD files are read;
        a flow student's the `sigmas` its pipeline is called with (its export's nitrofusion.json's);
        and a few of its teacher's weights (`nitrofusion.weights.provenance`)."""
        own = (
            flow_file_metadata(self.maths.recorded_sigmas()) if self.flow else unet_file_metadata(self.cfg.model.shift)
        )
        return own | teacher_samples_metadata(self.teacher_samples)

    def student_pipeline(
        self, use_ema: bool = True, unet: torch.nn.Module | None = None, components: dict | None = None
    ) -> DiffusionPipeline:
        """The student as a pipeline (the EMA or the raw student, or `unet` if given: a UNet, or a
        flow transformer), with the teacher's other modules (or `components`' in their place)."""
        if use_ema and unet is None and not self.ema.kept:
            raise RuntimeError("the EMA is kept on the main process only")
        unet = unet or (self.ema.shadow if use_ema else self.acc.unwrap_model(self.student))
        # The teacher's own settings that are not modules (SD1.5: requires_safety_checker; SDXL:
        # force_zeros_for_empty_prompt), or the student's pipeline would take the class defaults.
        params = inspect.signature(type(self.teacher).__init__).parameters
        config = self.teacher.config.items()
        flags = {k: v for k, v in config if k in params and k not in self.teacher.components}
        student = {"transformer" if self.flow else "unet": unet, "scheduler": self.scheduler}
        modules = {**self.teacher.components, **(components or {}), **student}
        pipe = type(self.teacher)(**modules, **flags)
        # A flow student samples with the teacher's own (Euler) scheduler: "native", without CFG.
        pipe.nitro_sampler, pipe.nitro_model = "native" if self.flow else "shift-lcm", str(self.out)
        if self.flow:  # sampled at the levels it trains at, as its export records them
            pipe.nitro_sigmas = self.maths.recorded_sigmas()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def validate(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        pipe = self.student_pipeline()
        n = self.cfg.run.validation_prompts
        prompts = [self.prompts[(i * len(self.prompts)) // n] for i in range(n)]
        rows, labels = [], []
        # Drawn at the size the student trains at, where the sampler accepts it (a VAE with a
        # factor above 8 asks for more).
        size = self.size if self.size % size_multiple(pipe) == 0 else default_size(pipe)
        # Under the training's autocast: the student keeps fp32 master weights while the frozen
        # modules (text encoders, VAE) are in bf16/fp16, whose dtype sets the sampler's latents.
        on_device = self.ema.on_device(self.acc.device)
        with self.offload.onloaded("text", "vae", "safety"), on_device, self.acc.autocast(), decoding_one_by_one(pipe):
            for steps in range(1, self.schedule.max_sampling_steps() + 1):
                # In batches of the training's size: the decode of 10 images at once at 1024² would
                # add its activations to the training's resident state (images do not depend on it).
                batch = min(n, self.cfg.data.batch_size)
                images = generate(
                    pipe,
                    prompts,
                    steps=steps,
                    seed=0,
                    height=size,
                    width=size,
                    batch_size=batch,
                    guidance_scale=0.0,  # the student learnt the teacher's guided samples without CFG
                    progress=False,
                )
                rows.append([r.image for r in images])
                labels.append(f"student, {steps} step" + ("s" if steps > 1 else ""))
                kill_point("validation", self.step)  # fault injection: mid-validation
        path = self.validation_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # never a half-written PNG under the real name
            make_grid(rows, labels, scale=max(1, 96 // rows[0][0].size[0])).save(tmp, format="PNG")
        self.draw_curves()
        return path

    def curve_values(self, logs: dict[str, float]) -> dict[str, float]:
        """An iteration's logs as metrics.jsonl keeps them: pre-training's losses under their own
        names, since they measure other things (a regression MSE, the pixel critic's game)."""
        if self.phase(self.step - 1).name != "pretrain":
            return logs
        return {(f"pretrain_{k}" if k in ("g_loss", "d_loss") else k): v for k, v in logs.items()}

    def draw_curves(self) -> Path | None:
        """curves.png: every iteration's losses and critic outputs so far, the phases marked."""
        if not self.acc.is_main_process:
            return None
        if self.curves_drawn_at == self.step:  # the last validation drew them; nothing new since
            return self.out / "curves.png"
        self.metrics.flush()
        title = f"{self.cfg.loss.objective} distillation of {self.cfg.model.teacher}"
        path = try_plot_curves(
            self.metrics.read(), self.out / "curves.png", self.log_line, phases=self.schedule.labels(), title=title
        )
        self.curves_drawn_at = self.step if path else None
        return path

    def validation_path(self) -> Path:
        return self.out / "validation" / f"step-{self.step:08d}.png"

    def export(self) -> Path:
        """student_unet.safetensors (student_transformer.safetensors for a flow student; EMA weights)
        and a complete pipeline directory."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            student = plain_unet(self.ema.shadow, self.lora_base())  # adapters folded in: stock diffusers loads it
            save_state_dict(student.state_dict(), self.out / self.weights_name, metadata=self.weights_metadata)
            about: dict = {"teacher": self.cfg.model.teacher, "steps": self.step}
            # How it samples, which loading reads back: a flow student's pipeline would default to CFG 7.
            about |= (
                {"guidance_scale": 0.0, "sigmas": self.maths.recorded_sigmas()}
                if self.flow
                else {"shift": self.cfg.model.shift}
            )
            with replacing_folder(self.out / "pipeline") as tmp:  # a crash leaves the old pipeline or the new one
                save_pipeline(self.student_pipeline(unet=student, components=self.teacher_modules_as_stored()), tmp)
                (tmp / "nitrofusion.json").write_text(json.dumps(about, indent=1))
        return self.out

    def teacher_modules_as_stored(self) -> dict | None:
        """The teacher's text encoders, VAE (and safety checker) at full precision, re-read from disk,
        where mixed precision cast them to bf16 for training (None otherwise: they are exact). The
        exported pipeline carries the teacher's own weights, not their bf16 rounding."""
        if self.cfg.optim.mixed_precision == "no":
            return None
        return load_frozen_parts(
            resolve_teacher(self.cfg.model.teacher),
            dtype=torch.float32,
            safety_checker=self.cfg.model.safety_checker,
            option="model.teacher",
        )

    def export_stage(self, num_steps: int) -> None:
        """The EMA student as it leaves a refinement stage: the bottom-up refinement's claim
        (training for k+1 steps keeps the k-step quality) is checked against these files."""
        if self.acc.is_main_process:
            path = self.out / "stages" / f"{num_steps}-step" / self.weights_name
            state = merged_state_dict(self.ema.shadow, self.lora_base())
            save_state_dict(state, path, metadata=self.weights_metadata)

    def lora_base(self) -> dict[str, torch.Tensor] | None:
        """The LoRA student's frozen weights at full precision, re-read from disk, where training cast
        them to bf16 (None otherwise: the student's own weights are exact)."""
        if not self.lora_in_half_precision:
            return None
        source = self.cfg.model.student_init or resolve_teacher(self.cfg.model.teacher)
        return unet_state_dict(source, "the base", "transformer" if self.flow else "unet")

    def log_line(self, msg: str) -> None:
        if not self.acc.is_main_process:
            return
        tqdm.write(msg)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(msg + "\n")
