"""Reproduce the embedded world from Fashion-MNIST: VAE, teacher UNet, evaluator.

Stages, each seeded, checkpointed and resumable (`run_dir/<stage>/step-*`):
  vae         AutoencoderKL (x2 downsampling) on the training images, MSE + L1 + tiny KL.
  unet        the teacher, a DDPM (epsilon) UNet on the VAE's latents, prompts from class
              names and templates, 10% of prompts dropped (zeroed) so CFG works, EMA.
  flow        the flow world's teacher: an SD3-architecture transformer, rectified flow on the
              same latents (`train_flow`).
  classifier  the evaluator CNN and the test set's reference feature statistics.
  assemble    diffusers pipelines (StableDiffusionXLPipeline, StableDiffusion3Pipeline; fp16
              weights) and the evaluator file.

The two CLIP text encoders are not trained: they stay at a seeded random init. With 80
short prompts the UNet's cross-attention learns to read the class from any fixed,
injective text features, and frozen encoders let every prompt's embedding be computed
once, which is most of what makes CPU training of the teacher fit in one session.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from tqdm.auto import tqdm

from nitrofusion.errors import UserError
from nitrofusion.evaluation.frechet import GaussianStats
from nitrofusion.evaluation.grid import make_grid
from nitrofusion.models.builders import build_sd3_pipeline, build_sdxl_pipeline
from nitrofusion.pipelines.saving import save_pipeline
from nitrofusion.training import checkpoint
from nitrofusion.training.curves import MetricsLog, try_plot_curves
from nitrofusion.training.ema import EMA
from nitrofusion.userfiles import (
    check_writable_folder,
    folder_lock,
    replacing,
    replacing_folder,
    write_text_replacing,
)
from nitrofusion.world import data
from nitrofusion.world.config import WORLD_STAGES, WorldConfig
from nitrofusion.world.evaluator import Evaluator, FashionClassifier, to_classifier_input
from nitrofusion.world.spec import (
    FLOW_SPEC,
    FLOW_TEACHER_STEPS,
    IMAGE_SIZE,
    TEACHER_STEPS,
    TEXT_ENCODER_SEED,
    WORLD_SPEC,
)


def _log(run_dir: Path, msg: str) -> None:
    tqdm.write(msg)
    with open(run_dir / "log.txt", "a") as f:
        f.write(msg + "\n")


def _resume(
    stage_dir: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None, gen: torch.Generator
) -> int:
    """Load the stage's newest checkpoint, if any, into the modules, the optimizer and the random
    streams (torch's and the stage's data generator), so a resumed stage goes on bit for bit."""
    found = checkpoint.load_latest(stage_dir)
    if found is None:
        return 0
    tensors, meta = found
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    if opt is not None:
        checkpoint.load_optimizer(opt, tensors, meta["optimizer"], "opt")
    checkpoint.set_rng_state(tensors)  # the VAE's posterior samples draw from it (CUDA's on a GPU)
    if "rng.data" in tensors:  # checkpoints written before it was kept: the stream starts again
        gen.set_state(tensors["rng.data"])
    return int(meta["step"])


def _save(
    stage_dir: Path, step: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, gen: torch.Generator
) -> None:
    tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(opt, "opt")
    tensors.update(opt_tensors)
    tensors.update(checkpoint.rng_state())
    tensors["rng.data"] = gen.get_state()
    checkpoint.save(stage_dir, step, tensors, {"optimizer": opt_meta})


def split(cfg: WorldConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's train or test split, or its first `train_images` / `test_images` (the files
    are shuffled: the first few hundred already cover every class)."""
    images, labels = data.load_split(name)
    n = cfg.train_images if name == "train" else cfg.test_images
    return (images[:n], labels[:n]) if n else (images, labels)


class StageLog:
    """A stage's losses, every step, in `<stage>/metrics.jsonl`, drawn as `<stage>/curves.png`."""

    def __init__(self, stage_dir: Path, start: int, panels: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        self.stage_dir, self.panels = stage_dir, panels
        self.metrics = MetricsLog(stage_dir / "metrics.jsonl")
        self.metrics.keep_until(start)  # a resumed stage logs the steps after its checkpoint again

    def record(self, step: int, **values: float) -> None:
        self.metrics.record(step, values)

    def flush(self) -> None:
        """Before each checkpoint: a build killed after it finds every step up to it logged."""
        self.metrics.flush()

    def draw(self, title: str) -> None:
        self.metrics.flush()
        path = self.stage_dir / "curves.png"
        try_plot_curves(self.metrics.read(), path, tqdm.write, title=title, panels=self.panels)


def train_vae(cfg: WorldConfig, run_dir: Path) -> AutoencoderKL:
    stage = run_dir / "vae"
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**WORLD_SPEC.vae_config()).to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = _resume(stage, {"vae": vae}, opt, gen)
    log = StageLog(stage, start, (("VAE reconstruction", ("mse", "l1")), ("KL to N(0, I)", ("kl",))))
    images, _ = split(cfg, "train")
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = data.to_model_range(images[idx]).to(cfg.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse, l1, kl = (rec - x).square().mean(), (rec - x).abs().mean(), post.kl().mean()
        loss = mse + 0.1 * l1 + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        log.record(step + 1, mse=mse.item(), l1=l1.item(), kl=kl.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            log.flush()
            _save(stage, step + 1, {"vae": vae}, opt, gen)
    log.draw("embedded world: VAE")
    return vae.eval()


def load_vae(cfg: WorldConfig) -> AutoencoderKL:
    """`--vae`: a trained `AutoencoderKL` folder (a pipeline's `vae/`, or the pipeline itself), in
    fp32: safetensors only, and its latent scaling factor kept as it was recorded."""
    path, folder = cfg.vae, cfg.vae_folder()
    try:
        recorded = json.loads((folder / "config.json").read_text())
        vae, info = AutoencoderKL.from_pretrained(
            folder, torch_dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"--vae '{path}' could not be loaded: {str(e).splitlines()[0]}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        raise UserError(f"--vae '{path}': its weights do not fit its config (missing or mismatched tensors)")
    shape = (vae.config.latent_channels, len(vae.config.block_out_channels))
    if shape != (WORLD_SPEC.latent_channels, len(WORLD_SPEC.vae_block_out_channels)) or not recorded.get(
        "scaling_factor"
    ):
        raise UserError(
            f"--vae '{path}' is not a VAE of this world's shape (4 latent channels, x2 down-sampling, a scaling factor)"
        )
    return vae.to(cfg.device).eval()


@torch.no_grad()
def vae_report(vae: AutoencoderKL, cfg: WorldConfig) -> dict[str, float]:
    """Reconstruction PSNR on (up to 2,000 of) the test images and the latent scaling factor (1 / latent std)."""
    images, _ = split(cfg, "test")
    x = data.to_model_range(images[:2000]).to(cfg.device)
    mse, latents = [], []
    for chunk in x.split(250):
        z = vae.encode(chunk).latent_dist.mode()
        latents.append(z)
        mse.append((vae.decode(z).sample.clamp(-1, 1) - chunk).square().mean(dim=(1, 2, 3)))
    mse_t = torch.cat(mse) / 4.0  # [-1,1] -> [0,1] range
    psnr = (10 * torch.log10(1.0 / mse_t.clamp_min(1e-10))).mean().item()
    return {"test_psnr_db": psnr, "latent_std": torch.cat(latents).std().item()}


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in tqdm(images.split(500), desc="encode latents"):
        dist = vae.encode(data.to_model_range(chunk).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


class TeacherStage:
    """A teacher's (UNet or flow) training: the network (built under `seeds[0]`), its EMA, AdamW
    (weight decay 0.01), the stage's data stream (`gen`, seeded `seeds[1]`), all resumed from the
    stage's newest checkpoint; `bar` iterates the steps left, `update` applies each step's loss."""

    def __init__(
        self,
        stage_dir: Path,
        build: Callable[[], torch.nn.Module],
        cfg: WorldConfig,
        seeds: tuple[int, int],
        lr: float,
        total: int,
        loss_panel: str,
        desc: str,
    ) -> None:
        self.stage_dir, self.total, self.checkpoint_every = stage_dir, total, cfg.checkpoint_every
        torch.manual_seed(seeds[0])
        self.model = build().to(cfg.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(seeds[1])
        self.modules = {stage_dir.name: self.model, "ema": self.ema}
        self.start = _resume(stage_dir, self.modules, self.opt, self.gen)
        self.log = StageLog(stage_dir, self.start, ((loss_panel, ("loss",)), ("learning rate", ("lr",))))
        self.bar = tqdm(range(self.start, total), initial=self.start, total=total, desc=desc)
        self.model.train()

    def update(self, done: int, loss: torch.Tensor, lr: float) -> None:
        """After the `done`-th loss: AdamW at `lr`, gradients clipped to norm 1, the EMA, the step's
        log line and, every `checkpoint_every` steps and at the last, a checkpoint."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.model)
        self.bar.set_postfix(loss=f"{loss.item():.4f}")
        self.log.record(done, loss=loss.item(), lr=lr)
        if done % self.checkpoint_every == 0 or done == self.total:
            self.log.flush()
            _save(self.stage_dir, done, self.modules, self.opt, self.gen)
            _log(self.stage_dir.parent, f"{self.stage_dir.name} step {done} loss {loss.item():.4f}")

    def finish(self, title: str) -> torch.nn.Module:
        """The curves drawn; the network, with its EMA weights, in eval mode."""
        self.log.draw(title)
        self.ema.copy_to(self.model)
        return self.model.eval()


def train_unet(cfg: WorldConfig, run_dir: Path, vae: AutoencoderKL, scaling: float) -> UNet2DConditionModel:
    stage = run_dir / "unet"
    pipe = build_sdxl_pipeline(WORLD_SPEC, seed=TEXT_ENCODER_SEED)
    prompts = data.all_prompts()
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            [p for p, _ in prompts], device="cpu", do_classifier_free_guidance=False
        )
    # prompt index per class: class c uses rows c*T .. c*T+T-1
    per_class = len(data.TEMPLATES)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)

    images, labels = split(cfg, "train")
    lat_mean, lat_std = encode_dataset(vae, images, cfg.device)

    run = TeacherStage(
        stage,
        lambda: UNet2DConditionModel(**WORLD_SPEC.unet_config()),
        cfg,
        (cfg.seed + 1, cfg.seed + 2),
        cfg.unet_lr,
        cfg.unet_steps,
        "teacher: epsilon MSE",
        "teacher unet",
    )
    unet, gen = run.model, run.gen
    sched = pipe.scheduler
    abar = sched.alphas_cumprod.to(cfg.device)
    for step in run.bar:
        idx = torch.randint(0, len(images), (cfg.unet_batch,), generator=gen)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        flip = torch.rand(cfg.unet_batch, generator=gen) < 0.5
        z = torch.where(flip[:, None, None, None], z.flip(-1), z) * scaling
        rows = labels[idx] * per_class + torch.randint(0, per_class, (cfg.unet_batch,), generator=gen)
        keep = (torch.rand(cfg.unet_batch, generator=gen) >= cfg.cond_dropout).float()
        cond = embeds[rows] * keep[:, None, None]
        pool = pooled[rows] * keep[:, None]
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        z, cond, pool, t, noise = (v.to(cfg.device) for v in (z, cond, pool, t, noise))
        a = abar[t][:, None, None, None]
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(
            zt, t, cond, added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(len(t), -1).to(cfg.device)}
        ).sample
        loss = (pred - noise).square().mean()
        run.update(step + 1, loss, cfg.unet_lr * min(1.0, (step + 1) / cfg.unet_warmup))
    return run.finish("embedded world: teacher UNet")


def train_flow(cfg: WorldConfig, run_dir: Path, vae: AutoencoderKL, scaling: float) -> SD3Transformer2DModel:
    """The flow world's teacher: SD3's rectified flow on the same latents. x_t = (1 - σ) x0 + σ ε
    with σ drawn logit-normal (SD3's choice: most of the steps where the velocity is hardest),
    the transformer predicts v = ε - x0. Dropped prompts become the empty prompt's encoding,
    which is what SD3's pipeline sends as the negative for CFG. Flips are made in pixel space
    before encoding (both sets of latents are encoded once): flipping latents would teach the
    VAE's decoder images it never saw (docs/world.md, the FD floor)."""
    stage = run_dir / "flow"
    pipe = build_sd3_pipeline(FLOW_SPEC, seed=TEXT_ENCODER_SEED)
    prompts = [p for p, _ in data.all_prompts()] + [""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    per_class, empty = len(data.TEMPLATES), len(prompts) - 1

    images, labels = split(cfg, "train")
    lat_mean, lat_std = encode_dataset(vae, images, cfg.device)
    flip_mean, flip_std = encode_dataset(vae, images.flip(-1), cfg.device)

    run = TeacherStage(
        stage,
        lambda: SD3Transformer2DModel(**FLOW_SPEC.transformer_config()),
        cfg,
        (cfg.seed + 5, cfg.seed + 6),
        cfg.flow_lr,
        cfg.flow_steps,
        "flow teacher: velocity MSE",
        "flow teacher",
    )
    model, gen = run.model, run.gen
    for step in run.bar:
        idx = torch.randint(0, len(images), (cfg.flow_batch,), generator=gen)
        flip = (torch.rand(cfg.flow_batch, generator=gen) < 0.5)[:, None, None, None]
        mean = torch.where(flip, flip_mean[idx], lat_mean[idx])
        std = torch.where(flip, flip_std[idx], lat_std[idx])
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        rows = labels[idx] * per_class + torch.randint(0, per_class, (cfg.flow_batch,), generator=gen)
        rows = torch.where(torch.rand(cfg.flow_batch, generator=gen) < cfg.cond_dropout, empty, rows)
        sigma = torch.sigmoid(torch.randn(cfg.flow_batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        x0, noise, sigma = (v.to(cfg.device) for v in (x0, noise, sigma))
        s = sigma[:, None, None, None]
        pred = model(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds[rows].to(cfg.device),
            pooled_projections=pooled[rows].to(cfg.device),
        ).sample
        loss = (pred - (noise - x0)).square().mean()
        run.update(step + 1, loss, cfg.flow_lr * min(1.0, (step + 1) / cfg.flow_warmup))
    return run.finish("embedded world: flow teacher (SD3 architecture)")


def train_classifier(cfg: WorldConfig, run_dir: Path) -> tuple[Evaluator, float]:
    stage = run_dir / "classifier"
    torch.manual_seed(cfg.seed + 3)
    model = FashionClassifier().to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = split(cfg, "train")
    steps_per_epoch = math.ceil(len(images) / cfg.classifier_batch)
    total = cfg.classifier_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    perms = [torch.randperm(len(images), generator=gen) for _ in range(cfg.classifier_epochs)]
    start = _resume(stage, {"model": model}, opt, gen)
    log = StageLog(stage, start, (("evaluator: cross-entropy", ("loss",)),))
    bar = tqdm(range(start, total), initial=start, total=total, desc="evaluator cnn")
    model.train()
    for step in bar:
        epoch, i = divmod(step, steps_per_epoch)
        idx = perms[epoch][i * cfg.classifier_batch : (i + 1) * cfg.classifier_batch]
        x = to_classifier_input(data.to_model_range(images[idx])).to(cfg.device)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None].to(cfg.device), x.flip(-1), x)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx].to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.record(step + 1, loss=loss.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            log.flush()
            _save(stage, step + 1, {"model": model}, opt, gen)
    log.draw("embedded world: evaluator CNN")
    model.eval()
    test_x, test_y = split(cfg, "test")
    x = data.to_model_range(test_x)
    probe = Evaluator(model.cpu(), GaussianStats(mu=None, sigma=None, n=0))  # type: ignore[arg-type]
    feats, logits = probe.features_and_logits(x)
    acc = (logits.argmax(1) == test_y).float().mean().item()
    _log(run_dir, f"evaluator test accuracy {acc:.4f}")
    return Evaluator(model.cpu(), GaussianStats.from_features(feats)), acc


def write_pipeline(pipe: Any, dest: Path, about: dict | None = None) -> None:
    """A world's pipeline in fp16 (and `about` as its nitrofusion.json), swapped in whole
    (`replacing_folder`): a build stopped while writing leaves the old folder or the new one."""
    with replacing_folder(dest) as tmp:
        save_pipeline(pipe.to(torch.float16), tmp)
        if about is not None:
            (tmp / "nitrofusion.json").write_text(json.dumps(about, indent=1))


def draw_samples(teacher_dir: Path, path: Path, per_class: int = 8, device: str = "cpu") -> Path:
    """The teacher as it was written (fp16 weights, loaded back): a row per class, at the Euler step
    count its folder records, with CFG 5, image i (row by row) from seed i. One batch: a tenth of
    the time of ten."""
    from nitrofusion.pipelines import generate, load_pipeline
    from nitrofusion.pipelines.generation import default_steps

    pipe = load_pipeline(teacher_dir, sampler="native", device=device, dtype=torch.float32)
    steps = default_steps(pipe)
    classes = range(len(data.CLASS_NAMES))
    prompts = [data.prompt_for(label) for label in classes for _ in range(per_class)]
    drawn = generate(pipe, prompts, steps=steps, batch_size=len(prompts), guidance_scale=5.0, progress=False)
    images = [r.image for r in drawn]
    rows = [images[c * per_class : (c + 1) * per_class] for c in classes]
    labels = list(data.CLASS_NAMES)
    with replacing(path) as tmp:
        make_grid(rows, labels, scale=2).save(tmp, format="PNG")
    return path


def build_world(cfg: WorldConfig, run_dir: str | Path, out_dir: str | Path, stages: list[str]) -> dict:
    """Run the requested stages and assemble the pipeline + evaluator into out_dir, one build at a
    time in run_dir."""
    run_dir = check_writable_folder(run_dir, "--run-dir")
    out_dir = check_writable_folder(out_dir, "--out")  # before hours of training, not after
    with folder_lock(run_dir, "--run-dir"):
        return _build_world(cfg, run_dir, out_dir, stages)


def _build_world(cfg: WorldConfig, run_dir: Path, out_dir: Path, stages: list[str]) -> dict:
    # A run directory resumes its stages' checkpoints: under other settings they would be mixed in.
    recorded = run_dir / "config.json"
    trained = any(checkpoint.list_checkpoints(run_dir / stage) for stage in ("vae", *WORLD_STAGES))
    if recorded.is_file() and trained:  # settings with nothing trained under them (a failed start) bind nothing
        try:
            before = json.loads(recorded.read_text())
        except ValueError:
            before = None
        free = {"device", "checkpoint_every", "samples_per_class"}  # how it runs and reports, not what it trains
        defaults = asdict(WorldConfig())  # a key an older run did not record had its default then
        changed = sorted(
            k
            for k, v in asdict(cfg).items()
            if k not in free and (not isinstance(before, dict) or before.get(k, defaults[k]) != v)
        )
        if changed:
            raise UserError(
                f"--run-dir '{run_dir}' holds a run with other settings ({', '.join(changed)}): "
                "resume it with its own, or give a new --run-dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_replacing(recorded, json.dumps(asdict(cfg), indent=1))
    report: dict = {}
    try:  # a build of other stages in the same run folder: its numbers are kept, its stages' replaced
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        pass
    report = report if isinstance(report, dict) else {}
    report |= {"config": asdict(cfg), "machine": platform.platform(), "torch_threads": torch.get_num_threads()}
    t0 = time.time()
    if cfg.vae:  # an already trained one (the shipped world's), so that two worlds share their latents
        vae = load_vae(cfg)
        report["vae"] = vae_report(vae, cfg)
        scaling = vae.config.scaling_factor
    else:
        vae = train_vae(cfg, run_dir)
        report["vae"] = vae_report(vae, cfg)
        scaling = 1.0 / report["vae"]["latent_std"]
        vae.register_to_config(scaling_factor=scaling)
    report["vae"]["scaling_factor"] = scaling
    _log(run_dir, f"vae {report['vae']}")
    report["vae_seconds"] = time.time() - t0
    if "unet" in stages:
        t1 = time.time()
        unet = train_unet(cfg, run_dir, vae, scaling)
        report["unet_seconds"] = time.time() - t1
        pipe = build_sdxl_pipeline(WORLD_SPEC, seed=TEXT_ENCODER_SEED)
        pipe.register_modules(vae=copy.deepcopy(vae).cpu(), unet=unet.cpu())  # a copy: the flow stage encodes in fp32
        write_pipeline(pipe, out_dir / "teacher", about={"num_inference_steps": TEACHER_STEPS})
        if cfg.samples_per_class:
            samples = draw_samples(out_dir / "teacher", run_dir / "samples.png", cfg.samples_per_class, cfg.device)
            report["samples"] = str(samples)
    if "flow" in stages:
        t3 = time.time()
        flow = train_flow(cfg, run_dir, vae, scaling)
        report["flow_seconds"] = time.time() - t3
        # Its text encoders and scheduler; FLOW_SPEC's own VAE is replaced by the world's (the pipeline
        # object keeps SD3's VAE factor 8 until it is written and loaded back).
        pipe = build_sd3_pipeline(FLOW_SPEC, seed=TEXT_ENCODER_SEED)
        flow_vae = copy.deepcopy(vae).cpu()
        flow_vae.register_to_config(shift_factor=0.0)  # SD3's decode adds a latent shift: none here
        pipe.register_modules(vae=flow_vae, transformer=flow.cpu())
        # The guidance both worlds' teachers sample with; SD3's pipeline would default to 7.
        about = {"guidance_scale": 5.0, "num_inference_steps": FLOW_TEACHER_STEPS}
        write_pipeline(pipe, out_dir / "flow-teacher", about=about)
        if cfg.samples_per_class:
            samples = draw_samples(
                out_dir / "flow-teacher", run_dir / "flow-samples.png", cfg.samples_per_class, cfg.device
            )
            report["flow_samples"] = str(samples)
    if "classifier" in stages:
        t2 = time.time()
        evaluator, acc = train_classifier(cfg, run_dir)
        report["evaluator_test_accuracy"] = acc
        report["classifier_seconds"] = time.time() - t2
        out_dir.mkdir(parents=True, exist_ok=True)
        evaluator.save(out_dir / "evaluator.safetensors")
    report["total_seconds"] = time.time() - t0
    write_text_replacing(run_dir / "report.json", json.dumps(report, indent=1))
    return report
