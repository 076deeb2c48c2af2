"""Training curves: every iteration's logged numbers in `metrics.jsonl`, drawn as `curves.png`.

TensorBoard keeps one iteration in `run.log_every`; a GAN's health is read from all of them
(does the critic's output on real and fake samples stay apart without one side collapsing,
does the student's loss follow the critic's). The file is a line of JSON per iteration, so it
is read by anything; a resumed run first drops the lines after its checkpoint, which the killed
run had written and the resumed one will write again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nitrofusion.userfiles import replacing

# (panel title, logged keys drawn in it). A panel is drawn when the run logged any of its keys.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pre-training losses", ("pretrain_g_loss", "pretrain_d_loss")),
    ("student loss", ("g_loss",)),
    ("critic loss", ("d_loss",)),
    ("critic's mean output: teacher samples vs student samples", ("real_logit", "fake_logit")),
    ("pixel critic's mean output (pre-training)", ("pixel_real_logit", "pixel_fake_logit")),
    ("MSE of the student's x0 to the teacher's (regression)", ("regression",)),
    ("DMD2 distribution-matching loss", ("dm_loss",)),
    ("fake score's denoising loss", ("fake_loss",)),
)


class MetricsLog:
    """`metrics.jsonl`: {"step": s, ...the iteration's logs}, appended in batches (`flush`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.pending: list[dict[str, float | None]] = []

    def record(self, step: int, logs: dict[str, float]) -> None:
        # A non-finite value is written as null: strict JSON has no NaN (a skipped step logs one).
        values = {k: float(v) if math.isfinite(v) else None for k, v in logs.items()}
        self.pending.append({"step": step, **values})

    def flush(self) -> None:
        if not self.pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.writelines(map(_line, self.pending))
        self.pending.clear()

    def read(self) -> list[dict[str, float | None]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill mid-write
                continue
        return records

    def keep_until(self, step: int) -> None:
        """Drop what was logged after `step` (a resume from that step's checkpoint logs it again)."""
        self.pending = [r for r in self.pending if r["step"] <= step]
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get("step", math.inf) <= step]
        with replacing(self.path) as tmp:
            tmp.write_text("".join(map(_line, kept)))


def _line(record: dict[str, float | None]) -> str:
    return json.dumps(record, allow_nan=False) + "\n"  # strict JSON: non-finite values are null by now


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot_curves(
    records: Iterable[dict[str, float | None]],
    path: str | Path,
    phases: Sequence[tuple[int, str]] = (),
    title: str = "",
    panels: Sequence[tuple[str, Sequence[str]]] = PANELS,
) -> Path | None:
    """Draw the logged curves, a panel per quantity, as a PNG (atomically). `phases`: (first
    iteration, name) of each training phase, marked on every panel; `panels`: (title, keys), a
    panel drawn where any of its keys was logged. None if nothing was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in records if "step" in r]
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    last = max(r["step"] for r in records)
    # Fixed margins, in inches, rather than a layout engine: that would draw the figure twice
    # (half a second more per draw, at every validation). The right margin holds the legends.
    height = 0.9 + 2.0 * len(panels)
    fig = Figure(figsize=(8, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.76, top=1 - 0.65 / height, bottom=0.45 / height, hspace=0.3)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colours = ("tab:blue", "tab:orange")
    for ax, (panel, keys) in zip(axes, panels):
        for key, colour in zip(keys, colours):
            points = [(r["step"], v) for r in records if isinstance(v := r.get(key), float | int) and math.isfinite(v)]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, max(1, len(values) // 40)), color=colour, linewidth=1.6, label=key)
        ax.set_title(panel, fontsize=9, loc="left")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: clear of the phase names
        ax.grid(alpha=0.3)
        for start, _ in phases[1:]:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_xlim(0, max(last, 1))  # from iteration 0, where the first phase starts
    for i, (start, name) in enumerate(phases):
        if start <= last:  # staggered: a short phase's name would overwrite the next one's
            axes[0].annotate(
                name, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3 - 10 * (i % 2)),
                textcoords="offset points", va="top", fontsize=8, color="dimgrey", annotation_clip=True,
            )  # fmt: skip
    axes[-1].set_xlabel("iteration")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def try_plot_curves(
    records: Iterable[dict[str, float | None]], path: str | Path, report: Callable[[str], None], **kwargs
) -> Path | None:
    """`plot_curves`, for training loops: a plotting error is reported in one line, never raised,
    since a figure is not worth a lost run or a masked training error."""
    try:
        return plot_curves(records, path, **kwargs)
    except Exception as exc:
        report(f"{path} not drawn ({type(exc).__name__}: {exc}); metrics.jsonl beside it has the numbers")
        return None
