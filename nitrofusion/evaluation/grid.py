"""Image grids: rows of samples (one row per model or setting), written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from nitrofusion.userfiles import replacing

LABEL_WIDTH = 190  # room for labels such as "teacher (Euler, CFG 5), 25" on one line
LINE_HEIGHT = 12  # PIL's default font's 11 px, and a pixel between lines


def wrap_label(draw: ImageDraw.ImageDraw, text: str, width: int, max_lines: int) -> list[str]:
    """`text` in lines of at most `width` pixels, at word breaks (a word wider than a line is cut):
    a long label keeps its end, where evaluate puts the step count, unless it needs more than
    `max_lines` (a row's height), where the last line shown ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        while draw.textlength(word) > width and len(word) > 1:
            word = word[:-1]
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,") + "..."
    return lines or [""]


def make_grid(
    rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None, scale: int = 1, pad: int = 2
) -> Image.Image:
    """Paste rows of equally sized images into one picture, with an optional label per row."""
    if not rows or not rows[0]:
        raise ValueError("make_grid needs at least one image")
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    ncols = max(len(r) for r in rows)
    left = LABEL_WIDTH if labels else 0
    grid = Image.new("RGB", (left + ncols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (h + pad)
        if labels:
            lines = wrap_label(draw, labels[r], LABEL_WIDTH - 8, max(1, h // LINE_HEIGHT))
            top = y + (h - LINE_HEIGHT * len(lines)) // 2
            for i, line in enumerate(lines):
                draw.text((4, top + i * LINE_HEIGHT), line, fill="black")
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (left + pad + c * (w + pad), y))
    return grid


def grid_from_dirs(dirs: Sequence[str | Path], out: str | Path, scale: int = 3, limit: int = 16) -> Path:
    """One row per directory of PNGs (sorted by name), labelled with the directory name."""
    rows, labels = [], []
    target = Path(out).expanduser().resolve()
    for d in dirs:
        files = sorted(Path(d).glob("*.png"))[:limit]
        if any(f.resolve() == target for f in files):  # the grid would replace one of its own images
            raise ValueError(f"--out '{out}' is one of the images in {d}: name a new file")
        if not files:
            raise ValueError(f"no PNG files in {d}")
        try:
            rows.append([Image.open(f).convert("RGB") for f in files])
        except OSError as exc:  # PIL's UnidentifiedImageError is one too
            raise ValueError(f"cannot read an image in {d}: {exc}") from None
        labels.append(Path(d).name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The format from the name the user gave (the temporary name beside it has no telling suffix).
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    with replacing(out) as tmp:
        make_grid(rows, labels, scale=scale).save(tmp, format=fmt)
    return out
