"""Training curves: metrics.jsonl holds every iteration once, through a resume, and curves.png draws it."""

import json

import pytest
from helpers import config
from PIL import Image

from nitrofusion.training import distill as distill_module
from nitrofusion.training.curves import MetricsLog, plot_curves, smooth
from nitrofusion.training.distill import Distiller


def test_metrics_log_appends_reads_and_forgets_what_a_resume_redoes(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for step in range(1, 6):
        log.record(step, {"g_loss": step / 10})
    assert not log.path.exists()  # nothing written before a flush
    log.flush()
    log.record(6, {"g_loss": 0.6})
    with open(log.path, "a") as f:
        f.write('{"step": 7, "g_lo')  # a line cut short by a kill
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5]
    log.keep_until(3)
    assert log.pending == [] and [r["step"] for r in log.read()] == [1, 2, 3]
    log.record(4, {"g_loss": 1.0, "d_loss": float("nan"), "skipped": float("inf")})
    log.flush()
    assert log.read()[-1] == {"step": 4, "g_loss": 1.0, "d_loss": None, "skipped": None}
    assert "NaN" not in log.path.read_text() and "Infinity" not in log.path.read_text()  # strict JSON


def test_smoothing_is_debiased_and_follows_a_step():
    assert smooth([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    out = smooth([0.0] * 5 + [1.0] * 50, span=5)
    assert out[4] == 0.0 and 0.0 < out[5] < 1.0 and out[-1] == pytest.approx(1.0, abs=1e-6)


def test_curves_draw_a_panel_per_logged_quantity(tmp_path):
    assert plot_curves([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    one = [{"step": s, "g_loss": 1 / s} for s in range(1, 30)]
    two = [{**r, "real_logit": 0.1, "fake_logit": None} for r in one]  # non-finite values (null) are left out
    heights = {}
    for name, records in (("one", one), ("two", two)):
        path = plot_curves(records, tmp_path / f"{name}.png", phases=[(0, "1 step"), (10, "2 steps")])
        with Image.open(path) as image:
            assert image.format == "PNG"
            heights[name] = image.size[1]
    assert heights["two"] > heights["one"]


def test_a_resumed_run_logs_every_iteration_once_as_an_uninterrupted_one(tiny_sdxl_dir, tmp_path, monkeypatch):
    common = ["loss.pretrain_steps=2", "refine.steps_per_stage=[3,2]", "run.log_every=1", "run.checkpoint_every=3"]
    Distiller(config(tiny_sdxl_dir, tmp_path / "a", *common), progress=False).train()

    def crash_mid_step_6(name: str, step: int) -> None:
        if name == "step" and step == 5:  # 0-based: iterations 1..5 are logged, the checkpoint is at 3
            raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "kill_point", crash_mid_step_6)
    with pytest.raises(KeyboardInterrupt):
        Distiller(config(tiny_sdxl_dir, tmp_path / "b", *common), progress=False).train()
    assert [r["step"] for r in MetricsLog(tmp_path / "b" / "metrics.jsonl").read()] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    Distiller(config(tiny_sdxl_dir, tmp_path / "b", *common), progress=False).train(resume="latest")
    assert "resumed from step 3" in (tmp_path / "b" / "log.txt").read_text()  # not trained again from 0

    def records(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records("b")] == list(range(1, 8))
    Distiller(config(tiny_sdxl_dir, tmp_path / "a", *common), progress=False).train()  # again, not resumed
    assert [r["step"] for r in records("a")] == list(range(1, 8))
    assert records("a") == records("b")  # the same numbers: a resume is the same training
    assert "pretrain_g_loss" in records("a")[0] and "g_loss" in records("a")[-1]
    assert "real_logit" in records("a")[-1]
    with Image.open(tmp_path / "b" / "curves.png") as image:
        assert image.format == "PNG" and image.size[1] > 600  # pre-training, student, critic, critic outputs


def test_a_figure_that_cannot_be_drawn_is_reported_in_one_line_not_raised(tmp_path):
    from nitrofusion.training.curves import try_plot_curves

    (tmp_path / "file").write_text("")
    said = []
    records = [{"step": 1, "g_loss": 1.0}]
    assert try_plot_curves(records, tmp_path / "file" / "curves.png", said.append) is None  # its folder is a file
    assert len(said) == 1 and "not drawn" in said[0] and "\n" not in said[0]
    assert try_plot_curves(records, tmp_path / "curves.png", said.append) == tmp_path / "curves.png"
