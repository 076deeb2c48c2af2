"""Prompt files: plain lists and captioning datasets' own formats, read by suffix; bad ones in one line."""

import json

import pytest

from nitrofusion.cli import main
from nitrofusion.data.prompts import load_prompts
from nitrofusion.errors import UserError

WANT = ["a cat, sitting", "a dog", 'the "best" shoe']


@pytest.mark.parametrize(
    "name, content",
    [
        ("p.txt", 'a cat, sitting\n\n  a dog  \nthe "best" shoe\n'),
        ("p.jsonl", '{"prompt": "a cat, sitting"}\n\n"a dog"\n{"caption": "the \\"best\\" shoe", "id": 3}\n'),
        ("p.json", json.dumps(["a cat, sitting", {"text": "a dog"}, {"prompt": 'the "best" shoe'}])),
        (
            "captions_val2014.json",  # COCO's layout
            json.dumps({"images": [], "annotations": [{"image_id": i, "caption": c} for i, c in enumerate(WANT)]}),
        ),
        ("p.csv", 'id,caption\n1,"a cat, sitting"\n2,a dog\n3,"the ""best"" shoe"\n4,\n'),
        ("p.tsv", 'text\tid\na cat, sitting\t1\na dog\t2\nthe "best" shoe\t3\n'),
    ],
)
def test_each_format_gives_the_same_prompts(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert load_prompts(path) == WANT


def test_coco_captions_give_one_caption_per_image(tmp_path):
    """About five captions an image: n evaluation prompts must be n images (COCO-5K), each image's
    first caption, images in id order."""
    annotations = [
        {"image_id": 42, "id": 1, "caption": "a dog on a sofa"},
        {"image_id": 7, "id": 2, "caption": "a red bus"},
        {"image_id": 42, "id": 3, "caption": "a sleeping dog"},
        {"image_id": 7, "id": 4, "caption": "a bus in the street"},
        {"image_id": 9, "id": 5, "caption": "two cups"},
    ]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    assert load_prompts(path) == ["a red bus", "two cups", "a dog on a sofa"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', "line 2: not JSON"),
        ("p.jsonl", '{"prompt": "a"}\n{"label": 3}\n', "line 2: expected a string or an object with a 'prompt'"),
        ("p.json", '{"prompts": ["a"]}', "expected a JSON list of prompts or COCO's"),
        ("p.json", "[1, 2]", "item 0: expected a string"),
        ("p.json", '["a", ', "is not JSON"),
        ("p.csv", "id,label\n1,x\n", "has no 'prompt' / 'caption' / 'text' column (its header: 'id', 'label')"),
        ("p.csv", "caption\n\n", "has no prompts"),
        ("p.txt", "\n  \n", "has no prompts"),
    ],
)
def test_a_bad_prompt_file_is_one_line_naming_where(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_prompts(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_generate_reads_a_jsonl_prompt_file(tiny_sd15_dir, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"caption": "a cat"}\n{"caption": "a dog"}\n')
    args = ["generate", "--prompts", str(path), "--model", str(tiny_sd15_dir), "--sampler", "shift-lcm"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{")
    assert main([*args[:2], str(bad), *args[3:], "--out", str(tmp_path / "o2")]) == 2
    assert "line 1: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content",
    [
        ("p.txt", 'a cat, sitting\r\na dog\r\nthe "best" shoe\r\n'),
        ("p.jsonl", '"a cat, sitting"\n{"prompt": "a dog"}\n"the \\"best\\" shoe"\n'),
        ("p.json", json.dumps(WANT)),
        ("p.csv", 'prompt,id\n"a cat, sitting",1\na dog,2\n"the ""best"" shoe",3\n'),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_prompts(tmp_path, name, content):
    """Windows editors start UTF-8 with one: it stayed in the first prompt, hid a CSV's first column
    ('prompt' not found) and made a JSON file 'not JSON'."""
    path = tmp_path / name
    path.write_bytes("\ufeff".encode() + content.encode())
    assert load_prompts(path) == WANT


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_a_prompt_is_one_line_whatever_else_it_holds(tmp_path, separator):
    """str.splitlines also splits at these, which scraped captions hold: one prompt became two."""
    caption = f"a cat{separator}sitting on a mat"
    (tmp_path / "p.txt").write_text(f"{caption}\na dog\n", newline="")
    assert load_prompts(tmp_path / "p.txt") == [caption, "a dog"]
    if ord(separator) >= 0x20:  # JSON strings hold no raw control characters
        (tmp_path / "p.jsonl").write_text(json.dumps(caption, ensure_ascii=False) + '\n"a dog"\n', newline="")
        assert load_prompts(tmp_path / "p.jsonl") == [caption, "a dog"]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_every_line_ending_splits_prompts(tmp_path, ending):
    """Windows' \r\n and old Mac files' lone \r end a prompt as \n does (\r alone made one prompt)."""
    (tmp_path / "p.txt").write_bytes(ending.join(["a cat", "a dog", ""]).encode())
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]


def test_a_file_that_is_not_utf8_names_the_byte_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\n\xff")
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 9\)"):
        load_prompts(path)


def test_a_prompt_file_of_the_papers_size_is_read(tmp_path):
    """1M prompts of a few hundred bytes (the paper's Pick-a-Pic and LAION captions) are past the
    64 MiB that bounds other user files; they were refused."""
    from nitrofusion.data.prompts import read_prompt_file

    line = "a photo of a red leather bag on a long wooden table by the sea, golden hour, "
    path = tmp_path / "prompts.txt"
    with open(path, "w") as f:
        for i in range(900_000):
            f.write(f"{line}{i}\n")
    assert path.stat().st_size > 64 * 2**20
    prompts = read_prompt_file(path)
    assert len(prompts) == 900_000 and prompts[-1].endswith("899999")
