"""Real data = the teacher's own samples from the same starting noise as the student.

`TeacherSampler` runs the teacher pipeline's public __call__ with `latents=noise` and
`output_type="latent"`, so its scheduler, CFG and micro-conditioning are exactly what the
pipeline does at inference. `make_pairs` precomputes (prompt, noise seed, teacher latent)
shards in safetensors; `PairShards` reads them back.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from nitrofusion.data.conditioning import is_sd3
from nitrofusion.data.teacher_timesteps import check_teacher_timesteps
from nitrofusion.errors import UserError, first_line
from nitrofusion.pipelines.generation import denoiser
from nitrofusion.pipelines.loading import save_state_dict
from nitrofusion.training.checkpoint import fingerprint
from nitrofusion.userfiles import write_text_replacing

log = logging.getLogger(__name__)

# The teacher's weights through fp16 (recorded by an fp32 or fp16 teacher) and rounded to bf16
# directly (by an fp32 or bf16 one; only since 2026-11-29): `TeacherSampler.unet_fingerprints`.
FINGERPRINT_FP16, FINGERPRINT_BF16 = "teacher_fingerprint", "teacher_fingerprint_bf16"
FINGERPRINTS = (FINGERPRINT_FP16, FINGERPRINT_BF16)


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Starting noise, one CPU generator per seed (reproducible on any device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def step_noise_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per seed for the noise a stochastic scheduler adds between steps (LCM's, as a
    DMD2 teacher samples): without one it comes from torch's global state, and pairs and resumed
    runs would not repeat. Seeded apart from `noise_for_seeds` (a scrambled seed, not seed + k,
    which would be another pair's starting noise)."""
    return [torch.Generator().manual_seed((int(s) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63) for s in seeds]


FEW_STEP_SCHEDULERS = {"LCMScheduler", "TCDScheduler", "TimestepShiftLCMScheduler"}


class TeacherSampler:
    """`timesteps`: the teacher's own schedule, where its scheduler's spacing is not it (DMD2's 4-step
    SDXL samples at 999, 749, 499, 249; a stock LCMScheduler spaces 4 steps as 999, 759, 499, 259)."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        scheduler = type(pipe.scheduler).__name__
        if timesteps is not None:
            check_teacher_timesteps(timesteps, steps)
            if "timesteps" not in inspect.signature(pipe.scheduler.set_timesteps).parameters:
                raise UserError(f"the teacher's {scheduler} takes no custom timesteps")
            if "timesteps" not in inspect.signature(type(pipe).__call__).parameters:  # SD3's takes sigmas
                raise UserError(
                    f"the teacher's {type(pipe).__name__} takes no custom timesteps (data.teacher_timesteps)"
                )
        if steps < 8 and scheduler not in FEW_STEP_SCHEDULERS:
            # The teacher's samples are the "real" data: a multi-step model sampled in a few steps
            # gives blurred, noisy images, and the student learns exactly those.
            few_step = (
                "a distilled flow teacher (SD3.5-Large-Turbo) samples in the steps its model card gives"
                if is_sd3(pipe)
                else "a few-step teacher (e.g. DMD2) needs its LCMScheduler in its pipeline"
            )
            log.warning(
                "the teacher samples with %d steps of its %s: a multi-step teacher needs about 25 "
                "(data.teacher_steps); %s",
                steps,
                scheduler,
                few_step,
            )
        self.pipe = pipe
        self.steps = steps
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.guidance_scale = guidance_scale
        self.height, self.width = height, width
        self._unet_fingerprints: dict[str, str] | None = None
        pipe.set_progress_bar_config(disable=True)

    @property
    def unet_fingerprints(self) -> dict[str, str]:
        """The teacher UNet's (or transformer's) identity, {recipe key: digest} (computed once: the
        teacher is frozen). `fingerprint` rounds to bf16, and bf16 of an fp32 weight and of its fp16
        rounding differ (double rounding, fp16 subnormals) in some values of every tensor: a digest
        through fp16 is what an fp16 copy and the fp32 weights share, the plain one what a bf16
        copy and the fp32 weights share. fp32 weights give both, a half-precision copy its own."""
        if self._unet_fingerprints is None:
            state, dtype = denoiser(self.pipe).state_dict(), denoiser(self.pipe).dtype
            self._unet_fingerprints = {}
            if dtype != torch.bfloat16:
                self._unet_fingerprints[FINGERPRINT_FP16] = fingerprint(_AsFp16(state))
            if dtype != torch.float16:
                self._unet_fingerprints[FINGERPRINT_BF16] = fingerprint(state)
        return self._unet_fingerprints

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (denoiser(self.pipe).config.in_channels, self.height // f, self.width // f)

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], noise: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Teacher x0 latents (the diffusion latent space, i.e. VAE latents x scaling factor).
        `generator`: the scheduler's noise between steps (one, or one per prompt)."""
        schedule = {"num_inference_steps": self.steps} if self.timesteps is None else {"timesteps": self.timesteps}
        out = self.pipe(
            prompt=prompts,
            **schedule,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            latents=noise.to(self.pipe.device, denoiser(self.pipe).dtype),
            generator=generator,
            output_type="latent",
        )
        return out.images.float()


class _AsFp16(Mapping[str, torch.Tensor]):
    """A state dict's floating tensors as fp16, one at a time: `make-pairs` loads the teacher in fp16
    on a GPU by default, `distill` in fp32, and through fp16 both give the same digest."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.state[key]
        return value.half() if value.is_floating_point() else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


SHARD_GLOB = "pairs-*.safetensors"


def damaged_shard(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"teacher pairs shard '{path}' is damaged ({first_line(exc)}; an interrupted copy?): delete it and run again, "
        "which makes it again"
    )


@contextmanager
def reading_shard(path: Path) -> Iterator:
    """A pairs shard opened for reading (its header, its small tensors); one that is not a whole
    shard (a truncated copy, a foreign .safetensors file) is one line naming it, not a traceback."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise damaged_shard(path, exc) from None


def prompts_digest(prompts: list[str]) -> str:
    """A prompt list's fingerprint: shards store prompt ids, which mean nothing under another list."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def sampler_recipe(sampler: TeacherSampler) -> dict[str, str]:
    """The teacher and settings a pair depends on: what a run reading the pairs checks them against.
    The teacher by its UNet's weights and its scheduler, not by name: another model of the same
    steps, guidance and size gives other pairs."""
    recipe = {
        "teacher_steps": str(int(sampler.steps)),
        "guidance_scale": str(float(sampler.guidance_scale)),
        "latent_shape": "x".join(map(str, sampler.latent_shape)),
    }
    if sampler.timesteps is not None:  # absent means the scheduler's own spacing (OPTIONAL_KEYS)
        recipe["teacher_timesteps"] = ",".join(map(str, sampler.timesteps))
    recipe.update(sampler.unet_fingerprints)
    recipe["teacher_scheduler"] = type(sampler.pipe.scheduler).__name__
    return recipe


# Pair i of a run seeded s starts from the noise of seed OFFSET + (s * 1000003 + i) mod OFFSET.
# Without the offset, pair i's noise was that of `generate --seed i` and of evaluate's image i: a
# student was scored from the very noises it was trained on. torch's CPU generator seeds from the
# low 32 bits only (seed 2^40 + i draws seed i's noise), so the pairs take the upper half of the
# 32-bit range, which no seed below 2^31 reaches (evaluate's seed + i, reproduce's 100000 * s + i).
PAIR_NOISE_OFFSET = 2**31
NOISE_OFFSET_KEY = "noise_seed_offset"  # recorded by pairs made with the offset; absent: made without


def pair_seeds(seed: int, idx: torch.Tensor, noise_offset: int) -> torch.Tensor:
    """The seeds of pairs `idx` of a folder made with run seed `seed` (stored in its shards)."""
    if not noise_offset:  # as folders made before the offset
        return seed * 1_000_003 + idx
    return noise_offset + (seed * 1_000_003 + idx) % noise_offset


def pairs_recipe(
    sampler: TeacherSampler, prompts: list[str], seed: int, noise_offset: int = PAIR_NOISE_OFFSET
) -> dict[str, str]:
    """What a pair depends on, recorded in every shard: shards made another way must not be mixed
    in (a changed prompt list would silently re-point every stored prompt id)."""
    recipe = {**sampler_recipe(sampler), "prompts_sha256": prompts_digest(prompts), "seed": str(seed)}
    if noise_offset:
        recipe[NOISE_OFFSET_KEY] = str(noise_offset)
    return recipe


def folder_noise_offset(shards: list[Path]) -> int:
    """The noise offset a folder's pairs were made with: a new folder's is PAIR_NOISE_OFFSET; one
    made before it was recorded is completed as it was begun, without (its shards store each pair's
    seed, so training reads either kind alike)."""
    if not shards:
        return PAIR_NOISE_OFFSET
    with reading_shard(shards[0]) as f:
        recorded = (f.metadata() or {}).get(NOISE_OFFSET_KEY, "0")
    try:
        return int(recorded)
    except ValueError:
        raise UserError(f"teacher pairs '{shards[0]}' record an unreadable {NOISE_OFFSET_KEY} {recorded!r}") from None


# Recipe keys whose absence is a setting, not shards older than the key: key -> (the key that a
# recipe holding the setting always records, what absence means). Compared both ways wherever
# that key is: pairs made at DMD2's timesteps were taken by a run at the scheduler's own spacing.
OPTIONAL_KEYS = {"teacher_timesteps": ("teacher_steps", "the scheduler's own spacing")}
# Not recorded before the teacher was: such pairs may be any teacher's. Refused rather than
# trusted, as pairs of another setting are: wrong pairs train without an error, and remaking
# them costs minutes for the embedded presets (made on first use) and no more than making them did.
TEACHER_KEYS = (*FINGERPRINTS, "teacher_scheduler")


def _precision(recipe: Mapping[str, str]) -> str:
    """The precision the teacher was held in, as its recorded fingerprints tell."""
    return {(True, True): "fp32", (True, False): "fp16", (False, True): "bf16"}[
        (FINGERPRINT_FP16 in recipe, FINGERPRINT_BF16 in recipe)
    ]


def comparable_fingerprints(path: Path, have: Mapping[str, str], want: dict[str, str]) -> dict[str, str]:
    """`want` without the teacher fingerprints shard `path` (its metadata `have`) does not record,
    so that the digests both record are compared (a shard from before the record keeps them all,
    and is refused for the first). One recording none of `want`'s is refused here: an fp16 copy's
    digest and a bf16 copy's would differ for the same weights."""
    recorded = [key for key in FINGERPRINTS if key in have]
    if recorded and not any(key in want for key in recorded):
        raise UserError(
            f"teacher pairs in '{path.parent}' were made from the teacher held in {_precision(have)}, this one is "
            f"held in {_precision(want)}: the two cannot be told the same; read them with the teacher in fp32 "
            "(distill's) or its pairs' precision"
        )
    return {k: v for k, v in want.items() if k not in FINGERPRINTS or k in have or not recorded}


def check_recipe(path: Path, want: dict[str, str]) -> None:
    """A UserError naming the first setting in which shard `path` differs from `want`."""
    with reading_shard(path) as f:
        have = f.metadata() or {}
    if any(key in want for key in FINGERPRINTS):
        want = comparable_fingerprints(path, have, want)
    optional = [k for k, (anchor, _) in OPTIONAL_KEYS.items() if anchor in want and k not in want]
    for key in [*want, *optional]:
        what = "prompt list" if key == "prompts_sha256" else key
        value, had = want.get(key), have.get(key)
        if had is None and key in TEACHER_KEYS:
            raise UserError(
                f"teacher pairs '{path}' predate the teacher record (no {key}): they may be another "
                "teacher's; make them again (give a new pairs directory or delete its shards)"
            )
        if had is None and key not in OPTIONAL_KEYS:
            raise UserError(f"teacher pairs '{path}' record no {what} (made by an older nitrofusion): make them again")
        if had != value:
            absent = OPTIONAL_KEYS.get(key, ("", "none"))[1]
            raise UserError(
                f"teacher pairs in '{path.parent}' were made with another {what} "
                f"({absent if had is None else repr(had)}, now {absent if value is None else repr(value)}): "
                "give a new pairs directory or delete its shards"
            )


PAIRS_INFO = "pairs.json"  # how many pairs the folder is meant to hold, in shards of what size
SHARD_SIZE = 256


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"pairs-{index:05d}.safetensors"


def shard_length(path: Path) -> int:
    """The pairs shard `path` holds (0 if absent), read from its header."""
    if not path.is_file():
        return 0
    with reading_shard(path) as f:
        return int(f.get_slice("seeds").get_shape()[0])


def planned_pairs(directory: str | Path) -> tuple[int, int] | None:
    """(count, shard size) from a folder's `pairs.json`; None for a folder without one (made
    before it was written), whose shards are taken as complete."""
    try:
        info = json.loads((Path(directory) / PAIRS_INFO).read_text())
        plan = int(info["count"]), int(info["shard_size"])
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if min(plan) < 1:  # no folder of pairs plans that: edited by hand, and shards of 0 pairs never end
        raise UserError(
            f"'{Path(directory) / PAIRS_INFO}' plans {plan[0]} pairs in shards of {plan[1]}: "
            "not what make-pairs writes; give the pairs a new folder"
        )
    return plan


def planned_shards(directory: str | Path, count: int, shard_size: int) -> list[tuple[Path, int]]:
    """(path, pairs it holds) of each shard of `count` pairs. A pair depends on its index only, so
    a shard holding more (made for a larger count) holds the planned pairs first."""
    n_shards = -(-count // shard_size)
    return [(shard_path(Path(directory), s), min(shard_size, count - s * shard_size)) for s in range(n_shards)]


def missing_shards(directory: str | Path) -> list[Path] | None:
    """The shards a folder of pairs still lacks by its `pairs.json` (None without one): absent, or
    shorter than planned (made for a smaller count, to be extended)."""
    plan = planned_pairs(directory)
    return None if plan is None else unfinished(planned_shards(directory, *plan))


def unfinished(shards: list[tuple[Path, int]]) -> list[Path]:
    """The planned (path, pairs) shards not yet on disk in full: absent, or shorter than planned
    (made for a smaller count, to be extended)."""
    return [path for path, size in shards if shard_length(path) < size]


PROMPT_STRIDE = 7919  # a prime: consecutive pairs' prompts lie far apart in the list


def prompt_stride(n_prompts: int) -> int:
    """The step between consecutive pairs' prompt ids (mod the prompt count): prime and not dividing
    the count, so every prompt is used and evenly. 7919 unless it divides the count (which left
    count/7919 prompts used), so pairs made before it was checked keep their prompts."""
    if n_prompts < 1:  # every stride divides 0
        raise UserError("no prompts to make teacher pairs from")
    stride = PROMPT_STRIDE
    while n_prompts % stride == 0:
        stride += 1
        while any(stride % d == 0 for d in range(2, int(stride**0.5) + 1)):
            stride += 1
    return stride


def check_own_files(out_dir: Path) -> None:
    """Refuse a folder whose prompts.json or pairs.json this tool did not write (a user's COCO
    captions file named prompts.json): they are replaced when pairs are made."""
    shapes = {
        "prompts.json": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
        PAIRS_INFO: lambda v: (
            isinstance(v, dict)
            and set(v) == {"count", "shard_size"}
            and all(type(n) is int and n > 0 for n in v.values())
        ),
    }
    for name, ours in shapes.items():
        path = out_dir / name
        if not path.exists():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            value = None
        if not ours(value):
            raise UserError(
                f"'{path}' is not a file teacher pairs write, and making pairs there would replace it: "
                "give the pairs a folder of their own"
            )


def make_pairs(
    sampler: TeacherSampler,
    prompts: list[str],
    count: int,
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 16,
    shard_size: int = SHARD_SIZE,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Write `count` pairs in shards of `shard_size`; existing complete shards are kept (resume).
    With `world` processes, process `rank` makes the shards i with i % world == rank: a shard's
    pairs depend on its index only, not on which process makes it. While it samples, the process
    touches its heartbeat file after every batch, for the others' `wait_for_shards`."""
    out_dir = Path(out_dir)
    check_own_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(SHARD_GLOB))
    noise_offset = folder_noise_offset(existing)
    recipe = pairs_recipe(sampler, prompts, seed, noise_offset)
    for path in existing:  # a resumed run adds to shards made the same way only
        check_recipe(path, recipe)
    plan = planned_pairs(out_dir)
    if existing and plan is not None and plan[1] != shard_size:  # shard i would hold other pairs
        raise UserError(
            f"the teacher pairs in '{out_dir}' are in shards of {plan[1]} pairs, not {shard_size}: "
            "give a new pairs directory"
        )
    if rank == 0:  # one writer: the files are replaced through one temporary name each
        write_text_replacing(out_dir / "prompts.json", json.dumps(prompts))
        write_text_replacing(out_dir / PAIRS_INFO, json.dumps({"count": count, "shard_size": shard_size}))
    planned = planned_shards(out_dir, count, shard_size)
    shards = [path for path, _ in planned]
    mine = list(range(rank, len(planned), world))
    device_type = torch.device(sampler.pipe.device).type
    stride = prompt_stride(len(prompts))

    def size(s: int) -> int:
        return planned[s][1]

    # Shards made for an earlier count: a longer one holds this plan's pairs first and is kept as it
    # is (loading reads its first pairs), a shorter one (the last of a smaller count) is extended.
    held = {s: min(shard_length(shards[s]), size(s)) for s in mine}
    bar = tqdm(total=sum(size(s) for s in mine), initial=sum(held.values()), desc="teacher pairs", disable=not progress)
    for s in mine:
        if held[s] == size(s):
            continue
        idx = torch.arange(s * shard_size + held[s], s * shard_size + size(s))
        prompt_ids = (idx * stride + seed) % len(prompts)  # spread prompts evenly over the pairs
        seeds = pair_seeds(seed, idx, noise_offset)
        latents = []
        for b in range(0, len(idx), batch_size):
            sl = slice(b, b + batch_size)
            noise = noise_for_seeds(seeds[sl].tolist(), sampler.latent_shape)
            generators = step_noise_generators(seeds[sl].tolist())
            latents.append(sampler([prompts[int(i)] for i in prompt_ids[sl]], noise, generators).cpu())
            bar.update(len(idx[sl]))
            heartbeat(out_dir, rank).touch()
        shard = {"latents": torch.cat(latents), "seeds": seeds, "prompt_ids": prompt_ids}
        if held[s]:
            try:
                before = load_file(str(shards[s]))
            except (SafetensorError, OSError) as exc:
                raise damaged_shard(shards[s], exc) from None
            shard = {k: torch.cat([v[: held[s]], shard[k]]) for k, v in before.items()}
        # Provenance beyond the recipe (not checked on reading: `make-pairs` samples in fp16 on a GPU by
        # default, `distill` with an fp32 teacher, and either's pairs may complete the other's folder).
        made_with = {"teacher_dtype": str(denoiser(sampler.pipe).dtype).removeprefix("torch."), "device": device_type}
        if torch.is_autocast_enabled(device_type):  # a bf16 run's distill draws them so
            made_with["autocast"] = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
        save_state_dict(shard, shards[s], metadata={**recipe, **made_with})  # whole or absent: named once written
    bar.close()
    heartbeat(out_dir, rank).unlink(missing_ok=True)
    return shards


def heartbeat(directory: Path, rank: int) -> Path:
    """A file the process making shards touches after every batch: a shard is written only whole
    (at SDXL size, an hour of sampling), so the others tell a slow process from a dead one by it."""
    return directory / f"{HEARTBEAT_PREFIX}{rank:05d}"


HEARTBEAT_PREFIX = ".making-pairs-"


class ShardsNotDelivered(RuntimeError):
    """Another process's shards stopped arriving."""


def wait_for_shards(shards: list[tuple[Path, int]], directory: Path, minutes: float) -> None:
    """Until every process's shards are on disk. A process that died making its share, or a disk
    that not every machine shares, never delivers: stop once `minutes` have passed with no new
    shard and no heartbeat (`heartbeat`): a shard takes up to an hour at SDXL size, and a process
    whose own shards were all made before (a resumed run) knows nothing of how long."""
    limit = 60 * minutes
    changed, progress = time.monotonic(), None
    while missing := unfinished(shards):  # absent, or short (being extended by its process)
        beats = [p.stat().st_mtime_ns for p in directory.glob(f"{HEARTBEAT_PREFIX}*") if p.is_file()]
        now = (len(missing), max(beats, default=0))
        if now != progress:  # a shard came, or a process sampled another batch
            changed, progress = time.monotonic(), now
        elif time.monotonic() - changed > limit:
            raise ShardsNotDelivered(
                f"teacher pairs: no new shard or batch in '{directory}' for {minutes:g} min, {len(missing)} missing "
                f"({missing[0].name} first): did another process stop, or does it write to a disk this one "
                "cannot see? run again, it resumes"
            )
        time.sleep(min(5.0, limit / 10))  # another process's shards, still being made


class ShardedLatents:
    """The pairs' teacher latents, read from their memory-mapped shards as rows are asked for.
    Loaded whole they were held by every rank, twice while concatenated: 50,000 SDXL pairs at
    1024x1024 are 13 GB of fp32 latents per rank, where a batch needs a few rows."""

    def __init__(self, shards: list[tuple[Path, int]]) -> None:
        self.paths = [path for path, _ in shards]
        self.ends = torch.tensor([n for _, n in shards]).cumsum(0)
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.ends[-1])

    def _row(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        i %= len(self)
        s = int(torch.searchsorted(self.ends, i, right=True))
        if s not in self._files:  # opened once, mapped, never read whole
            try:
                self._files[s] = safe_open(str(self.paths[s]), framework="pt")
            except (SafetensorError, OSError) as exc:  # changed on disk since the run read its headers
                raise damaged_shard(self.paths[s], exc) from None
        start = i - (int(self.ends[s - 1]) if s else 0)
        return self._files[s].get_slice("latents")[start : start + 1][0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> torch.Tensor:
        """One pair's latent, or a batch of them (a slice, or a tensor of indices)."""
        if isinstance(index, slice):
            return torch.stack([self._row(i) for i in range(len(self))[index]])
        if isinstance(index, torch.Tensor) and index.ndim == 1:
            return torch.stack([self._row(int(i)) for i in index])
        return self._row(int(index))


@dataclass
class PairShards:
    prompts: list[str]
    latents: ShardedLatents
    seeds: torch.Tensor
    prompt_ids: torch.Tensor

    @classmethod
    def load(cls, directory: str | Path, recipe: dict[str, str] | None = None) -> PairShards:
        """The shards of `directory`, each checked against the directory's prompts.json and against
        `recipe` (e.g. the reading run's teacher steps, guidance and noise shape): a shard made
        another way is refused, not mixed in."""
        directory = Path(directory)
        found = sorted(directory.glob(SHARD_GLOB))
        if not found or not (directory / "prompts.json").is_file():
            raise UserError(f"no teacher pairs in '{directory}' (make them with 'nitrofusion make-pairs')")
        plan = planned_pairs(directory)
        if plan is None:  # a folder made before pairs.json: every shard, whole
            shards: list[tuple[Path, int | None]] = [(f, None) for f in found]
        else:
            shards = list(planned_shards(directory, *plan))
            missing = unfinished(shards)
            if missing:
                short = sum(p.is_file() for p in missing)
                raise UserError(
                    f"the teacher pairs in '{directory}' are incomplete: {len(missing)} shards missing, "
                    f"{missing[0].name} first{f' ({short} short: made for fewer pairs)' if short else ''} "
                    "(a stopped make-pairs: run it again with the same options, it resumes)"
                )
            # Left by a make-pairs for more pairs before one for fewer: kept, not read.
            unplanned = sorted(set(found) - {path for path, _ in shards})
            if unplanned:
                log.warning(
                    "%d shards in '%s' lie beyond the %d pairs of its %s and are not read (%s first)",
                    len(unplanned),
                    directory,
                    plan[0],
                    PAIRS_INFO,
                    unplanned[0].name,
                )
        try:
            prompts = json.loads((directory / "prompts.json").read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            prompts = None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"'{directory / 'prompts.json'}' is not a prompt list: make the pairs again")
        for f, _ in shards:
            check_recipe(f, {**(recipe or {}), "prompts_sha256": prompts_digest(prompts)})
        seeds, prompt_ids, counts = [], [], []
        for f, size in shards:  # the small per-pair tensors in memory, the latents mapped
            with reading_shard(f) as shard:
                seeds.append(shard.get_tensor("seeds")[:size])
                prompt_ids.append(shard.get_tensor("prompt_ids")[:size])
            counts.append(len(seeds[-1]))
        return cls(
            prompts=prompts,
            latents=ShardedLatents([(f, n) for (f, _), n in zip(shards, counts)]),
            seeds=torch.cat(seeds),
            prompt_ids=torch.cat(prompt_ids),
        )

    def __len__(self) -> int:
        return len(self.seeds)
