"""What several test files share: the tiny distillation config and parameter snapshots."""

import torch

from nitrofusion.training.config import DistillConfig, load_config


def config(tiny_sdxl_dir, out, *overrides: str) -> DistillConfig:
    """A distillation of the tiny SDXL pipeline small enough for a step in well under a second."""
    return load_config(None, None, config_overrides(tiny_sdxl_dir, out, *overrides))


def config_overrides(tiny_sdxl_dir, out, *overrides: str) -> list[str]:
    """`config`'s settings as `--set` values, for the command line."""
    base = [
        f"model.teacher={tiny_sdxl_dir}",
        "data.teacher_steps=1",
        "data.batch_size=2",
        "discriminator.width=4",
        "discriminator.candidates=2",
        "dmd.classifier_width=8",
        "pretrain.pixel_width=8",
        "refine.steps_per_stage=[2]",
        f"run.output_dir={out}",
        "run.validate_every=0",
        "run.checkpoint_every=1000",
    ]
    return base + list(overrides)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def straight_and_resumed(tiny_sdxl_dir, tmp_path, *overrides: str, interrupt_at: int = 2):
    """An uninterrupted run (in tmp_path/a) and one checkpointed after `interrupt_at` iterations,
    then finished by a new Distiller with `--resume latest` (in tmp_path/b)."""
    from nitrofusion.training.distill import Distiller

    straight = Distiller(config(tiny_sdxl_dir, tmp_path / "a", *overrides), progress=False)
    straight.train()
    first = Distiller(config(tiny_sdxl_dir, tmp_path / "b", *overrides), progress=False)
    for _ in range(interrupt_at):
        first.train_step()
        first.step += 1
    first.save_checkpoint()
    resumed = Distiller(config(tiny_sdxl_dir, tmp_path / "b", *overrides), progress=False)
    iterations, train_step = [], resumed.train_step
    resumed.train_step = lambda *a, **k: iterations.append(resumed.step) or train_step(*a, **k)
    resumed.train(resume="latest")
    # It resumed, not started again: a run retrained from scratch (a checkpoint it could not read)
    # would end on the same student, the training being deterministic.
    assert f"resumed from step {interrupt_at}" in (tmp_path / "b" / "log.txt").read_text()
    assert iterations == list(range(interrupt_at, straight.step)), iterations
    return straight, resumed


def same_student(dir_a, dir_b, name: str = "student_unet.safetensors") -> bool:
    from safetensors.torch import load_file

    a = load_file(str(dir_a / name))
    b = load_file(str(dir_b / name))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli_child(args: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    import os
    import sys

    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    from nitrofusion.cli import main

    sys.exit(main(args))


def cli_process(args: list[str], env: dict[str, str], timeout: float = 300):
    """`nitrofusion <args>` in a process of its own, returned as a CompletedProcess (a negative
    returncode is the signal that ended it).

    The process is forked from multiprocessing's fork server, which imported the CLI and the
    trainer once: each run starts in well under a second instead of the ~9 s a new interpreter
    takes to import torch, diffusers and transformers. The child gets `env` as its environment
    before any of our code runs in it (settings read at import time, such as transformers'
    verbosity, come from the server's environment instead), and a SIGKILL ends only the child,
    leaving on disk what a killed `nitrofusion` command leaves."""
    import multiprocessing
    import subprocess
    import tempfile
    from pathlib import Path

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["nitrofusion.cli", "nitrofusion.training.distill", "helpers"])
    command = ["nitrofusion", *args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = ctx.Process(target=_cli_child, args=(list(args), dict(env), str(out), str(err)))
        child.start()
        try:
            child.join(timeout)
            if child.exitcode is None:
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(command, child.exitcode, out.read_text(), err.read_text())
        finally:  # however the wait ends (a timeout, ^C), no child outlives it
            if child.is_alive():
                child.kill()
                child.join()
