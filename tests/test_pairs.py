"""Teacher pairs: a folder holds the pairs of one teacher, one setting and one planned count, and
a run that would read or complete them otherwise is refused in one line, not fed other data."""

import json
import logging

import pytest
import torch
from diffusers import LCMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.data.teacher import (
    FINGERPRINT_BF16,
    FINGERPRINT_FP16,
    NOISE_OFFSET_KEY,
    PAIR_NOISE_OFFSET,
    PROMPT_STRIDE,
    TEACHER_KEYS,
    PairShards,
    TeacherSampler,
    make_pairs,
    missing_shards,
    noise_for_seeds,
    prompt_stride,
    sampler_recipe,
)
from nitrofusion.errors import UserError
from nitrofusion.pipelines import load_pipeline
from nitrofusion.testing import save_tiny_sdxl, tiny_sdxl_pipeline

PROMPTS = ["a cat", "a dog", "a boot"]


def sampler(seed: int = 0, timesteps: list[int] | None = None, lcm: bool = False, steps: int = 1) -> TeacherSampler:
    """A tiny teacher (its weights drawn from `seed`) at 16x16; `lcm`: a DMD2-style one, which
    takes its own timesteps."""
    pipe = tiny_sdxl_pipeline(seed)
    if lcm:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return TeacherSampler(pipe, steps, 1.0, 16, 16, timesteps)


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_custom_timesteps_are_checked_both_ways(tmp_path):
    """Shards made at DMD2's timesteps passed a run at the scheduler's spacing (it had no key to
    compare) and were completed by it; the reverse was called 'made by an older nitrofusion'."""
    dmd2, lcm = sampler(timesteps=[999, 749, 499, 249], lcm=True, steps=4), sampler(lcm=True, steps=4)
    make_pairs(dmd2, PROMPTS, 3, tmp_path / "dmd2", batch_size=2, shard_size=2, progress=False)
    (tmp_path / "dmd2" / "pairs-00001.safetensors").unlink()  # half-made: not to be finished another way
    want = "another teacher_timesteps ('999,749,499,249', now the scheduler's own spacing)"
    with pytest.raises(UserError) as exc:
        make_pairs(lcm, PROMPTS, 3, tmp_path / "dmd2", batch_size=2, shard_size=2, progress=False)
    assert want in one_line(exc)
    assert not (tmp_path / "dmd2" / "pairs-00001.safetensors").exists()
    make_pairs(dmd2, PROMPTS, 3, tmp_path / "dmd2", batch_size=2, shard_size=2, progress=False)
    with pytest.raises(UserError, match=want.replace("(", r"\(").replace(")", r"\)")):
        PairShards.load(tmp_path / "dmd2", sampler_recipe(lcm))
    assert len(PairShards.load(tmp_path / "dmd2", sampler_recipe(dmd2))) == 3

    make_pairs(lcm, PROMPTS, 2, tmp_path / "lcm", progress=False)
    with pytest.raises(UserError) as exc:
        PairShards.load(tmp_path / "lcm", sampler_recipe(dmd2))
    assert "another teacher_timesteps (the scheduler's own spacing, now '999,749,499,249')" in one_line(exc)
    assert len(PairShards.load(tmp_path / "lcm", sampler_recipe(lcm))) == 2  # no timesteps either side


def test_another_teachers_pairs_are_refused(tmp_path):
    """model.teacher switched to another model of the same steps, guidance and size reused the
    first one's pairs."""
    first, other = sampler(0), sampler(1)
    assert sampler_recipe(first)["teacher_steps"] == sampler_recipe(other)["teacher_steps"]
    make_pairs(first, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    with pytest.raises(UserError) as exc:
        PairShards.load(tmp_path / "p", sampler_recipe(other))
    was, now = first.unet_fingerprints[FINGERPRINT_FP16], other.unet_fingerprints[FINGERPRINT_FP16]
    assert f"another teacher_fingerprint ('{was}', now '{now}')" in one_line(exc)
    (tmp_path / "p" / "pairs-00001.safetensors").unlink()
    with pytest.raises(UserError, match="another teacher_fingerprint"):
        make_pairs(other, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    assert not (tmp_path / "p" / "pairs-00001.safetensors").exists()
    # The same weights under another scheduler give other samples too.
    lcm = sampler(0, lcm=True)
    with pytest.raises(UserError, match="another teacher_scheduler \\('EulerDiscreteScheduler', now 'LCMScheduler'\\)"):
        make_pairs(lcm, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    make_pairs(sampler(0), PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    assert len(PairShards.load(tmp_path / "p", sampler_recipe(first))) == 3


def test_the_teacher_is_the_same_in_fp32_fp16_and_bf16(tiny_sdxl_dir, tmp_path):
    """`make-pairs` loads the teacher in fp16 or bf16 on a GPU, `distill` in fp32: the pairs of
    either are the other's. bf16-made pairs were refused as another teacher's (the fp16 digest of
    a bf16 copy is not the fp32 weights')."""
    held = {
        name: TeacherSampler(load_pipeline(tiny_sdxl_dir, sampler="native", dtype=dtype), 1, 1.0, 16, 16)
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16))
    }
    fp32, fp16, bf16 = held.values()
    assert bf16.pipe.unet.dtype == torch.bfloat16 and fp16.pipe.unet.dtype == torch.float16
    assert fp32.unet_fingerprints == {**fp16.unet_fingerprints, **bf16.unet_fingerprints}
    assert fp32.unet_fingerprints.keys() == {FINGERPRINT_FP16, FINGERPRINT_BF16}
    assert fp32.unet_fingerprints[FINGERPRINT_FP16] != sampler(1).unet_fingerprints[FINGERPRINT_FP16]
    # The tiny teacher's fp32 weights round differently through fp16 than to bf16 directly.
    assert fp16.unet_fingerprints[FINGERPRINT_FP16] != bf16.unet_fingerprints[FINGERPRINT_BF16]

    for made in held:
        make_pairs(held[made], PROMPTS, 2, tmp_path / made, progress=False)
    for made, reader in [("fp32", "fp16"), ("fp32", "bf16"), ("fp16", "fp32"), ("bf16", "fp32")]:
        assert len(PairShards.load(tmp_path / made, sampler_recipe(held[reader]))) == 2, (made, reader)
    for made, reader in [("fp16", "bf16"), ("bf16", "fp16")]:
        with pytest.raises(UserError) as exc:
            PairShards.load(tmp_path / made, sampler_recipe(held[reader]))
        assert f"made from the teacher held in {made}, this one is held in {reader}" in one_line(exc)
    with pytest.raises(UserError, match="another teacher_fingerprint_bf16"):
        PairShards.load(tmp_path / "bf16", sampler_recipe(sampler(1)))


def test_pairs_made_before_the_teacher_record_are_refused(tmp_path):
    """They may be any teacher's: one line saying so, and nothing changed in the folder."""
    teacher = sampler(0)
    shards = make_pairs(teacher, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    for shard in shards:  # as the previous version wrote them
        with safe_open(str(shard), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k not in TEACHER_KEYS}
        save_file(load_file(str(shard)), str(shard), metadata=meta)
    before = {s: s.read_bytes() for s in shards}
    for attempt in (
        lambda: PairShards.load(tmp_path / "p", sampler_recipe(teacher)),
        lambda: make_pairs(teacher, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False),
    ):
        with pytest.raises(UserError) as exc:
            attempt()
        assert "predate the teacher record (no teacher_fingerprint)" in one_line(exc)
    assert {s: s.read_bytes() for s in shards} == before
    assert len(PairShards.load(tmp_path / "p")) == 3  # a reader that checks no teacher still reads them


def test_a_teacher_swap_is_one_line_from_distill(tiny_sdxl_dir, tmp_path, capsys):
    other = save_tiny_sdxl(tmp_path / "other", seed=1)
    teacher = TeacherSampler(load_pipeline(tiny_sdxl_dir, sampler="native"), 1, 3.0, 16, 16)
    make_pairs(teacher, PROMPTS, 2, tmp_path / "pairs", progress=False)
    args = ["distill", "--set", f"model.teacher={other}", "--set", f"data.pairs={tmp_path / 'pairs'}"]
    args += ["--set", "data.teacher_steps=1", "--set", "data.teacher_guidance=3.0", "--set", "data.resolution=16"]
    args += ["--set", f"run.output_dir={tmp_path / 'run'}"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another teacher_fingerprint" in err[0], err


def test_every_prompt_is_used_whatever_the_prompt_count(tmp_path):
    """The stride 7919 used one prompt of 7919, two of 15838, ..."""
    prompts = [f"prompt {i}" for i in range(PROMPT_STRIDE)]
    make_pairs(sampler(), prompts, 4, tmp_path / "p", progress=False)
    assert len(set(PairShards.load(tmp_path / "p").prompt_ids.tolist())) == 4
    for n in (PROMPT_STRIDE, 2 * PROMPT_STRIDE, 7927 * 7919, 2 * 3 * 7919 * 7927 * 7933):
        stride = prompt_stride(n)
        assert n % stride and all(stride % d for d in range(2, int(stride**0.5) + 1))
    assert prompt_stride(2 * PROMPT_STRIDE) == 7927  # the next prime
    with pytest.raises(UserError, match="no prompts"):  # every stride divides 0: it never returned
        prompt_stride(0)


@pytest.mark.parametrize("n", [1, 2, 80, 1000, 7918, 7920, 50_000, 7919 * 7927 + 1])
def test_prompt_counts_not_divisible_by_7919_keep_their_prompts(n):
    """Pairs made before (the embedded world's: 80 prompts) are made as before."""
    assert prompt_stride(n) == 7919


def test_a_smaller_count_reads_only_its_pairs_and_a_larger_one_extends_the_last_shard(tmp_path, caplog):
    """make-pairs --n 5, then --n 3 into the same folder read 5 pairs (every shard on disk); --n 7
    after --n 5 left the 1-pair last shard short of its 2."""
    teacher = sampler()
    folder = tmp_path / "p"
    make_pairs(teacher, PROMPTS, 5, folder, batch_size=2, shard_size=2, progress=False)
    five = PairShards.load(folder)
    make_pairs(teacher, PROMPTS, 3, folder, batch_size=2, shard_size=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="nitrofusion.data.teacher"):
        three = PairShards.load(folder)
    assert len(three) == 3 and torch.equal(three.latents[:], five.latents[:3])
    assert torch.equal(three.seeds, five.seeds[:3]) and torch.equal(three.prompt_ids, five.prompt_ids[:3])
    assert "1 shards in" in caplog.text and "pairs-00002.safetensors first" in caplog.text
    assert len(load_file(str(folder / "pairs-00001.safetensors"))["seeds"]) == 2  # nothing thrown away

    make_pairs(teacher, PROMPTS, 7, folder, batch_size=2, shard_size=2, progress=False)
    seven = PairShards.load(folder)
    fresh = make_pairs(teacher, PROMPTS, 7, tmp_path / "fresh", batch_size=2, shard_size=2, progress=False)
    assert len(seven) == 7 and torch.equal(seven.latents[:5], five.latents[:])
    whole = PairShards.load(tmp_path / "fresh")
    assert torch.equal(seven.seeds, whole.seeds) and torch.equal(seven.prompt_ids, whole.prompt_ids)
    torch.testing.assert_close(seven.latents[:], whole.latents[:], rtol=1e-4, atol=1e-4)  # batched otherwise
    assert [len(load_file(str(s))["seeds"]) for s in fresh] == [2, 2, 2, 1]
    assert len(load_file(str(folder / "pairs-00002.safetensors"))["seeds"]) == 2


def test_a_short_planned_shard_is_incomplete_and_completed(tmp_path):
    """A make-pairs for more pairs stopped after writing its plan: the last shard of the smaller
    count is short of the new plan, which distill (through missing_shards) completes first."""
    teacher = sampler()
    folder = tmp_path / "p"
    make_pairs(teacher, PROMPTS, 3, folder, batch_size=2, shard_size=2, progress=False)
    (folder / "pairs.json").write_text(json.dumps({"count": 4, "shard_size": 2}))
    assert missing_shards(folder) == [folder / "pairs-00001.safetensors"]
    with pytest.raises(UserError) as exc:
        PairShards.load(folder)
    assert "incomplete: 1 shards missing, pairs-00001.safetensors first (1 short" in one_line(exc)
    make_pairs(teacher, PROMPTS, 4, folder, batch_size=2, shard_size=2, progress=False)
    assert missing_shards(folder) == [] and len(PairShards.load(folder)) == 4


def test_another_shard_size_is_refused(tmp_path):
    """Shard i of another size holds other pairs: completing the folder would mix them."""
    teacher = sampler()
    make_pairs(teacher, PROMPTS, 3, tmp_path / "p", batch_size=2, shard_size=2, progress=False)
    with pytest.raises(UserError) as exc:
        make_pairs(teacher, PROMPTS, 5, tmp_path / "p", batch_size=2, shard_size=4, progress=False)
    assert "are in shards of 2 pairs, not 4" in one_line(exc)
    assert json.loads((tmp_path / "p" / "pairs.json").read_text()) == {"count": 3, "shard_size": 2}


def test_pair_latents_are_read_from_their_shards_row_by_row(tmp_path):
    """Every rank held every pair's latent, twice while they were concatenated: 13 GB a rank for
    50,000 SDXL pairs. They are mapped from the shards and read a batch's rows at a time."""
    from nitrofusion.data.teacher import ShardedLatents

    rows = torch.arange(7 * 2 * 3, dtype=torch.float32).reshape(7, 2, 3)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"latents": rows[:4]}, str(a))
    save_file({"latents": torch.cat([rows[4:], torch.full((2, 2, 3), -1.0)])}, str(b))  # 2 rows past its count
    latents = ShardedLatents([(a, 4), (b, 3)])
    assert len(latents) == 7 and latents._files == {}  # nothing read until asked
    idx = torch.tensor([6, 0, 3, 4, 4])
    assert torch.equal(latents[idx], rows[idx]) and torch.equal(latents[:], rows)
    assert torch.equal(latents[-1], rows[6]) and torch.equal(latents[2:5], rows[2:5])
    with pytest.raises(IndexError):
        latents[7]


def test_pairs_start_from_noises_no_sample_or_evaluation_draws(tmp_path):
    """Pair i's noise was `generate --seed i`'s and evaluate's image i's: a student was scored from
    the very noises it trained on. Now their seeds' low 32 bits lie at 2^31 and up, recorded; a folder begun without the
    offset is completed as it was begun."""
    teacher = sampler()
    make_pairs(teacher, PROMPTS, 5, tmp_path / "new", batch_size=2, shard_size=2, progress=False, seed=3)
    pairs = PairShards.load(tmp_path / "new", sampler_recipe(teacher))
    assert pairs.seeds.tolist() == [2**31 + 3 * 1_000_003 + i for i in range(5)]
    # What matters is the noise: torch seeds from the low 32 bits, so an offset of 2^40 changed nothing.
    evaluated = noise_for_seeds(list(range(5)), teacher.latent_shape)  # evaluate's images 0-4, generate --seed 0-4
    trained = noise_for_seeds(pairs.seeds.tolist(), teacher.latent_shape)
    assert not any(torch.equal(t, e) for t in trained for e in evaluated)
    assert all(2**31 <= s % 2**32 for s in pairs.seeds.tolist())  # no seed below 2^31 draws a pair's noise
    high = PairShards.load(tmp_path / "new", sampler_recipe(teacher))
    make_pairs(teacher, PROMPTS, 3, tmp_path / "big-seed", batch_size=3, shard_size=3, progress=False, seed=2**32 - 1)
    big = PairShards.load(tmp_path / "big-seed", sampler_recipe(teacher)).seeds.tolist()
    assert all(2**31 <= s < 2**32 for s in big + high.seeds.tolist())
    with safe_open(str(tmp_path / "new" / "pairs-00000.safetensors"), "pt") as f:
        assert f.metadata()[NOISE_OFFSET_KEY] == str(PAIR_NOISE_OFFSET)

    old = tmp_path / "old"  # as an earlier version wrote it: seeds from 0, no offset recorded
    make_pairs(teacher, PROMPTS, 5, old, batch_size=2, shard_size=2, progress=False)
    for path in sorted(old.glob("pairs-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != NOISE_OFFSET_KEY}
        tensors = load_file(str(path))
        save_file({**tensors, "seeds": tensors["seeds"] - PAIR_NOISE_OFFSET}, str(path), metadata=meta)
    (old / "pairs-00002.safetensors").unlink()  # stopped before its last shard
    make_pairs(teacher, PROMPTS, 5, old, batch_size=2, shard_size=2, progress=False)
    assert PairShards.load(old, sampler_recipe(teacher)).seeds.tolist() == list(range(5))
    with safe_open(str(old / "pairs-00002.safetensors"), "pt") as f:
        assert NOISE_OFFSET_KEY not in f.metadata()


def test_a_damaged_shard_or_plan_is_one_line(tmp_path, capsys):
    """A truncated copy of a shard, a foreign .safetensors file in its place, or a pairs.json planning
    shards of 0 pairs: tracebacks (SafetensorError, ZeroDivisionError) from every reader."""
    teacher = sampler()
    folder = tmp_path / "p"
    make_pairs(teacher, PROMPTS, 3, folder, batch_size=2, shard_size=2, progress=False)
    shard = folder / "pairs-00001.safetensors"
    whole = shard.read_bytes()
    for damage in (whole[: len(whole) // 2], b"\x64" + bytes(99)):
        shard.write_bytes(damage)
        for attempt in (
            lambda: missing_shards(folder),
            lambda: PairShards.load(folder, sampler_recipe(teacher)),
            lambda: make_pairs(teacher, PROMPTS, 4, folder, batch_size=2, shard_size=2, progress=False),
        ):
            with pytest.raises(UserError) as exc:
                attempt()
            assert f"teacher pairs shard '{shard}' is damaged" in one_line(exc)
        assert shard.read_bytes() == damage  # nothing written over it
    save_file({"latents": torch.zeros(1)}, str(shard))  # a whole file, not a shard
    with pytest.raises(UserError, match="is damaged \\(File does not contain tensor seeds"):
        PairShards.load(folder)
    shard.write_bytes(whole)
    assert len(PairShards.load(folder, sampler_recipe(teacher))) == 3

    for plan in ({"count": 3, "shard_size": 0}, {"count": 0, "shard_size": 2}):
        (folder / "pairs.json").write_text(json.dumps(plan))
        with pytest.raises(UserError) as exc:
            PairShards.load(folder)
        assert f"plans {plan['count']} pairs in shards of {plan['shard_size']}: not what make-pairs writes" in one_line(
            exc
        )
        args = ["make-pairs", "--model", "embedded-teacher", "--n", "3", "--out", str(folder)]
        capsys.readouterr()
        assert main(args) == 2
        assert "is not a file teacher pairs write" in capsys.readouterr().err
