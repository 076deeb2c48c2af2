"""`nitrofusion evaluate`: generate (cached, resumable), score, and report in the layout of
the paper's Table 1 (model, steps, CLIP score, FID, aesthetic score, ImageReward), plus the
embedded world's own columns (class accuracy, domain FD) when its prompts are used.

Every metric's weights are loaded before the first image is generated, so a missing file
fails in a second, not after an hour of sampling.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from nitrofusion.errors import UserError, check_guidance_scale
from nitrofusion.evaluation.cache import ImageCache
from nitrofusion.evaluation.frechet import GaussianStats, frechet_distance
from nitrofusion.evaluation.grid import make_grid
from nitrofusion.userfiles import check_writable_folder, read_user_text, replacing, write_text_replacing

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

METRICS = ("embedded", "fid", "clip", "aesthetic", "imagereward")
FID_FEATURES = ("inception", "clip", "embedded")
DISTILLED_STEPS = (1, 2, 4)  # the rows a distilled model is scored at by default
# Images sampled at once by default, by their pixels: the VAE decodes a whole batch at once, in fp32,
# several GiB of activations per image at 1024² (SDXL: 4 at once, SD1.5 at 512²: 16; the embedded world 100).
BATCH_PIXELS, MAX_BATCH = 4 * 1024 * 1024, 100
# (result key, column title, digits) in the order of the paper's Table 1, then the embedded world's.
COLUMNS = (
    ("clip_score", "CLIP score ↑", 3),
    ("fid", "FID ↓", 2),
    ("aesthetic", "aesthetic ↑", 3),
    ("image_reward", "ImageReward ↑", 3),
    ("class_accuracy", "class accuracy ↑", 3),
    ("domain_fd", "domain FD ↓", 1),
    ("seconds_per_image", "s / image", 4),
)


@dataclass
class EvalRequest:
    model: str
    steps: list[int] | None  # None: 1, 2 and 4 for a distilled model, else its pipeline's own default
    out: Path
    prompts: str = "embedded"
    n: int = 1000
    seed: int = 0
    unet: str | None = None
    lora: str | None = None  # a LoRA fused into the model (load_pipeline's `lora`)
    shift: int | None = None
    sampler: str = "auto"
    guidance_scale: float | None = None
    batch_size: int | None = None  # None: default_batch_size(pipe)
    device: str | None = None
    dtype: str = "auto"  # the model's: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16
    label: str | None = None
    metrics: list[str] | None = None  # None: the embedded metrics for embedded prompts, else Table 1's
    fid_features: str = "inception"
    fid_resize: str | None = None  # Inception FID's resize (fid.FID_RESIZES); None: fid.DEFAULT_FID_RESIZE
    reference: str | None = None
    inception: str | None = None
    clip_model: str | None = None  # CLIP score and CLIP-FID (the paper: ViT-B/32)
    aesthetic: str | None = None
    aesthetic_clip_model: str | None = None  # the aesthetic MLP's CLIP (ViT-L/14); None: clip_model
    image_reward: str | None = None
    image_reward_tokenizer: str | None = None
    evaluator: str | None = None
    grid_images: int = 10
    safety_checker: bool = True  # False: a pipeline's safety checker is left out (no blacked-out images)


def prompt_set_identity(spec: str) -> str:
    """Which prompts a run draws from, whatever its --n and seed: `embedded`, or a file's prompts by
    their digest (the file's path says nothing: the same file elsewhere, another file of one name)."""
    if spec == "embedded":
        return "embedded"
    from nitrofusion.data.prompts import load_prompts
    from nitrofusion.data.teacher import prompts_digest

    return "sha256:" + prompts_digest(load_prompts(spec))


def load_prompt_set(spec: str, n: int, seed: int) -> tuple[list[str], list[int] | None, str | None]:
    """`embedded` (balanced over the ten classes, with labels) or a text file, cycled to n prompts;
    and a warning where a file holds fewer than n (its prompts then repeat, and every metric that
    reads the prompts measures fewer distinct ones than --n says)."""
    if spec == "embedded":
        from nitrofusion.world.data import evaluation_prompts

        pairs = evaluation_prompts(n, seed)
        return [p for p, _ in pairs], [c for _, c in pairs], None
    from nitrofusion.data.prompts import load_prompts

    prompts = load_prompts(spec)
    warning = None
    if len(prompts) < n:
        warning = (
            f"'{spec}' holds {len(prompts)} prompts, fewer than --n {n}: they are cycled, "
            f"so each is drawn about {n / len(prompts):.1f} times (with other seeds)"
        )
    return [prompts[i % len(prompts)] for i in range(n)], None, warning


Scorer = Callable[[list[Image.Image], list[str], list[int] | None], dict[str, float]]


class Scorers(dict[str, Scorer]):
    """The scorers by metric, and the feature width of each Frechet distance among them."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_dims: dict[str, int] = {}
        self.warnings: list[str] = []  # printed once every option is accepted
        # Each metric's networks by their contents (`fid.weights_identity`), for the rows: other
        # weights at the same path give other numbers, which `compare` keeps out of one table.
        self.weights: dict[str, str] = {}
        # The slow parts (a reference folder's features: minutes for COCO on a CPU), left until the
        # model and its step counts are accepted too, so that a refused run has computed nothing.
        self.slow: list[Callable[[], object]] = []

    def prepare(self) -> None:
        for step in self.slow:
            step()


def build_scorers(req: EvalRequest, device: str) -> Scorers:
    """Load every requested metric's model now; each missing weight is one clear error. A reference
    folder's features wait for `Scorers.prepare`."""
    metrics = req.metrics or (
        ["embedded"] if req.prompts == "embedded" else ["fid", "clip", "aesthetic", "imagereward"]
    )
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric '{unknown[0]}' (choose from {', '.join(METRICS)})")
    if req.fid_features not in FID_FEATURES:
        raise UserError(f"--fid-features must be one of {', '.join(FID_FEATURES)}")
    # An option for a metric not measured would be accepted and change nothing. Options left out are
    # None (--fid-features: its default, inception), so a default is never refused.
    fid, features = "fid" in metrics, req.fid_features
    aesthetic = "aesthetic" in metrics
    for option, value, used, what in (
        ("--reference", req.reference, fid, "the fid metric"),
        ("--inception", req.inception, fid, "the fid metric"),
        ("--fid-resize", req.fid_resize, fid, "the fid metric"),
        ("--fid-features", None if features == "inception" else features, fid, "the fid metric"),
        ("--aesthetic", req.aesthetic, aesthetic, "the aesthetic metric"),
        ("--aesthetic-clip-model", req.aesthetic_clip_model, aesthetic, "the aesthetic metric"),
        ("--image-reward", req.image_reward, "imagereward" in metrics, "the imagereward metric"),
        ("--image-reward-tokenizer", req.image_reward_tokenizer, "imagereward" in metrics, "the imagereward metric"),
        (
            "--clip-model",
            req.clip_model,
            "clip" in metrics or (fid and features == "clip") or (aesthetic and req.aesthetic_clip_model is None),
            "the clip metric, CLIP-FID (--fid-features clip) and an aesthetic score without --aesthetic-clip-model",
        ),
        (
            "--evaluator",
            req.evaluator,
            "embedded" in metrics or (fid and features == "embedded"),
            "the embedded metrics and FID with --fid-features embedded",
        ),
    ):
        if value is not None and not used:
            raise UserError(f"{option} is for {what}, which this run does not measure (--metrics {' '.join(metrics)})")
    if req.inception is not None and req.fid_features != "inception":
        raise UserError(f"--inception is for --fid-features inception, not {req.fid_features}")
    if req.fid_resize is not None:
        from nitrofusion.evaluation.fid import FID_RESIZES

        if req.fid_features != "inception":
            raise UserError(
                f"--fid-resize is for --fid-features inception, not {req.fid_features} "
                "(whose images are prepared one fixed way)"
            )
        if req.fid_resize not in FID_RESIZES:
            raise UserError(f"--fid-resize must be one of {', '.join(FID_RESIZES)}, got {req.fid_resize!r}")
    from nitrofusion.evaluation.fid import weights_identity

    scorers = Scorers()
    evaluator = None

    def evaluator_file() -> Path:
        from nitrofusion.world.spec import evaluator_path

        return Path(req.evaluator).expanduser() if req.evaluator else evaluator_path()

    def need_evaluator():
        nonlocal evaluator
        if evaluator is None:
            from nitrofusion.world.evaluator import Evaluator

            path = evaluator_file()
            if not path.is_file():
                raise UserError(
                    f"evaluator weights '{path}' not found; --evaluator must point at evaluator.safetensors"
                )
            evaluator = Evaluator.load(path)
        return evaluator

    clips: dict[str, object] = {}

    def need_clip(path: str | None = None, option: str = "--clip-model"):
        aesthetic_only = option == "--aesthetic-clip-model"  # which may fall back to --clip-model
        if not path:
            path, option = req.clip_model, "--clip-model"
        if path not in clips:  # one model however many metrics read it
            from nitrofusion.evaluation.clip import CLIP_HINT, ClipModel

            if not path and aesthetic_only:
                raise UserError(
                    f"the aesthetic score needs --aesthetic-clip-model (or --clip-model, shared with the CLIP "
                    f"score): {CLIP_HINT}"
                )
            if not path:
                raise UserError(f"CLIP score and CLIP-FID need --clip-model: {CLIP_HINT}")
            clips[path] = ClipModel(path, device, option=option)
        return clips[path]

    if "embedded" in metrics:
        if req.prompts != "embedded":
            raise UserError("the embedded metrics (class accuracy, domain FD) need --prompts embedded")
        from nitrofusion.world.evaluator import FEATURE_DIM

        ev = need_evaluator()
        scorers.feature_dims["domain FD"] = FEATURE_DIM
        scorers.weights["evaluator_weights"] = weights_identity(evaluator_file())

        def embedded(images, prompts, labels):
            from nitrofusion.evaluation.fid import to_tensor

            return ev.score(to_tensor(images), torch.tensor(labels))

        scorers["embedded"] = embedded

    if "fid" in metrics:
        from nitrofusion.evaluation import fid

        if req.fid_features == "inception":
            from nitrofusion.evaluation.inception import FEATURE_DIM as INCEPTION_DIM

            if not req.inception:
                from nitrofusion.evaluation.inception import CONVERT_HINT, WEIGHTS_URL

                raise UserError(
                    f"FID with Inception features needs --inception PATH: the FID Inception weights ({WEIGHTS_URL}) "
                    f"converted to safetensors with: {CONVERT_HINT}"
                )
            extract = fid.inception_extractor(req.inception, device, resize=fid_resize(req))
            weights = Path(req.inception)
            fid_dim = INCEPTION_DIM
        elif req.fid_features == "clip":
            clip = need_clip()
            extract, weights = fid.clip_extractor(clip), Path(str(req.clip_model))
            fid_dim = int(clip.model.config.projection_dim)
        else:
            from nitrofusion.world.evaluator import FEATURE_DIM

            extract, weights, fid_dim = fid.embedded_extractor(need_evaluator()), evaluator_file(), FEATURE_DIM
        scorers.feature_dims["FID"] = fid_dim
        scorers.weights["fid_weights"] = weights_identity(weights)
        if req.reference:
            # The feature network by its contents, not its path: other weights at the same path
            # (another evaluator, a re-downloaded CLIP) give other features and other statistics.
            extractor, extractor_file = scorers.weights["fid_weights"], str(weights.expanduser().resolve())
            # Inception's resize is in the provenance: statistics made with another are not reused. Each
            # resize has a file of its own (the default keeps the name it always had), so going back to
            # one does not compute a COCO reference's features again.
            resize = fid_resize(req) or fid.DEFAULT_FID_RESIZE
            mode = f"-{resize}" if resize != fid.DEFAULT_FID_RESIZE else ""
            cache = req.out / f"reference-{req.fid_features}{mode}.safetensors"
            source = str(req.reference)

            @functools.cache
            def reference() -> GaussianStats:
                ref = fid.cached_reference_stats(cache, source, features, extractor, resize)
                if ref is None:
                    ref = fid.reference_stats(source, features, extract, cache, extractor, extractor_file, resize)
                return ref

            if Path(source).expanduser().is_dir():
                # A folder without images is said now; its features later.
                reference_count = len(fid.reference_images(source))
                scorers.slow.append(reference)
            else:
                reference_count = reference().n  # a statistics file: read and checked now (a missing one is said here)
            if reference_count < fid_dim:  # the same bias as too few samples, on the reference's side
                scorers.warnings.append(
                    f"the FID reference holds {reference_count} images of {fid_dim}-d features: its covariance "
                    f"has rank at most {reference_count - 1}, so the distance is biased (use a reference of "
                    f"{fid_dim} images or more for a number to compare)"
                )
        elif req.fid_features == "embedded":
            embedded_reference = need_evaluator().reference  # the real Fashion-MNIST test set

            def reference() -> GaussianStats:
                return embedded_reference
        else:
            raise UserError("FID needs --reference: a directory of real images or a stats .safetensors file")

        def fid_score(images, prompts, labels):
            return {"fid": frechet_distance(GaussianStats.from_features(extract(images)), reference())}

        scorers["fid"] = fid_score

    if "clip" in metrics:
        from nitrofusion.evaluation.clip import clip_score

        model = need_clip()
        scorers.weights["clip_weights"] = weights_identity(req.clip_model)
        scorers["clip"] = lambda images, prompts, labels: {"clip_score": clip_score(model, images, prompts)}

    if "aesthetic" in metrics:
        from nitrofusion.evaluation.aesthetic import (
            AESTHETIC_HINT,
            aesthetic_score,
            check_fits,
            load_aesthetic,
            unlike_vit_l14,
        )

        if not req.aesthetic:
            raise UserError(f"the aesthetic score needs --aesthetic PATH: {AESTHETIC_HINT}")
        mlp, model = load_aesthetic(req.aesthetic), need_clip(req.aesthetic_clip_model, "--aesthetic-clip-model")
        check_fits(mlp, model)
        scorers.warnings += filter(None, [unlike_vit_l14(model)])
        scorers.weights["aesthetic_weights"] = weights_identity(req.aesthetic)
        scorers.weights["aesthetic_clip_weights"] = weights_identity(req.aesthetic_clip_model or req.clip_model)
        scorers["aesthetic"] = lambda images, prompts, labels: {"aesthetic": aesthetic_score(mlp, model, images)}

    if "imagereward" in metrics:
        from nitrofusion.evaluation.image_reward import CONVERT_HINT as IR_HINT
        from nitrofusion.evaluation.image_reward import ImageRewardScorer

        if not req.image_reward or not req.image_reward_tokenizer:
            raise UserError(f"ImageReward needs --image-reward PATH and --image-reward-tokenizer DIR: {IR_HINT}")
        reward = ImageRewardScorer.load(req.image_reward, req.image_reward_tokenizer, device=device)
        scorers.weights["image_reward_weights"] = weights_identity(req.image_reward)
        scorers["imagereward"] = lambda images, prompts, labels: {
            "image_reward": float(reward.score(images, prompts).mean())
        }
    return scorers


def fid_resize(req: EvalRequest) -> str | None:
    """The resize of an Inception FID (the default where none was asked for); None for other features."""
    from nitrofusion.evaluation.fid import DEFAULT_FID_RESIZE

    return (req.fid_resize or DEFAULT_FID_RESIZE) if req.fid_features == "inception" else None


def default_batch_size(pipe: DiffusionPipeline) -> int:
    from nitrofusion.pipelines.generation import default_size

    return max(1, min(MAX_BATCH, BATCH_PIXELS // default_size(pipe) ** 2))


def evaluate(req: EvalRequest) -> list[dict]:
    from nitrofusion.data.teacher import prompts_digest
    from nitrofusion.pipelines import load_pipeline
    from nitrofusion.pipelines.adapters import check_lora_option
    from nitrofusion.pipelines.generation import (
        check_request,
        check_seeds,
        default_guidance,
        default_size,
        default_steps,
        denoiser,
        is_distilled,
        sampling_sigmas,
    )
    from nitrofusion.pipelines.loading import check_model_index, resolve_device, resolve_dtype, resolve_model

    if req.n < 2:
        raise UserError(f"--n must be at least 2 (a covariance needs two samples), got {req.n}")
    # Image i's seed is seed + i: every one must fit, or the cache's manifest would record a seed
    # that fails at the first image (and refuse the corrected rerun as other settings).
    check_seeds(req.seed, req.n)
    # Every option before anything is loaded or made: a refused run leaves nothing behind.
    if req.batch_size is not None and req.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {req.batch_size}")
    if req.steps is not None and (not req.steps or min(req.steps) < 1 or len(set(req.steps)) != len(req.steps)):
        raise UserError(f"--steps must be distinct step counts of at least 1, got {req.steps}")
    check_guidance_scale(req.guidance_scale)
    req.out = check_writable_folder(req.out, "--out")  # "" is refused, not taken as the working directory
    device = resolve_device(req.device)
    resolve_dtype(req.dtype, device)  # a bad --dtype is said before any metric's model loads
    check_lora_option(req.lora, req.unet)  # before the metrics' models load
    prompts, labels, prompts_warning = load_prompt_set(req.prompts, req.n, req.seed)
    prompts_sha256 = prompts_digest(prompts)
    prompt_set = prompt_set_identity(req.prompts)
    # A model that is not there is said before the metrics' reference features are computed (minutes
    # for a COCO reference on a CPU); load_pipeline checks the rest after them.
    check_model_index(resolve_model(req.model, unet_weights=req.unet is None, allow_flow=True))
    scorers = build_scorers(req, device)
    # Warnings, not refusals (the embedded world is evaluated on a few images on purpose, in tests and
    # quick looks), and only once every option is accepted: a refused run stays one line.
    warnings = ([prompts_warning] if prompts_warning else []) + scorers.warnings
    warnings += [
        f"{name} over {req.n} images of {dim}-d features: their covariance has rank at most {req.n - 1}, "
        f"so the distance is biased (use --n {dim} or more for a number to compare)"
        for name, dim in scorers.feature_dims.items()
        if req.n < dim
    ]
    pipe = load_pipeline(
        req.model,
        unet=req.unet,
        shift=req.shift,
        sampler=req.sampler,
        device=device,
        dtype=req.dtype,
        safety_checker=req.safety_checker,
        lora=req.lora,
    )
    if req.steps is None:
        req.steps = list(DISTILLED_STEPS) if is_distilled(pipe) else [default_steps(pipe)]
    batch_size = default_batch_size(pipe) if req.batch_size is None else req.batch_size
    for steps in req.steps:  # all of them before the first is sampled
        check_request(pipe, steps, default_size(pipe), default_size(pipe))
    pipe.set_progress_bar_config(disable=True)
    sampler = pipe.nitro_sampler
    label = req.label or Path(str(req.model)).name
    unfiltered = getattr(pipe, "nitro_unfiltered", False)
    if unfiltered:  # otherwise the same model's rows look alike in the tables
        label += " (unfiltered)"
    results, grid_rows = [], []
    weights = next(denoiser(pipe).parameters())  # the UNet, or an SD3 pipeline's transformer
    guidance = req.guidance_scale if req.guidance_scale is not None else default_guidance(sampler, pipe)
    caches = []
    for steps in req.steps:
        settings = {
            "model": str(req.model),
            "unet": req.unet,
            "shift": int(pipe.scheduler.config.shifted_timestep) if sampler == "shift-lcm" else None,
            "sampler": sampler,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": req.seed,
            "prompts": req.prompts,
            # The prompts themselves (the embedded set's order depends on n) and the UNet file's identity:
            # a changed file at the same path must not be served from images of the old one.
            "prompts_sha256": prompts_sha256,
            "unet_file": _file_identity(req.unet),
            # A seed's noise differs between CPU and CUDA generators, and the precision rounds
            # differently: a cache resumed on another device or dtype would mix two samplings.
            "device": weights.device.type,
            "dtype": str(weights.dtype).removeprefix("torch."),
        }
        if unfiltered:  # other images than the filtered ones: the cache refuses to mix them
            settings["safety_checker"] = False
        folder = getattr(pipe, "nitro_folder", None)
        if folder is not None:  # a retrained or rebuilt model at the same path is another model
            settings["model_files"] = _weights_identity(Path(folder))
        if req.lora is not None:  # only where set: older caches stay valid
            settings["lora"], settings["lora_file"] = pipe.nitro_lora, _file_identity(pipe.nitro_lora)
        levels = sampling_sigmas(pipe, steps)
        if levels is not None:  # a flow student's recorded levels (only where set: older caches stay valid)
            settings["sigmas"] = levels
        cache = ImageCache(req.out / "images" / f"{sampler}-{steps}-step", settings)
        cache.check()  # every setting's cache before the first is sampled
        caches.append((steps, settings, cache))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    scorers.prepare()
    # Made once the reference features are in (a damaged reference image is refused there): a refused
    # run leaves no folder behind.
    req.out.mkdir(parents=True, exist_ok=True)
    for steps, settings, cache in caches:
        images, per_image = cache.fill(
            pipe, prompts, steps, req.seed, batch_size, guidance, desc=f"{label}, {steps} step(s)"
        )
        row = {
            **settings,
            "prompt_set": prompt_set,
            "model_path": settings["model"],
            "model": label,
            "n": req.n,
            "distinct_prompts": len(set(prompts)),  # below n where a prompt file was cycled
            "seconds_per_image": per_image,
        }
        # Inception, CLIP and ImageReward over thousands of images take minutes: say which runs.
        with tqdm(scorers.items(), desc=f"scoring {steps} step(s)", unit="metric", leave=False) as bar:
            for name, scorer in bar:
                bar.set_postfix_str(name)
                row.update({k: v for k, v in scorer(images, prompts, labels).items() if k != "n"})
        # What the numbers were measured with: `compare` refuses to put other protocols side by side.
        if "fid" in scorers:
            row.update(fid_features=req.fid_features, fid_reference=req.reference)
            if req.fid_features == "inception":  # other features have one preparation (fid.PREPROCESS)
                row["fid_resize"] = fid_resize(req)
        if "clip" in scorers or ("fid" in scorers and req.fid_features == "clip"):
            row["clip_model"] = req.clip_model
        if "aesthetic" in scorers:
            row["aesthetic_clip_model"] = req.aesthetic_clip_model or req.clip_model
        row.update(scorers.weights)
        results.append(row)
        grid_rows.append(images[: req.grid_images])
        print(table([row]).splitlines()[-1], flush=True)
    write_report(req.out, results, grid_rows, [f"{r['sampler']}, {r['steps']} step(s)" for r in results])
    return results


def _weights_identity(folder: Path) -> dict[str, str]:
    """The identity (size, modification time) of each weights file of a pipeline folder's denoiser."""
    files = sorted(p for sub in ("unet", "transformer") for p in (folder / sub).glob("*.safetensors"))
    return {str(p.relative_to(folder)): _file_identity(str(p)) for p in files}


def _file_identity(path: str | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return f"{st.st_size} bytes, modified {st.st_mtime_ns}"


def table(rows: list[dict]) -> str:
    """Markdown in the paper's Table 1 layout; only the columns that were measured."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [
        "| model | sampler | steps | " + " | ".join(c[1] for c in cols) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for r in rows:
        cells = []
        for key, _, digits in cols:
            v = r.get(key)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}")
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fid_note(rows: list[dict]) -> str:
    """A line for under the table saying how its FID was computed (features, and for Inception the
    resize), or '' where no row has a FID: a FID compares only with FIDs computed the same way."""
    ways = []
    for r in rows:
        if "fid" not in r or "fid_features" not in r:
            continue
        way = f"{r['fid_features']} features" + (f", --fid-resize {r['fid_resize']}" if r.get("fid_resize") else "")
        if way not in ways:
            ways.append(way)
    return f"FID: {'; '.join(ways)} (docs/evaluate.md).\n" if ways else ""


def write_report(out: Path, rows: list[dict], grid_rows: list[list[Image.Image]], labels: list[str]) -> None:
    write_text_replacing(out / "results.json", json.dumps(rows, indent=1))
    note = fid_note(rows)
    write_text_replacing(out / "results.md", table(rows) + "\n" + (f"\n{note}" if note else ""))
    scale = max(1, 96 // grid_rows[0][0].size[0])
    with replacing(out / "grid.png") as tmp:
        make_grid(grid_rows, labels, scale=scale).save(tmp, format="PNG")


# A column's protocol: the settings its numbers depend on besides the model. Every column depends on
# the prompts the images were drawn from (`prompt_set`; rows of older versions do not record it).
PROTOCOL = {
    "fid": ("prompt_set", "fid_features", "fid_resize", "fid_reference", "n", "fid_weights"),
    "clip_score": ("prompt_set", "clip_model", "clip_weights"),
    "aesthetic": ("prompt_set", "aesthetic_clip_model", "aesthetic_weights", "aesthetic_clip_weights"),
    "image_reward": ("prompt_set", "image_reward_weights"),
    "class_accuracy": ("prompt_set", "n", "evaluator_weights"),
}
PATH_SETTINGS = ("fid_reference", "clip_model", "aesthetic_clip_model")  # a path, as typed, or a hub id


def _same_setting(key: str, a: object, b: object) -> bool:
    """Two rows' values of one setting agree: equal, or (for a path) naming the same place, as
    `/data/coco/` and `/data/coco` do."""
    if a == b:
        return True
    if key in PATH_SETTINGS and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return False


def _check_same_protocol(rows: list[dict], row: dict, path: Path) -> None:
    """One table compares like with like: a FID over other features, reference or sample count, or a
    CLIP score of another CLIP, is another number."""
    for column, keys in PROTOCOL.items():
        if column not in row:
            continue
        for other in (r for r in rows if column in r):
            differ = [k for k in keys if k in row and k in other and not _same_setting(k, row[k], other[k])]
            if differ:
                k = differ[0]
                raise UserError(
                    f"'{path}' measured {column} with {k}={row[k]!r}, an earlier directory with {other[k]!r}: "
                    "numbers of two protocols are not put in one table"
                )


ROW_KEYS = ("model", "sampler", "steps", "n")  # what every evaluate row has, and compare reads


def _results_rows(path: Path) -> list[dict]:
    """An evaluate run's rows, or one line saying what is wrong with the file."""
    try:
        rows = json.loads(read_user_text(path, "results file"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise UserError(f"'{path}' is not valid JSON ({exc}): run its evaluate again") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"'{path}' holds no evaluate rows (a non-empty list of results): run its evaluate again")
    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise UserError(f"'{path}' has a row without {', '.join(missing)}: run its evaluate again")
        wrong = _wrong_field(row)
        if wrong:
            raise UserError(f"'{path}' has a row whose {wrong}: run its evaluate again")
    return rows


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _wrong_field(row: dict) -> str | None:
    """What of a row `compare` reads has the wrong type (a hand-edited or foreign results.json),
    as the rest of a message; None where every field it reads is usable."""
    for key in ("model", "sampler"):
        if not isinstance(row[key], str):
            return f"'{key}' is {row[key]!r}, not text"
    for key in ("steps", "n"):
        if not _is_int(row[key]) or row[key] < 1:
            return f"'{key}' is {row[key]!r}, not a whole number of at least 1"
    for key, _, _ in COLUMNS:  # formatted as numbers in the table; None and NaN are left blank
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"'{key}' is {v!r}, not a number"
    return None


def combine(directories: list[Path], out: str | Path, grid_images: int = 10) -> str:
    """One table and one side-by-side grid from several `evaluate` output directories."""
    inputs = [Path(d).resolve() for d in directories]
    if len(set(inputs)) != len(directories):
        raise UserError("a directory is named twice: each would give the same rows")
    out = check_writable_folder(out, "--out")
    if out.resolve() in inputs:  # its own results.json, results.md and grid.png would be replaced
        raise UserError(f"--out '{out}' is one of the directories compared: name another folder")
    rows, grid_rows, labels = [], [], []
    for d in directories:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"'{d}' has no results.json (is it an 'evaluate --out' directory?)")
        for row in _results_rows(path):
            if "fid" in row and row.get("fid_features") == "inception":
                # Rows of versions before --fid-resize: their Inception FID used today's default.
                from nitrofusion.evaluation.fid import DEFAULT_FID_RESIZE

                row.setdefault("fid_resize", DEFAULT_FID_RESIZE)
            if (row.get("clip_score") or 0) > 1:  # a cosine is at most 1: this is the old x100 scale
                raise UserError(
                    f"'{path}' has CLIP scores on the x100 scale of older versions: run its evaluate again "
                    "(the cached images are reused) so that every column has the same scale"
                )
            _check_same_protocol(rows, row, path)
            rows.append(row)
            images = Path(d) / "images" / f"{row['sampler']}-{row['steps']}-step"
            try:
                grid_rows.append(
                    [Image.open(images / f"{i:05d}.png").convert("RGB") for i in range(min(grid_images, row["n"]))]
                )
            except OSError as exc:  # PIL's UnidentifiedImageError is one too
                raise UserError(f"'{d}': a cached image cannot be read ({exc}): run its evaluate again") from None
            labels.append(f"{row['model']}, {row['steps']}")
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, rows, grid_rows, labels)
    return table(rows)
