"""`nitrofusion reproduce` end to end on the embedded world, cut to a few iterations."""

import json
import shutil

import yaml

from nitrofusion.cli import main
from nitrofusion.evaluation.reproduce import ABLATIONS, FAMILY, FLOW, FLOW_REGRESSION, Reproduction

TINY = [
    "loss.pretrain_steps=2",
    "refine.steps_per_stage=[2,1,0,1]",
    "data.pairs=null",
    "data.batch_size=2",
    "data.teacher_steps=2",
    "run.validate_every=0",
]


def in_this_process(monkeypatch) -> list[list[str]]:
    """Run reproduce's `python -m nitrofusion.cli distill ...` children through the CLI's main in
    the test's own process: the same command lines, parsed by the same CLI, without paying the
    ~9 s of importing torch, diffusers and transformers again for each of the nine runs."""
    import subprocess
    import sys

    from nitrofusion.evaluation import reproduce

    commands = []

    def run(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-m", "nitrofusion.cli"]
        commands.append(cmd[3:])
        return subprocess.CompletedProcess(cmd, main(cmd[3:]))

    monkeypatch.setattr(reproduce.subprocess, "run", run)
    return commands


def test_reproduce_runs_every_row_and_resumes(tmp_path, capsys, monkeypatch):
    import nitrofusion.pipelines

    commands = in_this_process(monkeypatch)
    loads = []
    load_pipeline = nitrofusion.pipelines.load_pipeline
    monkeypatch.setattr(
        nitrofusion.pipelines, "load_pipeline", lambda *a, **k: loads.append(a) or load_pipeline(*a, **k)
    )
    out = tmp_path / "repro"
    args = ["reproduce", "--seeds", "0", "--n", "4", "--batch-size", "4", "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in rows]
    assert len(loads) == len(set(names)), "a model scored at several step counts is loaded once"
    assert names.count("NitroFusion student") == 3  # 1, 2 and 4 steps
    assert all(v.name in names for v in ABLATIONS)
    for v in FAMILY:  # the family at equal compute: 1, 2 and 4 steps each
        assert names.count(f"{v.name} student") == 3
    assert names.count(f"{FLOW.name} student") == 3 and names.count(f"{FLOW_REGRESSION.name} student") == 1
    assert [r["steps"] for r in rows if r["model"] == "flow teacher (Euler, CFG 5)"] == [28, 1, 2, 4]
    assert len(commands) == 11 and all(c[:2] == ["distill", "--preset"] for c in commands)
    ablation_iters = {r["iterations"] for r in rows if r["group"] == "ablation"}
    assert ablation_iters == {4}, "ablations are compared at equal iterations (regression + one-step stage)"

    def run_config(slug):
        return yaml.safe_load((out / "runs" / slug / "seed-0" / "config.yaml").read_text())

    assert run_config("no-dynamic-pool")["discriminator"]["pool"] is False
    assert run_config("no-refresh")["discriminator"]["refresh_fraction"] == 0.0
    assert run_config("no-local-heads")["discriminator"]["kinds"] == ["global_cond"]
    assert run_config("no-unconditional-heads")["discriminator"]["kinds"] == ["global_cond", "local_cond"]
    assert run_config("no-regression-anchor")["loss"]["regression_weight"] == 0
    assert run_config("nitrofusion")["loss"]["regression_weight"] > 0
    regression = run_config("regression-only")
    assert regression["loss"]["pretrain_steps"] == 4 and regression["refine"]["steps_per_stage"] == [0]
    assert run_config("nitrofusion")["refine"]["steps_per_stage"] == [2, 1, 0, 1]
    for slug, objective in (("DMD2", "dmd2"), ("DMDX", "adm")):
        cfg = run_config(slug)
        assert cfg["loss"]["objective"] == objective
        assert cfg["refine"]["steps_per_stage"] == [2, 1, 0, 1] and cfg["data"]["batch_size"] == 2
    assert run_config("DMDX")["loss"]["pretrain_kind"] == "adversarial"
    flow = run_config(FLOW.slug)  # the flow preset's 4-step stages, under the reproduction's --set
    assert flow["model"]["teacher"] == "embedded-flow-teacher" and flow["refine"]["steps_per_stage"] == [2, 1, 0, 1]
    flow_regression = run_config(FLOW_REGRESSION.slug)
    assert flow_regression["loss"]["pretrain_steps"] == 4 and flow_regression["refine"]["steps_per_stage"] == [0]
    equal = {r["model"]: r["iterations"] for r in rows if r["group"] == "flow" and r["steps"] == 1}
    assert equal[f"{FLOW_REGRESSION.name} student"] == equal[f"{FLOW.name}, one-step stage"] == 4
    report = (out / "results.md").read_text()
    assert "±" in report and "Ablations at equal iterations" in report and "The family at equal compute" in report
    assert "The flow world" in report
    assert (out / "grid.png").is_file()

    # Everything is cached: a second call trains and samples nothing, even without the runs
    # (the scores are what a later session keeps).
    shutil.rmtree(out / "runs")
    before = {p: p.stat().st_mtime for p in (out / "scores").iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "== distill" not in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime for p in (out / "scores").iterdir()}

    # --tables: only the named groups are recomputed; the others stay in the table from the cache.
    stale = [p for p in (out / "scores").iterdir() if p.name.startswith("teacher-native-1-")]
    for p in stale:
        p.unlink()
    assert main([*args, "--tables", "student"]) == 0
    assert not any(p.exists() for p in stale), "a group not named was recomputed"
    rows = json.loads((out / "results.json").read_text())
    assert {r["group"] for r in rows} == {"teacher", "student", "family", "ablation", "flow"}

    # Scores of another sample count are not reported as this one's.
    capsys.readouterr()
    assert main([a if a != "4" else "6" for a in args]) == 2
    assert "scored on 4 images, this reproduction asks --n 6" in capsys.readouterr().err


def test_a_finished_run_is_reused_only_if_trained_with_this_config(tmp_path):
    import pytest

    from nitrofusion.errors import UserError
    from nitrofusion.training.config import load_config, save_config

    cfg = load_config("embedded", None, ["run.seed=3", f"run.output_dir={tmp_path}"])
    save_config(cfg, tmp_path / "config.yaml")
    want = cfg.to_dict()
    Reproduction._check_trained_as(tmp_path, want)
    Reproduction._check_trained_as(tmp_path, {**want, "run": {**want["run"], "log_every": 7}})  # cadence only
    other = load_config("embedded", None, ["run.seed=3", "loss.regression_weight=0"]).to_dict()
    with pytest.raises(UserError, match="trained with loss.regression_weight=10.0, this reproduction asks 0"):
        Reproduction._check_trained_as(tmp_path, other)


def test_a_stopped_run_resumes_only_with_the_config_it_was_started_with(tmp_path, monkeypatch):
    """A run stopped before its student was written resumed under a changed --set (distill refuses
    only the settings its checkpoints cannot load under, and wrote the new config over the old):
    its student was then reported as the new config's."""
    import subprocess

    import pytest

    from nitrofusion.errors import UserError
    from nitrofusion.evaluation.reproduce import FULL
    from nitrofusion.training.config import save_config

    launched = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    started = Reproduction(tmp_path, [0], 4, overrides=["optim.lr=5e-5"])
    run = started.run_dir(FULL, 0)
    run.mkdir(parents=True)
    save_config(load_config_dict(started.run_config(FULL, 0)), run / "config.yaml")
    assert started.distill(FULL, 0) == run and len(launched) == 1  # resumed as started
    changed = Reproduction(tmp_path, [0], 4, overrides=["optim.lr=1e-4"])
    with pytest.raises(UserError, match=r"was started with optim.lr=5e-05, this reproduction asks 0.0001"):
        changed.distill(FULL, 0)
    assert len(launched) == 1


def load_config_dict(values: dict):
    from nitrofusion.training.config import load_config

    return load_config(None, None, settings=values)


def test_reproduce_bad_options_are_one_line(tmp_path, capsys):
    for extra, needle in (
        (["--n", "1"], "--n"),
        (["--set", "loss.kind=bogus"], "loss.kind"),
        (["--tables", "students"], "students"),
    ):
        assert main(["reproduce", "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_reproduce_refuses_a_set_of_what_each_run_sets_itself(tmp_path, capsys, monkeypatch):
    """`--set run.seed=...` or `run.output_dir=...` was accepted, then overridden in every run."""

    def reached(self):
        raise AssertionError("the --set was accepted")

    monkeypatch.setattr(Reproduction, "run", reached)
    for override, needle in (
        ("run.seed=5", "use --seeds"),
        (f"run.output_dir={tmp_path / 'x'}", "use --out"),
        (" run.seed = 5", "use --seeds"),
        ("run={seed: 5}", "use --seeds"),  # the section as one mapping
    ):
        assert main(["reproduce", "--out", str(tmp_path / "r"), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_ablation_that_changes_nothing_in_the_preset_is_skipped(tmp_path):
    no_anchor = next(v for v in ABLATIONS if v.slug == "no-regression-anchor")
    regression_only = next(v for v in ABLATIONS if v.slug == "regression-only")  # its change is the schedule
    anchored = Reproduction(tmp_path, [0], 4)
    plain = Reproduction(tmp_path, [0], 4, overrides=["loss.regression_weight=0"])
    assert not anchored.changes_nothing(no_anchor) and plain.changes_nothing(no_anchor)
    assert not plain.changes_nothing(regression_only)


def _scored_without_sampling(monkeypatch) -> None:
    """Scores from a stand-in for sampling and distilling: what is tested is which cached score is
    reused for which reproduction, not the numbers."""
    from PIL import Image

    from nitrofusion.evaluation import reproduce
    from nitrofusion.evaluation.embedded import EmbeddedScore

    def score_pipeline(pipe, evaluator, steps, n, seed, batch_size, label):
        score = EmbeddedScore(label, "shift-lcm", steps, 0.0, n, 0.5, 100.0 + seed, 0.01)
        return score, [Image.new("RGB", (32, 32))] * n

    monkeypatch.setattr(reproduce, "score_pipeline", score_pipeline)
    monkeypatch.setattr(Reproduction, "_pipeline", lambda self, unet=None, sampler="auto", flow=False: lambda: None)


def test_a_cached_score_is_reused_only_for_its_config_and_evaluator(tmp_path, monkeypatch):
    """score() checked only n: a second reproduction into the same --out with another --set (or
    another evaluator) reported the old students' numbers as its own."""
    import pytest

    from nitrofusion.errors import UserError

    _scored_without_sampling(monkeypatch)
    out = tmp_path / "repro"
    Reproduction(out, [0], 4, overrides=TINY).run()
    Reproduction(out, [0], 4, overrides=TINY).run()  # the same reproduction: every score reused
    with pytest.raises(UserError, match="scored for a run trained with loss.regression_weight=10.0, this .* asks 0"):
        Reproduction(out, [0], 4, overrides=[*TINY, "loss.regression_weight=0"]).run()
    with pytest.raises(UserError, match="scored for a run trained with loss.regression_weight"):  # tabulating too
        Reproduction(out, [0], 4, overrides=[*TINY, "loss.regression_weight=0"], report_only=True).run()
    other_evaluator = Reproduction(out, [0], 4, overrides=TINY)
    other_evaluator.evaluator_sha256 = "0" * 64
    with pytest.raises(UserError, match="teacher-native-25-seed0.json' was scored with another evaluator"):
        other_evaluator.run()

    # A score of an older version records neither: tabulated by --report-only, refused by a run that
    # would report it as this config's.
    legacy = out / "scores" / "nitrofusion-final-1-seed0.json"
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "scored_with"}))
    with pytest.raises(UserError, match="does not record the evaluator and training config .* --report-only"):
        Reproduction(out, [0], 4, overrides=TINY).run()
    rows = Reproduction(out, [0], 4, overrides=TINY, report_only=True).run()
    assert any(r.model == "NitroFusion student" and r.steps == 1 for r in rows)


def test_the_committed_scores_are_still_tabulated_by_report_only(tmp_path):
    """docs/results/scores predate the recorded evaluator and config: --report-only reads them and
    gives the committed tables' numbers."""
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs" / "results"
    out = tmp_path / "repro"
    shutil.copytree(docs / "scores", out / "scores")
    shutil.copytree(docs / "samples", out / "samples")
    Reproduction(out, [0, 1, 2], 1000, report_only=True).run()
    assert json.loads((out / "results.json").read_text()) == json.loads((docs / "results.json").read_text())
    # The scores alone (no samples to put in the grid): the tables, no grid (it was a ValueError traceback)
    alone = tmp_path / "alone"
    shutil.copytree(docs / "scores", alone / "scores")
    Reproduction(alone, [0, 1, 2], 1000, report_only=True).run()
    assert (alone / "results.md").read_text() == (out / "results.md").read_text()
    assert not (alone / "grid.png").exists()


def test_runs_saved_before_a_config_key_existed_are_compared_as_what_they_trained_with():
    """discriminator.text_init was added after the embedded runs were trained with He init (the
    presets now pin it): a saved config without the key was read as None and every kept run was
    refused. A missing key reads as the value before it existed."""
    from nitrofusion.evaluation.reproduce import _config_difference
    from nitrofusion.training.config import load_config

    want = load_config("embedded", None, []).to_dict()
    saved = {section: dict(values) for section, values in want.items()}
    del saved["discriminator"]["text_init"]
    del saved["model"]["flow_levels"]  # added later still (it shapes flow students, which reproduce does not train)
    assert _config_difference(saved, want) is None
    neutral = load_config("embedded", None, ["discriminator.text_init=neutral"]).to_dict()
    assert "discriminator.text_init='he'" in _config_difference(saved, neutral)
