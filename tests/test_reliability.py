"""Fault injection on the trainer: kill -9 at three points, damaged checkpoints, NaN storms.

Each killed run is a `nitrofusion distill` process of its own (tests/helpers.py: cli_process),
SIGKILLed by an armed fault point (nitrofusion/training/faults.py), so nothing gets to clean
up; `--resume latest` must then finish with exactly the student, checkpoint and validation
images of an uninterrupted run.
"""

import os
import shutil
import signal

import pytest
import torch
from helpers import cli_process, config, same_student
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.errors import UserError
from nitrofusion.training import checkpoint
from nitrofusion.training.faults import ENV


def distill_args(teacher, out, *extra):
    sets = [
        f"model.teacher={teacher}",
        "data.teacher_steps=1",
        "data.batch_size=2",
        "discriminator.width=4",
        "discriminator.candidates=2",
        "loss.pretrain_steps=1",
        "refine.steps_per_stage=[3,3]",  # 7 iterations: checkpoints and validation grids at 2, 4, 6, 7
        "run.checkpoint_every=2",
        "run.validate_every=2",
        "run.validation_prompts=2",
        f"run.output_dir={out}",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def run_distill(teacher, out, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return cli_process(["distill", "--resume", "latest", *distill_args(teacher, out)], env)


def every_checkpoint_is_whole(root):
    for path in checkpoint.list_checkpoints(root):
        checkpoint.load(path)  # raises on a size/checksum mismatch or an unreadable file


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run_distill(tiny_sdxl_dir, out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    "fault, left_behind, log_line",
    [
        ("step@5", None, "resumed from step 4"),  # mid-step: gradients computed, nothing stepped
        ("checkpoint@4", ".tmp-", "a checkpoint write that never finished"),  # state written, not renamed
        ("validation@4", None, "resumed from step 4"),  # checkpoint 4 done, its grid half drawn
        ("validation@7", None, "resumed from step 7"),  # the last grid (7 is no multiple of 2; found by the soak)
    ],
    ids=["mid-step", "mid-checkpoint-write", "mid-validation", "mid-final-validation"],
)
def test_kill_9_then_resume_equals_uninterrupted(tiny_sdxl_dir, reference, tmp_path, fault, left_behind, log_line):
    out = tmp_path / "run"
    killed = run_distill(tiny_sdxl_dir, out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "student_unet.safetensors").exists()
    every_checkpoint_is_whole(out / "checkpoints")
    if left_behind:
        assert any(p.name.startswith(left_behind) for p in (out / "checkpoints").iterdir())

    resumed = run_distill(tiny_sdxl_dir, out)
    assert resumed.returncode == 0, resumed.stderr
    assert log_line in (out / "log.txt").read_text()
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    every_checkpoint_is_whole(out / "checkpoints")

    assert same_student(reference, out)
    # The whole training state, optimizers and head pool included, not only the student.
    last = "step-00000007"
    ta, _ = checkpoint.load(reference / "checkpoints" / last)
    tb, _ = checkpoint.load(out / "checkpoints" / last)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    grids = sorted(p.name for p in (reference / "validation").iterdir())
    assert grids == sorted(p.name for p in (out / "validation").iterdir())
    for name in grids:
        assert (reference / "validation" / name).read_bytes() == (out / "validation" / name).read_bytes()


# --- damaged checkpoints --------------------------------------------------------------------


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF  # inside the tensor data: safetensors itself would load this silently
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def append_garbage(path):
    path.write_bytes(path.read_bytes() + b"\0" * 10)


def garbage_meta(path):
    (path.parent / checkpoint.META_FILE).write_text("{not json")


def meta_not_a_dict(path):
    (path.parent / checkpoint.META_FILE).write_text("[1, 2]")


def no_meta(path):
    (path.parent / checkpoint.META_FILE).unlink()


def no_state(path):
    path.unlink()


@pytest.mark.parametrize(
    "damage", [flip_a_byte, truncate, append_garbage, garbage_meta, meta_not_a_dict, no_meta, no_state]
)
def test_damaged_latest_checkpoint_falls_back_and_says_so(tmp_path, damage):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        tensors = {"w": torch.full((64,), float(step)), "rng.torch": torch.get_rng_state()}
        checkpoint.save(root, step, tensors, {"note": "x"}, keep=2)
    damage(root / "step-00000002" / checkpoint.STATE_FILE)
    said = []
    tensors, meta = checkpoint.load_latest(root, log=said.append)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.full((64,), 1.0))
    assert len(said) == 1 and "step-00000002" in said[0] and "previous" in said[0]


def test_every_checkpoint_damaged_is_refused_not_a_fresh_start(tiny_sdxl_dir, tmp_path, capsys):
    """`--resume latest` with checkpoints none of which could be read started from step 0, said
    "no checkpoint", and set the run's own checkpoints and student aside as an earlier run's."""
    from nitrofusion.training.distill import Distiller

    d = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[2]"), progress=False)
    d.train_step()
    d.step = 1
    d.save_checkpoint()
    (checkpoint.list_checkpoints(tmp_path / "checkpoints")[0] / checkpoint.META_FILE).write_text("{}")
    args = ["distill", *distill_args(tiny_sdxl_dir, tmp_path), "--set", "refine.steps_per_stage=[2]"]
    assert main([*args, "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 1 checkpoints" in err[0] and "no step" in err[0]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]  # nothing set aside
    assert "unreadable" in (tmp_path / "log.txt").read_text()
    # No checkpoint at all is a fresh start, as before.
    shutil.rmtree(tmp_path / "checkpoints")
    again = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[2]"), progress=False)
    again.resume("latest")
    assert again.step == 0 and "starting from scratch" in (tmp_path / "log.txt").read_text()


def test_only_folders_named_as_checkpoints_are_checkpoints(tmp_path):
    """Any folder starting with step- was one: a user's copy (step-00000002-good) was pruned as the
    oldest or resumed from, and setting later checkpoints aside failed on its name."""
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 2, {"w": torch.zeros(2)}, {})
    shutil.copytree(root / "step-00000002", root / "step-00000002-good")
    checkpoint.save(root, 10, {"w": torch.ones(2)}, {}, keep=2)
    checkpoint.save(root, 100, {"w": torch.ones(2)}, {}, keep=2)  # numbers, not names: 100 is the newest
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000010", "step-00000100"]
    assert (root / "step-00000002-good").is_dir()  # kept: not ours to prune
    assert checkpoint.load_latest(root)[1]["step"] == 100
    assert [p.name for p in checkpoint.set_aside_later(root, 10)] == ["abandoned-step-00000100"]


def test_resume_from_a_named_damaged_checkpoint_is_one_line(tiny_sdxl_dir, tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    checkpoint.save(root, 3, {"w": torch.zeros(8)}, {})
    flip_a_byte(root / "step-00000003" / checkpoint.STATE_FILE)
    args = ["distill", *distill_args(tiny_sdxl_dir, tmp_path / "run"), "--resume", str(root / "step-00000003")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "checksum" in err[0]


# --- NaN storms -------------------------------------------------------------------------------


def nan_run(tiny_sdxl_dir, out, *extra):
    from nitrofusion.training.distill import Distiller

    cfg = config(
        tiny_sdxl_dir, out, "refine.steps_per_stage=[8]", "run.checkpoint_every=2", "run.max_bad_steps=3", *extra
    )
    return Distiller(cfg, progress=False)


def test_nan_storm_shorter_than_the_limit_is_skipped_and_training_recovers(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "loss.nan@2-3,loss.nan@6")
    d = nan_run(tiny_sdxl_dir, tmp_path)
    d.train()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("step skipped") == 3
    assert [line.split(":")[0] for line in log.splitlines() if "skipped" in line] == ["step 2", "step 3", "step 6"]
    weights = load_file(str(tmp_path / "student_unet.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert d.step == 8 and (tmp_path / "checkpoints" / "step-00000008").is_dir()


def test_nan_storm_longer_than_the_limit_stops_cleanly_and_resumes(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, "loss.nan@3-7")
    args = ["distill", *distill_args(tiny_sdxl_dir, tmp_path), "--set", "run.max_bad_steps=3"]
    assert main(args) == 1
    err = capsys.readouterr().err  # the progress bar and the skipped-step lines, then one line on why it stopped
    last = err.strip().splitlines()[-1]
    assert last.startswith("nitrofusion distill: stopped:") and "last good checkpoint" in last
    assert "Traceback" not in err
    latest = checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1]
    tensors, meta = checkpoint.load(latest)
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert not (tmp_path / "student_unet.safetensors").exists()

    monkeypatch.delenv(ENV)  # the storm has passed
    assert main([*args, "--resume", "latest"]) == 0
    assert "resumed from step 2" in (tmp_path / "log.txt").read_text()


def test_non_finite_gradient_with_finite_loss_is_skipped(tiny_sdxl_dir, tmp_path):
    d = nan_run(tiny_sdxl_dir, tmp_path)
    before = {k: v.clone() for k, v in d.acc.unwrap_model(d.student).state_dict().items()}
    hook = next(d.student.parameters()).register_hook(lambda g: g * float("inf"))
    logs = d.train_step()
    hook.remove()
    assert logs == {"skipped": 1.0}
    after = d.acc.unwrap_model(d.student).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in d.student.parameters())


def test_non_finite_weights_are_never_checkpointed(tiny_sdxl_dir, tmp_path):
    d = nan_run(tiny_sdxl_dir, tmp_path)
    with torch.no_grad():
        next(d.student.parameters()).fill_(float("nan"))
    d.step = 2
    d.save_checkpoint()
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints") == []
    assert "not finite; checkpoint not written" in (tmp_path / "log.txt").read_text()


def test_fault_spec_is_checked():
    from nitrofusion.training.faults import fires

    os.environ[ENV] = "bogus@1"
    try:
        with pytest.raises(ValueError, match="not <point>@<step>"):
            fires("step", 1)
    finally:
        del os.environ[ENV]
    assert fires("step", 1) is False  # unarmed


def test_a_prompts_embedding_does_not_depend_on_its_batch():
    # The soak found a resumed run drifting from an uninterrupted one: the pooled embedding of a prompt
    # first met in a batch of three differed in the last bits from the same prompt encoded alone.
    from nitrofusion.data.conditioning import TextEncoder
    from nitrofusion.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    prompts = ["a photo of a sneaker", "a photo of a bag with a long strap", "an ankle boot"]
    together = TextEncoder(pipe, 16, 16)(prompts)
    for i, p in enumerate(prompts):
        alone = TextEncoder(pipe, 16, 16)([p])
        assert torch.equal(alone.prompt_embeds[0], together.prompt_embeds[i])
        for key, value in alone.added_cond_kwargs.items():
            assert torch.equal(value[0], together.added_cond_kwargs[key][i]), key


def test_the_prompt_cache_is_bounded_and_evicts_the_least_recently_used():
    """A million training prompts must not all stay in host memory; an evicted prompt encodes again
    to the same numbers."""
    from nitrofusion.data.conditioning import TextEncoder
    from nitrofusion.testing import tiny_sdxl_pipeline

    encoder = TextEncoder(tiny_sdxl_pipeline(), 16, 16, capacity=2)
    first = encoder(["a cat", "a dog"])
    encoder(["a cat"])  # used again: "a dog" is now the least recent
    encoder(["a red house"])
    assert list(encoder._cache) == ["a cat", "a red house"]
    again = encoder(["a dog", "a bird", "a cat"])  # more than fits, in one batch: still comes out whole
    assert len(encoder._cache) == 2 and again.prompt_embeds.shape[0] == 3
    assert torch.equal(again.prompt_embeds[0], first.prompt_embeds[1])


def test_a_report_written_in_place_is_whole_or_untouched(tmp_path):
    from nitrofusion.userfiles import replacing, write_text_replacing

    path = tmp_path / "results.json"
    write_text_replacing(path, "old")
    with pytest.raises(OSError), replacing(path) as tmp:
        tmp.write_text("half of the ne")
        raise OSError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_text_replacing(path, "new")
    assert path.read_text() == "new"
    # Two writers of one path (two processes) each write a temporary file of their own, flushed
    # before the rename: the last rename wins, whole; neither removes the other's file midway.
    import os

    synced = []
    fsync = os.fsync
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
        with replacing(path) as one, replacing(path) as two:
            assert one != two and one.parent == two.parent == tmp_path
            one.write_text("first")
            two.write_text("second")
    assert path.read_text() == "first" and len(synced) == 2  # the outer rename came last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_folder_written_in_place_is_whole_or_untouched(tmp_path):
    import os
    import stat

    from nitrofusion.userfiles import replacing_folder

    dest = tmp_path / "pipeline"
    with replacing_folder(dest) as tmp:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "unet" / "w").write_text("old")
        os.chmod(tmp / "unet" / "w", 0o600)  # as safetensors writes them
    assert (dest / "unet" / "w").read_text() == "old"
    assert stat.S_IMODE((dest / "unet" / "w").stat().st_mode) == 0o666 & ~_umask()
    with pytest.raises(OSError), replacing_folder(dest) as tmp:
        (tmp / "unet").mkdir(parents=True)
        raise OSError("disk full")
    assert (dest / "unet" / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    dest.rename(tmp_path / ".pipeline.old")  # a crash between the two renames: the next write puts it back first
    with pytest.raises(OSError), replacing_folder(dest):
        raise OSError("disk full")
    assert (dest / "unet" / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    with replacing_folder(dest) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "pipeline"
    ]


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_fresh_run_in_an_old_folder_sets_the_old_checkpoints_aside(tiny_sdxl_dir, tmp_path):
    """The old run's checkpoints outranked the new run's: pruning deleted each new one as it was
    written, and --resume latest after a crash returned to the old run."""
    from nitrofusion.training.distill import Distiller

    overrides = ("refine.steps_per_stage=[2]", "run.checkpoint_every=1", "run.keep_checkpoints=2")
    old = Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False)
    old.step = 900
    old.save_checkpoint()
    root = tmp_path / "checkpoints"
    Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False).train()
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    assert checkpoint.load_latest(root)[1]["step"] == 2
    assert (root / "abandoned-step-00000900").is_dir()  # the user's, not deleted
    assert "earlier run in this folder, set aside" in (tmp_path / "log.txt").read_text()


def test_a_fresh_run_in_a_finished_runs_folder_sets_its_student_aside(tiny_sdxl_dir, tmp_path):
    """Only the checkpoints were set aside: the new run replaced the earlier student, pipeline and config."""
    from nitrofusion.training.distill import Distiller

    Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[1]", "run.seed=1"), progress=False).train()
    earlier = (tmp_path / "student_unet.safetensors").read_bytes()
    Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[1]", "run.seed=2"), progress=False).train()
    kept = tmp_path / "abandoned-run"
    assert (kept / "student_unet.safetensors").read_bytes() == earlier
    assert (kept / "pipeline" / "model_index.json").is_file() and "seed: 1" in (kept / "config.yaml").read_text()
    assert (tmp_path / "student_unet.safetensors").read_bytes() != earlier  # the new run's, seed 2
    assert "seed: 2" in (tmp_path / "config.yaml").read_text()
    assert (
        "the earlier run in this folder (its student, pipeline, grids), set aside" in (tmp_path / "log.txt").read_text()
    )


def test_an_output_dir_is_the_folder_named_not_yaml(tmp_path, monkeypatch):
    """`--output-dir "runs/exp #2"` trained into runs/exp (a YAML comment), over the run there."""
    from nitrofusion.training.config import load_config

    monkeypatch.chdir(tmp_path)
    for name in ("runs/exp #2", "2024", "~x", "a: b"):
        assert load_config("embedded", settings={"run": {"output_dir": name}}).run.output_dir == name
        assert load_config("embedded", overrides=[f"run.output_dir={name}"]).run.output_dir == name


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_sdxl_dir, tmp_path):
    """Pruning kept the highest steps: a run resumed from step 1 deleted its own new checkpoints,
    and --resume latest went back to the abandoned step 3."""
    from nitrofusion.training.distill import Distiller

    overrides = ("refine.steps_per_stage=[4]", "run.checkpoint_every=1", "run.keep_checkpoints=2")
    first = Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False)
    for _ in range(3):
        first.train_step()
        first.step += 1
        first.save_checkpoint()
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    again = Distiller(config(tiny_sdxl_dir, tmp_path, *overrides), progress=False)
    again.resume(str(root / "step-00000002"))
    again.train_step()
    again.step += 1
    again.save_checkpoint()
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert checkpoint.load_latest(root)[1]["step"] == 3
    assert (root / "abandoned-step-00000003").is_dir()  # the user's, not deleted
    new, old = (
        load_file(str(root / name / "state.safetensors")) for name in ("step-00000003", "abandoned-step-00000003")
    )
    assert all(torch.equal(new[k], old[k]) for k in new if k.startswith("student."))  # the same step, made again
    assert "set aside" in (tmp_path / "log.txt").read_text()


def test_resuming_another_folders_checkpoint_sets_this_folders_earlier_run_aside(tiny_sdxl_dir, tmp_path):
    """`--resume PATH` from another run.output_dir took over the earlier run found here: its own
    checkpoints outranked or were pruned with the resumed run's, and its student was overwritten."""
    from nitrofusion.training.distill import Distiller

    overrides = ("refine.steps_per_stage=[3]", "run.checkpoint_every=1", "run.keep_checkpoints=2")
    source = Distiller(config(tiny_sdxl_dir, tmp_path / "a", *overrides), progress=False)
    source.train_step()
    source.step += 1
    source.save_checkpoint()
    here = tmp_path / "b"
    Distiller(
        config(tiny_sdxl_dir, here, "refine.steps_per_stage=[5]", "run.checkpoint_every=1"), progress=False
    ).train()
    earlier = (here / "student_unet.safetensors").read_bytes()
    root = here / "checkpoints"
    theirs = [p.name for p in checkpoint.list_checkpoints(root)]
    assert theirs[-1] == "step-00000005"

    Distiller(config(tiny_sdxl_dir, here, *overrides), progress=False).train(
        str(tmp_path / "a" / "checkpoints" / "step-00000001")
    )
    log = (here / "log.txt").read_text()
    assert "resumed from step 1" in log
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in root.glob("abandoned-step-*")) == [f"abandoned-{name}" for name in theirs]
    assert (here / "abandoned-run" / "student_unet.safetensors").read_bytes() == earlier
    assert (here / "student_unet.safetensors").read_bytes() != earlier
    assert "the earlier run in this folder (its student, pipeline, grids), set aside" in log


def test_a_resumed_run_takes_its_optimizer_settings_from_its_config(tiny_sdxl_dir, tmp_path):
    """load_state_dict took the learning rates, betas and weight decay of the checkpoint's groups."""
    from nitrofusion.training.distill import Distiller

    first = Distiller(config(tiny_sdxl_dir, tmp_path), progress=False)
    first.train_step()
    first.step += 1
    first.save_checkpoint()
    changed = ("discriminator.lr=0.123", "discriminator.betas=[0.5,0.9]", "optim.weight_decay=0.25")
    resumed = Distiller(config(tiny_sdxl_dir, tmp_path, *changed), progress=False)
    resumed.resume("latest")
    group = resumed.opt_d.param_groups[0]
    assert (group["lr"], group["betas"]) == (0.123, (0.5, 0.9))
    assert resumed.opt_g.param_groups[0]["weight_decay"] == 0.25
    assert resumed.opt_d.state, "the moments come from the checkpoint"
    # Allowed, and said; another run.seed (every random draw's key) is another run, refused.
    assert "discriminator.lr: 0.0002 -> 0.123" in (tmp_path / "log.txt").read_text()
    with pytest.raises(UserError, match="made with run.seed=0, this run has 7"):
        Distiller(config(tiny_sdxl_dir, tmp_path, "run.seed=7"), progress=False).resume("latest")


@pytest.mark.parametrize("before, after", [(0.9, 0.0), (0.0, 0.9)])
def test_resuming_with_the_ema_turned_off_or_on_keeps_the_student(tiny_sdxl_dir, tmp_path, before, after):
    """With decay 0 the EMA is the student: loading a checkpoint's averages there replaced the
    student by its EMA (on the main rank only). Turned on, the EMA starts from the student."""
    from nitrofusion.training.distill import Distiller

    first = Distiller(config(tiny_sdxl_dir, tmp_path, f"optim.ema_decay={before}"), progress=False)
    for _ in range(2):
        first.train_step()
        first.step += 1
    first.save_checkpoint()
    saved = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "state.safetensors"))
    resumed = Distiller(config(tiny_sdxl_dir, tmp_path, f"optim.ema_decay={after}"), progress=False)
    resumed.resume("latest")
    student = resumed.acc.unwrap_model(resumed.student).state_dict()
    assert all(torch.equal(student[k[len("student.") :]], v) for k, v in saved.items() if k.startswith("student."))
    shadow = resumed.ema.shadow.state_dict()
    assert all(torch.equal(shadow[k], student[k]) for k in student)


def test_what_a_run_leaves_is_readable_as_the_umask_says(tiny_sdxl_dir, tmp_path):
    """safetensors writes its files 0600 and mkdtemp makes 0700 folders: the student, its stages, the
    exported pipeline's weights and the checkpoints were readable by their owner alone (umask 022)."""
    import os
    import stat

    from helpers import config

    from nitrofusion.training.distill import Distiller

    old = os.umask(0o022)
    try:
        Distiller(config(tiny_sdxl_dir, tmp_path / "run", "run.checkpoint_every=1"), progress=False).train()
    finally:
        os.umask(old)
    found = [p for p in (tmp_path / "run").rglob("*") if not p.is_symlink()]
    assert any(p.suffix == ".safetensors" for p in found) and any(p.parent.name == "checkpoints" for p in found)
    for p in found:
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(tiny_sdxl_dir, tmp_path):
    """Two `distill --resume latest` in one folder: the second deleted the first's checkpoint writes
    in progress (as a dead writer's) and interleaved its metrics."""
    import fcntl

    from nitrofusion.training.distill import Distiller

    d = Distiller(config(tiny_sdxl_dir, tmp_path, "refine.steps_per_stage=[1]"), progress=False)
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a") as first:  # the first run's hold, as train() takes it
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="is in use by another run"):
            d.train()
        assert not (tmp_path / "checkpoints").exists() and d.step == 0
    d.train()  # the first one gone, the folder is free
    assert d.step == 1 and (tmp_path / "student_unet.safetensors").is_file()
