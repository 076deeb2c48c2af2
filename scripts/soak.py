"""`make soak`: the fault-injection tests at volume, with randomness, and the table of docs/reliability.md.

    python scripts/soak.py --out outputs/soak [--trials 4] [--fuzz-examples 1000]

On a tiny SDXL-architecture pipeline (the trainer's code paths, seconds per run):
  1. kill -9 from outside at random moments, again and again, until the run finishes;
  2. kill -9 from inside at the armed fault points (mid-step, mid-checkpoint-write, mid-validation)
     at random steps;
  3. NaN storms of random length at random steps (shorter and longer than run.max_bad_steps);
  4. the newest checkpoint damaged at random (truncated, a flipped byte, appended bytes, deleted meta);
  5. the fuzz tests (CLI, config, app JSON) with many random examples.
After each, the run is resumed with `--resume latest` and compared, tensor by tensor, with an
uninterrupted run. Writes report.json and report.md (the table) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from nitrofusion.testing import save_tiny_sdxl
from nitrofusion.training import checkpoint
from nitrofusion.training.faults import ENV

ITERATIONS = 13  # pretrain 1 + stages [6, 6]
SETS = [
    "data.teacher_steps=1",
    "data.batch_size=2",
    "discriminator.width=4",
    "discriminator.candidates=2",
    "loss.pretrain_steps=1",
    "refine.steps_per_stage=[6,6]",
    "run.checkpoint_every=2",
    "run.validate_every=3",
    "run.validation_prompts=2",
    "run.max_bad_steps=4",
]


@dataclass
class Fault:
    name: str
    injected: int = 0  # faults injected
    runs: int = 0  # runs that had them
    survived: int = 0  # runs that finished equal to the uninterrupted one
    lost: list[str] = field(default_factory=list)  # what was lost, one line per run that lost something
    notes: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, out: Path, seed: int) -> None:
        self.out = out
        self.rng = random.Random(seed)
        self.teacher = save_tiny_sdxl(Path(tempfile.mkdtemp(prefix="soak-teacher-")))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.env.pop(ENV, None)
        self.reference = self.out / "reference"
        shutil.rmtree(self.reference, ignore_errors=True)
        t0 = time.perf_counter()
        done = self.start(self.reference).wait()
        assert done == 0, "the uninterrupted reference run failed"
        self.run_seconds = time.perf_counter() - t0  # start-up included: kills land anywhere in it

    def command(self, run: Path) -> list[str]:
        cmd = [sys.executable, "-m", "nitrofusion.cli", "distill", "--resume", "latest"]
        for s in [f"model.teacher={self.teacher}", *SETS, f"run.output_dir={run}"]:
            cmd += ["--set", s]
        return cmd

    def start(self, run: Path, fault: str | None = None) -> subprocess.Popen:
        env = {**self.env, ENV: fault} if fault else self.env
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"{run.name}.log", "a") as log:  # the child keeps its own descriptor
            return subprocess.Popen(self.command(run), env=env, stdout=log, stderr=subprocess.STDOUT)

    def fresh(self, name: str) -> Path:
        run = self.out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        return run

    def finish(self, run: Path) -> int:
        return self.start(run).wait()

    def whole(self, run: Path) -> list[str]:
        """Checkpoints under a real name that do not load: each one is a loss."""
        bad = []
        for path in checkpoint.list_checkpoints(run / "checkpoints"):
            try:
                checkpoint.load(path)
            except Exception as exc:  # noqa: BLE001 - any failure is a half-written checkpoint
                bad.append(f"{path.name}: {exc}")
        return bad

    def compare(self, run: Path) -> list[str]:
        """What differs from the uninterrupted run (nothing, when all survived)."""
        lost = []
        final = run / "student_unet.safetensors"
        if not final.is_file():
            return ["no final student"]
        a, b = load_file(str(self.reference / final.name)), load_file(str(final))
        if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
            lost.append("final student differs")
        last = f"step-{ITERATIONS:08d}"
        ta, _ = checkpoint.load(self.reference / "checkpoints" / last)
        tb, _ = checkpoint.load(run / "checkpoints" / last)
        if ta.keys() != tb.keys() or any(not ta[k].equal(tb[k]) for k in ta):
            lost.append("final training state differs")
        want = sorted(p.name for p in (self.reference / "validation").iterdir())
        have = sorted(p.name for p in (run / "validation").iterdir()) if (run / "validation").is_dir() else []
        if want != have:
            lost.append(f"validation grids {sorted(set(want) - set(have))} missing")
        return lost

    # ---- 1. kill -9 from outside -----------------------------------------------------------------
    def external_kills(self, trials: int) -> Fault:
        f = Fault("kill -9 from outside at a random moment (repeatedly until the run ends)")
        for trial in range(trials):
            run = self.fresh(f"external-{trial}")
            f.runs += 1
            lost = []
            for _ in range(50):
                proc = self.start(run)
                try:
                    proc.wait(timeout=self.rng.uniform(0.1, self.run_seconds))
                    break  # finished before the kill
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    f.injected += 1
                    if any((run / "checkpoints").glob(".tmp-*")):
                        f.notes.append("a kill landed inside a checkpoint write")
                    lost += self.whole(run)
            if proc.returncode != 0:
                lost.append(f"exit {proc.returncode}")
            lost += self.compare(run)
            f.survived += not lost
            f.lost += lost
        return f

    # ---- 2. kill -9 at the fault points -----------------------------------------------------------
    def fault_points(self, point: str, trials: int) -> Fault:
        label = {"step": "mid-step", "checkpoint": "mid-checkpoint-write", "validation": "mid-validation"}[point]
        f = Fault(f"kill -9 {label} (fault point, random step)")
        steps = {
            "step": range(ITERATIONS),
            "checkpoint": [s for s in range(1, ITERATIONS + 1) if s % 2 == 0 or s == ITERATIONS],
            "validation": [s for s in range(1, ITERATIONS + 1) if s % 3 == 0 or s == ITERATIONS],
        }[point]
        for trial in range(trials):
            run = self.fresh(f"{point}-{trial}")
            step = self.rng.choice(list(steps))
            f.runs += 1
            lost = []
            code = self.start(run, f"{point}@{step}").wait()
            if code == -signal.SIGKILL:
                f.injected += 1
            else:
                lost.append(f"fault {point}@{step} did not fire (exit {code})")
            lost += self.whole(run)
            code = self.finish(run)
            if code != 0:
                lost.append(f"resume exit {code}")
            lost += self.compare(run)
            f.survived += not lost
            f.lost += lost
        return f

    # ---- 3. NaN storms ------------------------------------------------------------------------------
    def nan_storms(self, trials: int) -> Fault:
        f = Fault("NaN storm in the losses (random start, 1-8 steps; limit 4 in a row)")
        for trial in range(trials):
            run = self.fresh(f"nan-{trial}")
            length = self.rng.randint(1, 8)
            first = self.rng.randint(0, ITERATIONS - 1)
            last = min(first + length - 1, ITERATIONS - 1)
            f.runs += 1
            f.injected += last - first + 1
            lost = []
            code = self.start(run, f"loss.nan@{first}-{last}").wait()
            stopped = code == 1
            if code not in (0, 1):
                lost.append(f"exit {code}")
            lost += self.whole(run)
            if stopped:
                f.notes.append(f"storm of {last - first + 1} at step {first}: stopped cleanly, resumed")
                if self.finish(run) != 0:
                    lost.append("resume after the storm failed")
            weights = run / "student_unet.safetensors"
            if weights.is_file() and not all(v.isfinite().all() for v in load_file(str(weights)).values()):
                lost.append("non-finite student")
            if not weights.is_file():
                lost.append("no final student")
            f.survived += not lost
            f.lost += lost
        return f

    # ---- 4. damaged checkpoints ---------------------------------------------------------------------
    def damaged_checkpoints(self, trials: int) -> Fault:
        f = Fault("newest checkpoint damaged (truncated / flipped byte / appended bytes / meta deleted)")
        for trial in range(trials):
            run = self.fresh(f"damage-{trial}")
            stop = self.rng.choice([4, 6, 8, 10])
            code = self.start(run, f"step@{stop}").wait()  # leaves checkpoints up to `stop`
            newest = checkpoint.list_checkpoints(run / "checkpoints")[-1]
            state = newest / checkpoint.STATE_FILE
            kind = self.rng.choice(["truncate", "flip", "append", "meta"])
            data = bytearray(state.read_bytes())
            if kind == "truncate":
                state.write_bytes(bytes(data[: self.rng.randrange(len(data))]))
            elif kind == "flip":
                i = self.rng.randrange(len(data))
                data[i] ^= 1 << self.rng.randrange(8)
                state.write_bytes(bytes(data))
            elif kind == "append":
                state.write_bytes(bytes(data) + os.urandom(self.rng.randint(1, 64)))
            else:
                (newest / checkpoint.META_FILE).unlink()
            f.runs += 1
            f.injected += 1
            lost = [] if code == -signal.SIGKILL else [f"setup kill did not fire (exit {code})"]
            if self.finish(run) != 0:
                lost.append("resume failed")
            log = (run / "log.txt").read_text()
            if "unreadable" not in log:
                lost.append(f"{kind}: the damage was not reported")
            lost += self.compare(run)
            f.survived += not lost
            f.lost += lost
        return f

    # ---- 5. fuzzing ---------------------------------------------------------------------------------
    def fuzz(self, examples: int) -> Fault:
        f = Fault(f"fuzzed input: CLI options, config files, app JSON and raw bodies ({examples} examples per test)")
        env = {**self.env, "HYPOTHESIS_PROFILE": "soak", "SOAK_EXAMPLES": str(examples)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_fuzz.py", "-p", "no:cacheprovider"],
            env=env,
            capture_output=True,
            text=True,
        )
        (self.out / "fuzz.log").write_text(done.stdout + done.stderr)  # hypothesis prints the failing example
        tests = 5
        f.runs, f.injected = tests, tests * examples
        f.survived = tests if done.returncode == 0 else 0
        if done.returncode != 0:
            f.lost.append(done.stdout.strip().splitlines()[-1] + f" (see {self.out / 'fuzz.log'})")
        return f


def table(faults: list[Fault], seconds: float) -> str:
    lines = [
        "| fault | injected | runs | runs equal to an uninterrupted run / clean | lost |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for f in faults:
        lost = "; ".join(sorted(set(f.lost))) or "nothing"
        lines.append(f"| {f.name} | {f.injected} | {f.runs} | {f.survived} / {f.runs} | {lost} |")
    return "\n".join(lines) + f"\n\n{seconds / 60:.1f} minutes.\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/soak")
    ap.add_argument("--trials", type=int, default=4, help="runs per fault kind")
    ap.add_argument("--fuzz-examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    soak = Soak(out, args.seed)
    faults = []
    for name, job in [
        ("external", lambda: soak.external_kills(args.trials)),
        ("step", lambda: soak.fault_points("step", args.trials)),
        ("checkpoint", lambda: soak.fault_points("checkpoint", args.trials)),
        ("validation", lambda: soak.fault_points("validation", args.trials)),
        ("nan", lambda: soak.nan_storms(2 * args.trials)),
        ("damage", lambda: soak.damaged_checkpoints(2 * args.trials)),
        ("fuzz", lambda: soak.fuzz(args.fuzz_examples)),
    ]:
        print(f"== {name}", flush=True)
        faults.append(job())
        print(f"   {faults[-1].survived}/{faults[-1].runs} survived; lost: {faults[-1].lost or 'nothing'}", flush=True)
    seconds = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps([asdict(f) for f in faults], indent=1))
    (out / "report.md").write_text(table(faults, seconds))
    print(table(faults, seconds))
    return 0 if all(f.survived == f.runs for f in faults) else 1


if __name__ == "__main__":
    sys.exit(main())
