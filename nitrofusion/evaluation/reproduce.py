"""`nitrofusion reproduce`: the paper's claims re-measured on the embedded world.

Rows (each over several seeds, reported as mean ± sd):
- the teacher with its own sampler at 25 steps and at 1/2/4 steps, and with shift-LCM;
- the NitroFusion student of the preset at 1/2/4 steps, and its one-step student as it left
  the one-step stage (before bottom-up refinement to 2 and 4 steps);
- ablations at equal iterations (the preset's regression stage plus its one-step stage):
  no dynamic pool, no refresh, no local heads, no unconditional heads, and regression only
  (no adversarial stage at all), each against the full method's one-step stage;
- the family at equal compute: DMD2 and DMDX (adversarial pre-training, then ADM) from their
  own presets, which share the embedded preset's data, batch, iterations and stages and differ
  only in the objective;
- the flow world (SD3 architecture): its teacher with its own Euler sampler at 28 and 1/2/4
  steps, the NitroFusion student of the `flow-embedded` preset refined to 4 steps at trailing
  levels (1/2/4 steps, and at one step as it left its one-step stage), and regression alone at
  that stage's iterations.

Everything is cached under the output directory (distill runs resume, each score is a JSON
file), so an interrupted reproduction continues where it stopped. Each score records what it
depends on besides its key (the evaluator's sha256; for a student, the config it was trained
with), and one that differs from this reproduction's is refused rather than reported as its own.
`--set` applies to every run, except `run.seed` and `run.output_dir`, which each run sets itself
(from --seeds and --out): they are refused.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from nitrofusion.errors import UserError
from nitrofusion.evaluation.embedded import EmbeddedScore, score_pipeline
from nitrofusion.evaluation.fid import weights_identity
from nitrofusion.evaluation.grid import make_grid
from nitrofusion.training.config import DistillConfig, as_trained, load_config, unread_keys
from nitrofusion.userfiles import check_writable_folder, replacing, write_text_replacing
from nitrofusion.world.evaluator import Evaluator
from nitrofusion.world.spec import (
    FLOW_TEACHER_STEPS,
    TEACHER_STEPS,
    evaluator_path,
    flow_teacher_path,
    teacher_path,
)

SAMPLES_KEPT = 10  # images per row and seed kept as PNGs for the grid
# Pipelines kept loaded: a model is scored at 1, 2 and 4 steps, each step count over every seed,
# so a few seeds' models are reused rather than read again (an embedded pipeline is ~30 MB).
PIPELINES_KEPT = 8
STUDENT_FILES = ("student_unet.safetensors", "student_transformer.safetensors")  # a finished run's, either kind


@dataclass(frozen=True)
class Variant:
    """A distillation run: a name, config overrides on the preset, and whether it stops
    after the one-step stage (the ablations' equal-iteration budget)."""

    name: str
    overrides: tuple[str, ...] = ()
    one_step_stage_only: bool = True
    preset: str | None = None  # another preset in place of the reproduction's (the family rows)
    defaults: tuple[str, ...] = ()  # settings on the preset that the reproduction's --set may change

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


FULL = Variant("nitrofusion", one_step_stage_only=False)
ABLATIONS = (
    Variant("no dynamic pool", ("discriminator.pool=false",)),
    Variant("no refresh", ("discriminator.refresh_fraction=0.0",)),
    Variant("no local heads", ("discriminator.kinds=[global_cond]",)),
    Variant("no unconditional heads", ("discriminator.kinds=[global_cond,local_cond]",)),
    Variant("no regression anchor", ("loss.regression_weight=0",)),  # the paper's adversarial-only loss
    Variant("regression only", ()),  # schedule set in `_schedule`
)
FAMILY = (
    Variant("DMD2", one_step_stage_only=False, preset="dmd2-embedded"),
    Variant("DMDX", one_step_stage_only=False, preset="dmdx-embedded"),
)
# The flow world's runs: its preset refined to 4 steps, 300 iterations a stage and no 3-step stage
# (distill.md's four-stage flow student), scored at 1, 2 and 4 steps; and regression alone for as
# many iterations as the student's regression and one-step stages.
FLOW_PRESET = "flow-embedded"
FLOW = Variant(
    "flow NitroFusion",
    one_step_stage_only=False,
    preset=FLOW_PRESET,
    defaults=("refine.steps_per_stage=[300,300,0,300]",),
)
FLOW_REGRESSION = Variant("flow regression only", preset=FLOW_PRESET, defaults=FLOW.defaults)  # its stage 1's length
FLOW_STAGE_ONE = ("stages", "1-step", "student_transformer.safetensors")  # in a flow run's folder
FLOW_TEACHER_ROWS = (
    FLOW_TEACHER_STEPS,
    1,
    2,
    4,
)  # its Euler sampler at the scheduler's own levels, CFG 5, as the pipeline samples
TABLES = ("teacher", "student", "family", "ablation", "flow")  # the row groups, as `Row.group` names them
TEACHER_ROWS = (
    ("native", TEACHER_STEPS),
    ("native", 1),
    ("native", 2),
    ("native", 4),
    ("shift-lcm", 1),
    ("shift-lcm", 2),
    ("shift-lcm", 4),
)


@dataclass
class Row:
    """One table row: a model at a number of steps, scored once per seed."""

    group: str  # one of TABLES
    model: str
    sampler: str
    steps: int
    iterations: int | None
    scores: list[EmbeddedScore]

    def stat(self, key: str) -> tuple[float, float]:
        values = [getattr(s, key) for s in self.scores]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), sd


class Reproduction:
    def __init__(
        self,
        out: str | Path,
        seeds: list[int],
        n: int,
        preset: str = "embedded",
        overrides: list[str] | None = None,
        batch_size: int = 250,
        report_only: bool = False,
        tables: tuple[str, ...] = TABLES,
    ):
        if len(seeds) < 1 or n < 2:
            raise UserError("need at least one seed and --n of at least 2")
        if len(set(seeds)) != len(seeds):  # a repeated seed is the same run twice: a spread of 0 it did not measure
            raise UserError(f"--seeds lists a seed twice: {seeds}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        _check_own_keys(overrides or [])
        self.out = check_writable_folder(out, "--out")
        self.seeds = seeds
        self.n = n
        self.preset = preset
        self.batch_size = batch_size
        self.report_only = report_only  # tabulate the cached scores; train and sample nothing
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise UserError(f"unknown table(s) {sorted(unknown)}; choose from {', '.join(TABLES)}")
        self.tables = tables  # the groups of rows to train and score; the others are read from the cache only
        self.overrides = list(overrides or [])
        self.cfg = load_config(preset, None, self.overrides)
        self.evaluator = Evaluator.load(evaluator_path())
        self.evaluator_sha256 = weights_identity(evaluator_path()).removeprefix("sha256:")
        self.teacher = str(teacher_path())
        self._loaded: OrderedDict[tuple, object] = OrderedDict()  # the last PIPELINES_KEPT, by what they load
        if self.cfg.model.teacher != "embedded":
            raise UserError("reproduce measures the embedded world; its preset must distil the embedded teacher")

    # ---- schedule of the runs -------------------------------------------------------------
    def _schedule(self, variant: Variant) -> list[str]:
        cfg = self.cfg if variant.preset is None else self.variant_config(variant)
        pre, first = cfg.loss.pretrain_steps, cfg.refine.steps_per_stage[0]
        if variant.name.endswith("regression only"):
            return [f"loss.pretrain_steps={pre + first}", "refine.steps_per_stage=[0]"]
        return [f"refine.steps_per_stage=[{first}]"] if variant.one_step_stage_only else []

    def variant_config(self, variant: Variant) -> DistillConfig:
        """A variant's preset with its defaults, this reproduction's --set and its own overrides."""
        overrides = [*variant.defaults, *self.overrides, *variant.overrides]
        return load_config(variant.preset or self.preset, None, overrides)

    def changes_nothing(self, variant: Variant) -> bool:
        """Whether a variant's overrides leave the reproduction's config as it is."""
        if not variant.overrides or variant.preset:
            return False
        return load_config(self.preset, None, [*self.overrides, *variant.overrides]) == self.cfg

    def one_step_iterations(self) -> int:
        return self.cfg.loss.pretrain_steps + self.cfg.refine.steps_per_stage[0]

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.out / "runs" / variant.slug / f"seed-{seed}"

    def _run_overrides(self, variant: Variant, seed: int) -> list[str]:
        return [
            *variant.defaults,
            *self.overrides,
            *variant.overrides,
            *self._schedule(variant),
            f"run.seed={seed}",
            f"run.output_dir={self.run_dir(variant, seed)}",
        ]

    def run_config(self, variant: Variant, seed: int) -> dict:
        """The resolved config of one run, as `distill` is asked to train it."""
        return load_config(variant.preset or self.preset, None, self._run_overrides(variant, seed)).to_dict()

    def trained_with(self, variant: Variant, seed: int) -> dict:
        """What of a run's config its student depends on, as JSON reads it back (tuples as lists):
        recorded with each of its scores."""
        kept = {
            section: {k: v for k, v in values.items() if not _cadence_only(section, k)}
            for section, values in self.run_config(variant, seed).items()
        }
        return json.loads(json.dumps(kept))

    def distill(self, variant: Variant, seed: int) -> Path:
        """Train (or finish training) one run in a child process; returns its directory."""
        run = self.run_dir(variant, seed)
        overrides = self._run_overrides(variant, seed)
        preset = variant.preset or self.preset
        if any((run / name).is_file() for name in STUDENT_FILES):
            self._check_trained_as(run, self.run_config(variant, seed))
            return run
        if (run / "config.yaml").is_file():
            # A stopped run resumes only as it was started: distill itself refuses only the settings a
            # checkpoint cannot load under, and would record the new config over the old.
            self._check_trained_as(run, self.run_config(variant, seed), "was started with")
        cmd = [sys.executable, "-m", "nitrofusion.cli", "distill", "--preset", preset, "--resume", "latest"]
        for o in overrides:
            cmd += ["--set", o]
        print(f"\n== distill {variant.name}, seed {seed} -> {run}", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if done.returncode != 0:
            raise UserError(f"distill run '{run}' failed (exit {done.returncode}); rerun reproduce to resume it")
        return run

    @staticmethod
    def _check_trained_as(run: Path, want: dict, what: str = "was trained with") -> None:
        """A finished run is reused only if it was trained with this reproduction's config (another
        preset or --set would otherwise be reported with the old students)."""
        from nitrofusion.training.config import load_yaml

        saved = load_yaml((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        differ = _config_difference(saved, want)
        if differ:
            raise UserError(f"'{run}' {what} {differ}: use another --out, or delete that run")

    # ---- scores, cached -------------------------------------------------------------------
    def score(
        self,
        key: str,
        load: Callable[[], object],
        steps: int,
        seed: int,
        label: str,
        group: str,
        trained_with: Callable[[], dict] | None = None,
    ) -> EmbeddedScore | None:
        """A row's score for one seed: from the cache, or computed if its group is being (re)made.
        `trained_with` gives a student's config (`trained_with()`), None for a teacher: asked for
        only where there is a score to check or to make (a --set that another preset refuses
        then stops only the tables that train with it)."""
        path = self.out / "scores" / f"{key}.json"
        if not path.is_file() and (self.report_only or group not in self.tables):
            return None
        scored_with = {"evaluator_sha256": self.evaluator_sha256}
        if trained_with is not None:
            scored_with["trained_with"] = trained_with()
        if path.is_file():
            saved = json.loads(path.read_text())
            recorded = saved.pop("scored_with", None)
            cached = EmbeddedScore(**saved)
            if cached.n != self.n:
                raise UserError(
                    f"'{path}' was scored on {cached.n} images, this reproduction asks --n {self.n}: "
                    "use another --out, or delete its scores/"
                )
            self._check_scored_with(path, recorded, scored_with)
            return cached
        pipe = load()
        # Each seed gets its own images and prompt order: seeds 100000*s + i.
        score, images = score_pipeline(
            pipe, self.evaluator, steps, n=self.n, seed=100_000 * seed, batch_size=self.batch_size, label=label
        )
        if seed == self.seeds[0]:
            sample_dir = self.out / "samples" / key.rsplit("-seed", 1)[0]
            sample_dir.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images[:SAMPLES_KEPT]):
                im.save(sample_dir / f"{i:02d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_replacing(path, json.dumps({**asdict(score), "scored_with": scored_with}, indent=1))
        print(f"  {label}, {steps} step(s), seed {seed}: accuracy {score.class_accuracy:.3f}, FD {score.domain_fd:.1f}")
        return score

    def _check_scored_with(self, path: Path, recorded: dict | None, want: dict) -> None:
        """A cached score is this reproduction's only if made with its evaluator and, for a student,
        from a run trained with its config (another preset or --set, e.g.)."""
        if recorded is None or ("trained_with" in want and "trained_with" not in recorded):
            # Scores of older versions record neither (the committed docs/results/scores are such).
            # Tabulating them is what --report-only asks; a run that trains and scores would report
            # them as this config's without knowing, so it refuses.
            if self.report_only:
                return
            raise UserError(
                f"'{path}' does not record the evaluator and training config it was scored with (an older "
                "version wrote it): tabulate it with --report-only, or delete it to score it again"
            )
        if recorded.get("evaluator_sha256") != want["evaluator_sha256"]:
            have = str(recorded.get("evaluator_sha256"))[:12]
            raise UserError(
                f"'{path}' was scored with another evaluator (sha256 {have}..., this one's is "
                f"{want['evaluator_sha256'][:12]}...): use another --out, or delete its scores/"
            )
        if "trained_with" in want:
            differ = _config_difference(recorded["trained_with"], want["trained_with"])
            if differ:
                raise UserError(
                    f"'{path}' was scored for a run trained with {differ}: use another --out, or delete its scores/"
                )

    def _pipeline(self, unet: Callable[[], Path] | None = None, sampler: str = "auto", flow: bool = False):
        """A loader; `unet` is called only when a score is not cached, so finished rows never retrain.
        `flow`: the flow world's teacher, or with `unet`, a flow run's exported pipeline folder
        (its nitrofusion.json gives the levels and guidance it samples at), or a stage's transformer
        weights of that run, loaded into its exported pipeline."""
        from nitrofusion.pipelines import load_pipeline
        from nitrofusion.pipelines.loading import load_unet_weights

        def load():
            weights = unet() if unet else None
            key = (weights, sampler, flow)
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            if flow and weights is not None and weights.is_file():  # a stage's transformer, in its run's export
                pipe = load_pipeline(str(weights.parents[2] / "pipeline"), sampler=sampler)
                load_unet_weights(pipe.transformer, weights)
            elif flow:
                pipe = load_pipeline(str(weights or flow_teacher_path()), sampler=sampler)
            else:
                shift = self.cfg.model.shift if weights else None
                pipe = load_pipeline(self.teacher, unet=weights, shift=shift, sampler=sampler)
            pipe.set_progress_bar_config(disable=True)
            self._loaded[key] = pipe
            if len(self._loaded) > PIPELINES_KEPT:
                self._loaded.popitem(last=False)
            return pipe

        return load

    # ---- the whole table --------------------------------------------------------------------
    def run(self) -> list[Row]:
        rows: list[Row] = []
        for sampler, steps in TEACHER_ROWS:
            label = "teacher (Euler, CFG 5)" if sampler == "native" else "teacher (shift-LCM)"
            scores = [
                self.score(
                    f"teacher-{sampler}-{steps}-seed{s}", self._pipeline(sampler=sampler), steps, s, label, "teacher"
                )
                for s in self.seeds
            ]
            self._add(rows, Row("teacher", label, sampler, steps, None, scores))

        def trained(variant: Variant, seed: int, *parts: str) -> Callable[[], Path]:
            return lambda: self.distill(variant, seed).joinpath(*parts)

        total = self.cfg.total_steps
        family = [(FULL, "nitrofusion-final", "NitroFusion student", "student")]
        family += [(v, v.slug, f"{v.name} student", "family") for v in FAMILY]
        for variant, key, label, group in family:
            for steps in (1, 2, 4):
                if steps > 1 and len(self.cfg.refine.steps_per_stage) < steps:
                    continue
                scores = [
                    self.score(
                        f"{key}-{steps}-seed{s}",
                        self._pipeline(trained(variant, s, "student_unet.safetensors")),
                        steps,
                        s,
                        label,
                        group,
                        self._trained_with(variant, s),
                    )
                    for s in self.seeds
                ]
                self._add(rows, Row(group, label, "shift-LCM", steps, total, scores))

        stage_one = [
            self.score(
                f"nitrofusion-stage1-1-seed{s}",
                self._pipeline(trained(FULL, s, "stages", "1-step", "student_unet.safetensors")),
                1,
                s,
                "NitroFusion, one-step stage",
                "ablation",
                self._trained_with(FULL, s),
            )
            for s in self.seeds
        ]
        iters = self.one_step_iterations()
        self._add(rows, Row("ablation", "NitroFusion (full method)", "shift-LCM", 1, iters, stage_one))
        for variant in ABLATIONS:
            if self.changes_nothing(variant):
                continue  # e.g. "no regression anchor" on a preset without one: the full method again
            scores = []
            for s in self.seeds:
                scores.append(
                    self.score(
                        f"{variant.slug}-1-seed{s}",
                        self._pipeline(trained(variant, s, "student_unet.safetensors")),
                        1,
                        s,
                        variant.name,
                        "ablation",
                        self._trained_with(variant, s),
                    )
                )
            self._add(rows, Row("ablation", variant.name, "shift-LCM", 1, iters, scores))
        self._flow_rows(rows)
        self.write(rows)
        return rows

    def _trained_with(self, variant: Variant, seed: int) -> Callable[[], dict]:
        return lambda: self.trained_with(variant, seed)

    def _flow_rows(self, rows: list[Row]) -> None:
        """The flow world: its teacher, its NitroFusion student at 1, 2 and 4 steps, regression alone."""
        for steps in FLOW_TEACHER_ROWS:
            label = "flow teacher (Euler, CFG 5)"
            scores = [
                self.score(f"flow-teacher-native-{steps}-seed{s}", self._pipeline(flow=True), steps, s, label, "flow")
                for s in self.seeds
            ]
            self._add(rows, Row("flow", label, "native", steps, None, scores))

        def exported(variant: Variant, seed: int) -> Callable[[], Path]:
            return lambda: self.distill(variant, seed) / "pipeline"

        def iterations(variant: Variant) -> int:
            cfg = self.variant_config(FLOW)  # regression alone: the student's regression and one-step stages
            return cfg.total_steps if variant is FLOW else cfg.loss.pretrain_steps + cfg.refine.steps_per_stage[0]

        for variant, steps_list in ((FLOW, (1, 2, 4)), (FLOW_REGRESSION, (1,))):
            for steps in steps_list:
                label = f"{variant.name} student"
                scores = [
                    self.score(
                        f"{variant.slug}-{steps}-seed{s}",
                        self._pipeline(exported(variant, s), flow=True),
                        steps,
                        s,
                        label,
                        "flow",
                        self._trained_with(variant, s),
                    )
                    for s in self.seeds
                ]
                iters = iterations(variant) if any(x is not None for x in scores) else None
                self._add(rows, Row("flow", label, "native", steps, iters, scores))
            if variant is FLOW:  # as it left its one-step stage: regression alone's equal iterations
                label = f"{FLOW.name}, one-step stage"
                scores = [
                    self.score(
                        f"{FLOW.slug}-stage1-1-seed{s}",
                        self._pipeline(lambda s=s: self.distill(FLOW, s).joinpath(*FLOW_STAGE_ONE), flow=True),
                        1,
                        s,
                        label,
                        "flow",
                        self._trained_with(FLOW, s),
                    )
                    for s in self.seeds
                ]
                iters = iterations(FLOW_REGRESSION) if any(x is not None for x in scores) else None
                self._add(rows, Row("flow", label, "native", 1, iters, scores))

    @staticmethod
    def _add(rows: list[Row], row: Row) -> None:
        row.scores = [x for x in row.scores if x is not None]
        if row.scores:
            rows.append(row)

    # ---- report -----------------------------------------------------------------------------
    def write(self, rows: list[Row]) -> None:
        if not rows:
            raise UserError(f"no scores to report under '{self.out}': run reproduce without --report-only first")
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_replacing(
            self.out / "results.json",
            json.dumps([{**asdict(r), "scores": [asdict(s) for s in r.scores]} for r in rows], indent=1),
        )
        write_text_replacing(self.out / "results.md", report(rows, self.n, self.seeds))
        grid_rows, labels = [], []
        for key, label in self.grid_rows():
            images = [Image.open(p).convert("RGB") for p in sorted((self.out / "samples" / key).glob("*.png"))]
            if images:
                grid_rows.append(images)
                labels.append(label)
        if not grid_rows:  # scores alone (e.g. the committed ones copied into --out): no samples to show
            print(f"no samples under '{self.out / 'samples'}': no grid.png")
            return
        with replacing(self.out / "grid.png") as tmp:
            make_grid(grid_rows, labels, scale=3).save(tmp, format="PNG")

    def grid_rows(self) -> list[tuple[str, str]]:
        rows = [
            (f"teacher-native-{TEACHER_STEPS}", f"teacher, Euler {TEACHER_STEPS}"),
            ("teacher-native-1", "teacher, Euler 1"),
            ("teacher-shift-lcm-1", "teacher, shift-LCM 1"),
            ("nitrofusion-final-1", "NitroFusion 1"),
            ("nitrofusion-final-2", "NitroFusion 2"),
            ("nitrofusion-final-4", "NitroFusion 4"),
        ]
        rows += [(f"{v.slug}-1", f"{v.name} 1") for v in FAMILY]
        rows += [(f"{v.slug}-1", f"{v.name} 1") for v in ABLATIONS]
        rows += [
            ("flow-teacher-native-28", "flow teacher, Euler 28"),
            ("flow-teacher-native-1", "flow teacher, Euler 1"),
        ]
        return (
            rows
            + [(f"{FLOW.slug}-stage1-1", f"{FLOW.name}, one-step stage 1")]
            + [(f"{FLOW.slug}-{k}", f"{FLOW.name} {k}") for k in (1, 2, 4)]
            + [(f"{FLOW_REGRESSION.slug}-1", f"{FLOW_REGRESSION.name} 1")]
        )


# Config keys each run sets itself (`Reproduction._run_overrides`), and the option that chooses them.
OWN_KEYS = {"seed": "--seeds (each run trains with one of them)", "output_dir": "--out (each run trains under it)"}


def _check_own_keys(overrides: list[str]) -> None:
    """A --set of a key every run sets would be accepted and then overridden: refused."""
    from nitrofusion.training.config import parse_override

    for text in overrides:
        run = parse_override(text).get("run")
        run = getattr(run, "value", run)  # `run={seed: 3}`: the section as one YAML mapping
        for key, option in OWN_KEYS.items():
            if isinstance(run, dict) and key in run:
                raise UserError(f"--set run.{key} is set by reproduce for each run: use {option}")


def _cadence_only(section: str, key: str) -> bool:
    """Settings that do not change the student: logging and checkpoint cadence, the output folder."""
    return section == "run" and key != "seed"


# Keys added to the config after runs were saved: what a run that records none trained with, beside
# those `as_trained` fills in from the run's other settings. model.flow_levels shapes flow students
# only, and reproduce trained none before the key: its default stands.
BEFORE_THE_KEY = {("discriminator", "text_init"): "he", ("model", "flow_levels"): "trailing"}


def _flow_default_targets(section: str, key: str, saved: object, want: object) -> bool:
    """A flow run records its transformer's LoRA targets where its config left the UNet's default
    (`Distiller`): the same setting."""
    from nitrofusion.training.lora import DEFAULT_TARGETS, FLOW_TARGETS

    return (section, key) == ("model", "lora_targets") and saved == list(FLOW_TARGETS) and want == list(DEFAULT_TARGETS)


def _config_difference(saved: dict, want: dict) -> str | None:
    """The first setting (`section.key=saved, this reproduction asks wanted`) where a run's saved
    config differs from the wanted one; None where the student's settings agree."""
    saved = as_trained(saved)  # keys its config predates, as it trained
    unread = unread_keys(want)  # settings of networks the run never builds (the pool's in a DMD2 run)
    for section, values in want.items():
        for key, value in values.items():
            if _cadence_only(section, key) or f"{section}.{key}" in unread:
                continue
            have = (saved.get(section) or {}).get(key, BEFORE_THE_KEY.get((section, key)))
            if have != value and not _flow_default_targets(section, key, have, value):
                return f"{section}.{key}={have!r}, this reproduction asks {value!r}"
    return None


def _cell(row: Row, key: str, digits: int) -> str:
    mean, sd = row.stat(key)
    if len(row.scores) < 2:
        return f"{mean:.{digits}f}"  # one seed has no spread to report
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def report(rows: list[Row], n: int, seeds: list[int]) -> str:
    head = [
        "| model | sampler | steps | training iterations | seeds | class accuracy ↑ | domain FD ↓ | s / image |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def line(r: Row) -> str:
        speed = statistics.fmean(s.seconds_per_image for s in r.scores)
        iters = "" if r.iterations is None else str(r.iterations)
        return (
            f"| {r.model} | {r.sampler} | {r.steps} | {iters} | {len(r.scores)} | {_cell(r, 'class_accuracy', 3)} | "
            f"{_cell(r, 'domain_fd', 1)} | {speed:.4f} |"
        )

    main = [line(r) for r in rows if r.group in ("teacher", "student")]
    ablation = [line(r) for r in rows if r.group == "ablation"]
    family = [line(r) for r in rows if r.group in ("student", "family")]
    flow = [line(r) for r in rows if r.group == "flow"]
    seeds_text = ", ".join(str(s) for s in seeds)
    return "\n".join(
        [
            f"Mean ± sd over the seeds ({seeds_text} requested; the `seeds` column says how many a row has); "
            f"{n} images per seed and row (prompts balanced over the classes).",
            "",
            "### Teacher and student",
            "",
            *head,
            *main,
            "",
            "### Ablations at equal iterations (one step)",
            "",
            *head,
            *ablation,
            "",
            "### The family at equal compute (same data, batch, iterations and stages; only the objective differs)",
            "",
            *head,
            *family,
            "",
            *(
                [
                    "### The flow world (SD3 architecture): teacher, NitroFusion student, regression alone",
                    "",
                    *head,
                    *flow,
                    "",
                ]
                if flow
                else []
            ),
        ]
    )
