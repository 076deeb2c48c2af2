"""Prompt sources: a prompt file, or the embedded world's prompts.

Prompt sets come as plain lists and as captioning datasets' own files, so a file is read by
its suffix:

- `.txt` (or any other suffix): one prompt a line;
- `.jsonl`: one JSON value a line, a string or an object with a prompt field;
- `.json`: a list of such values, or COCO's captions file (`{"annotations": [{"caption": ...}]}`),
  which is what the paper's COCO-5k prompts are drawn from;
- `.csv` / `.tsv`: a header row naming a prompt column.

A prompt field is the first of `PROMPT_FIELDS` that a record has.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from nitrofusion.errors import UserError
from nitrofusion.userfiles import read_user_text

PROMPT_FIELDS = ("prompt", "caption", "text")


def load_prompts(source: str | Path) -> list[str]:
    if str(source) == "embedded":
        from nitrofusion.world.data import all_prompts

        return [p for p, _ in all_prompts()]
    path = Path(source)
    if not path.exists():
        raise UserError(f"prompt file '{path}' not found (give a text file with one prompt a line, or 'embedded')")
    if not path.is_file():  # a folder, a device (/dev/zero), a FIFO
        raise UserError(f"prompt file '{path}' is not a regular file (give a text file with one prompt a line)")
    return read_prompt_file(path)


# The paper trained on 1M prompts (Pick-a-Pic and LAION captions, a few hundred bytes each as
# JSONL): past the 64 MiB that bounds other user files, which refused them.
MAX_PROMPT_FILE_BYTES = 2**30


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts in a file, by its suffix (module docstring); blank prompts are dropped."""
    path = Path(path)
    text = read_user_text(path, "prompt file", MAX_PROMPT_FILE_BYTES)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = [_prompt_of(_json_line(line, path, i), path, f"line {i}") for i, line in _lines(text)]
    elif suffix == ".json":
        prompts = _json_prompts(text, path)
    elif suffix in (".csv", ".tsv"):
        prompts = _table_prompts(text, path, "\t" if suffix == ".tsv" else ",")
    else:
        prompts = [line for _, line in _lines(text)]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' has no prompts")
    return prompts


def _lines(text: str) -> list[tuple[int, str]]:
    r"""The non-blank lines, numbered. Split at \r\n, \n or \r (old Mac files) only:
    str.splitlines also splits at U+2028, U+2029, \x85, \x0b, \x0c and \x1c-\x1e, which scraped
    captions hold inside a prompt (and JSON Lines inside a string)."""
    lines = re.split(r"\r\n|\n|\r", text)
    return [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file '{path}', line {number}: not JSON ({exc.msg})") from None


def _prompt_of(record: Any, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for field in PROMPT_FIELDS:
            if isinstance(record.get(field), str):
                return record[field]
    raise UserError(
        f"prompt file '{path}', {where}: expected a string or an object with a "
        f"{' / '.join(repr(f) for f in PROMPT_FIELDS)} string field"
    )


def _one_caption_per_image(annotations: list) -> list:
    """COCO gives about five captions per image: evaluations (COCO-5K, COCO-30K) take one per image,
    so that n prompts are n different images. Here: each image's first caption, images by id."""
    first: dict = {}
    for record in annotations:
        key = record.get("image_id") if isinstance(record, dict) else None
        if key is None:  # not COCO's layout after all: every record as it is
            return annotations
        first.setdefault(key, record)
    return [first[k] for k in sorted(first)]


def _json_prompts(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file '{path}' is not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions
        data = _one_caption_per_image(data["annotations"])
    if not isinstance(data, list):
        raise UserError(f"prompt file '{path}': expected a JSON list of prompts or COCO's {{\"annotations\": [...]}}")
    return [_prompt_of(record, path, f"item {i}") for i, record in enumerate(data)]


def _table_prompts(text: str, path: Path, delimiter: str) -> list[str]:
    rows = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = rows.fieldnames or []
    field = next((f for f in PROMPT_FIELDS if f in columns), None)
    if field is None:
        raise UserError(
            f"prompt file '{path}' has no {' / '.join(repr(f) for f in PROMPT_FIELDS)} column "
            f"(its header: {', '.join(repr(c) for c in columns[:6]) or 'none'})"
        )
    return [row[field] or "" for row in rows]
