"""Prompt sources: a text file (one prompt a line) or the embedded world's prompts."""

from __future__ import annotations

from pathlib import Path

from nitrofusion.errors import UserError
from nitrofusion.userfiles import read_user_text


def load_prompts(source: str | Path) -> list[str]:
    if str(source) == "embedded":
        from nitrofusion.world.data import all_prompts

        return [p for p, _ in all_prompts()]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' not found (give a text file with one prompt a line, or 'embedded')")
    prompts = [line.strip() for line in read_user_text(path, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' has no prompts")
    return prompts
