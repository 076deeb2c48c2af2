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
import threading
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
    except RecursionError:  # 200000 '[': json's decoder recurses once a level
        raise UserError(f"prompt file '{path}', line {number}: nested too deeply to be a prompt") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UserError(f"prompt file '{path}', line {number}: cannot be read ({_reason(exc)})") from None


def _reason(exc: ValueError) -> str:
    """A ValueError's message up to its advice ('...: value has 5000 digits; use sys.set_...')."""
    return str(exc).split(":")[0].strip() or type(exc).__name__


def _prompt_of(record: Any, path: Path, where: str) -> str:
    prompt = None
    if isinstance(record, str):
        prompt = record
    elif isinstance(record, dict):
        prompt = next((record[f] for f in PROMPT_FIELDS if isinstance(record.get(f), str)), None)
    if prompt is None:
        raise UserError(
            f"prompt file '{path}', {where}: expected a string or an object with a "
            f"{' / '.join(repr(f) for f in PROMPT_FIELDS)} string field"
        )
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escape: a lone surrogate, no character
        bad = f"\\u{ord(prompt[exc.start]):04x}"
        raise UserError(f"prompt file '{path}', {where}: the prompt holds {bad} alone, which is not text") from None
    return prompt


def _describe(value: Any) -> str:
    """A JSON value in a few words, for a message (without dumping it: it may be large or deep)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "...", ensure_ascii=False)
    return "an object" if isinstance(value, dict) else "a list"


def _one_caption_per_image(annotations: list, path: Path) -> list[tuple[int, Any]]:
    """COCO gives about five captions per image: evaluations (COCO-5K, COCO-30K) take one per image,
    so that n prompts are n different images. Here: each image's first caption, images by id; with
    each record, its place in `annotations`.

    COCO's image ids are integers; ids that are all strings are ordered as strings. Any other id (a
    list, an object, a number with a fraction, true), or integers mixed with strings, is refused:
    it was a TypeError (unhashable, or not orderable)."""
    first: dict = {}
    kind: type | None = None
    for i, record in enumerate(annotations):
        key = record.get("image_id") if isinstance(record, dict) else None
        if key is None:  # not COCO's layout after all: every record as it is
            return list(enumerate(annotations))
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise UserError(f"prompt file '{path}', annotation {i}: image_id must be an integer, got {_describe(key)}")
        if kind is None:
            kind = type(key)
        elif type(key) is not kind:
            raise UserError(
                f"prompt file '{path}', annotation {i}: image_id must be "
                f"{'an integer' if kind is int else 'a string'} like annotation 0's, got {_describe(key)}"
            )
        first.setdefault(key, (i, record))
    return [first[k] for k in sorted(first)]


def _json_prompts(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"prompt file '{path}' is not JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:  # 200000 '[': json's decoder recurses once a level
        raise UserError(f"prompt file '{path}' is nested too deeply to be a prompt file") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise UserError(f"prompt file '{path}' cannot be read as JSON ({_reason(exc)})") from None
    if isinstance(data, dict) and "annotations" in data:  # COCO captions
        annotations = data["annotations"]
        if not isinstance(annotations, list):
            raise UserError(
                f"prompt file '{path}': COCO's \"annotations\" must be a list of captions, got {_describe(annotations)}"
            )
        pairs = _one_caption_per_image(annotations, path)
        return [_prompt_of(record, path, f"annotation {i}") for i, record in pairs]
    if not isinstance(data, list):
        raise UserError(f"prompt file '{path}': expected a JSON list of prompts or COCO's {{\"annotations\": [...]}}")
    return [_prompt_of(record, path, f"item {i}") for i, record in enumerate(data)]


# csv refuses a field over csv.field_size_limit() (131072 characters by default): a long caption in
# a 1 GiB prompt file is read, the limit raised for the read and put back after it. The limit is the
# process's: the lock keeps two reads from putting back each other's raised limit.
_CSV_FIELD_LIMIT = MAX_PROMPT_FILE_BYTES + 1
_csv_limit_lock = threading.Lock()
_TABLE = {",": "CSV", "\t": "TSV"}


def _table_prompts(text: str, path: Path, delimiter: str) -> list[str]:
    # newline="": csv splits rows itself (a lone \r ends one, as in a text file; a quoted field
    # keeps its line breaks), where a line holding a lone \r was a csv.Error.
    rows = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    with _csv_limit_lock:
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, _CSV_FIELD_LIMIT))
        try:
            columns = rows.fieldnames or []
            field = next((f for f in PROMPT_FIELDS if f in columns), None)
            if field is None:
                raise UserError(
                    f"prompt file '{path}' has no {' / '.join(repr(f) for f in PROMPT_FIELDS)} column "
                    f"(its header: {', '.join(repr(c) for c in columns[:6]) or 'none'})"
                )
            return [row[field] or "" for row in rows]
        except csv.Error as exc:
            raise UserError(
                f"prompt file '{path}', line {rows.reader.line_num}: not {_TABLE[delimiter]} ({exc})"
            ) from None
        finally:
            csv.field_size_limit(limit)
