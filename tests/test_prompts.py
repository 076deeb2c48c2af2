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


def _refused(path, message):
    with pytest.raises(UserError, match=message) as err:
        load_prompts(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        # json's decoder recurses once a level: a RecursionError traceback
        ("p.json", "[" * 200_000, "is nested too deeply to be a prompt file"),
        ("p.json", "[" * 200_000 + "]" * 200_000, "is nested too deeply to be a prompt file"),
        ("p.jsonl", '"a"\n' + "[" * 200_000 + "\n", "line 2: nested too deeply to be a prompt"),
        # an integer past sys.get_int_max_str_digits(): a ValueError that is not a JSONDecodeError
        ("p.json", "[" + "1" * 5000 + "]", r"cannot be read as JSON \(Exceeds the limit"),
        ("p.jsonl", '"a"\n' + "1" * 5000 + "\n", r"line 2: cannot be read \(Exceeds the limit"),
        # JSON's "\ud800" escape is no character: each later step that encodes the prompt failed
        ("p.json", '["a", "x\\ud800y"]', r"item 1: the prompt holds \\ud800 alone, which is not text"),
        ("p.jsonl", '{"prompt": "\\udfff"}\n', r"line 1: the prompt holds \\udfff alone"),
    ],
)
def test_json_a_parser_cannot_read_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    _refused(path, message)


def _coco(*records):
    return json.dumps({"images": [], "annotations": list(records)})


@pytest.mark.parametrize(
    "content, message",
    [
        # unhashable ids were a TypeError, ids mixing integers and strings one in sorted()
        (_coco({"image_id": [1], "caption": "x"}), "annotation 0: image_id must be an integer, got a list"),
        (_coco({"image_id": {}, "caption": "x"}), "annotation 0: image_id must be an integer, got an object"),
        (
            _coco({"image_id": 1, "caption": "x"}, {"image_id": "a", "caption": "y"}),
            'annotation 1: image_id must be an integer like annotation 0\'s, got "a"',
        ),
        (
            _coco({"image_id": "a", "caption": "x"}, {"image_id": 1, "caption": "y"}),
            "annotation 1: image_id must be a string like annotation 0's, got 1",
        ),
        # true is 1 to a dict, 1.0 too: two images' captions became one
        (_coco({"image_id": 1, "caption": "x"}, {"image_id": True, "caption": "y"}), "annotation 1: .* got true"),
        (_coco({"image_id": 1, "caption": "x"}, {"image_id": 1.0, "caption": "y"}), "annotation 1: .* got 1.0"),
        # a bad caption is named by its place in the file, not among the captions kept ("item 0")
        (
            _coco({"image_id": 2, "caption": "x"}, {"image_id": 1, "caption": None}),
            "annotation 1: expected a string or an object with a 'prompt'",
        ),
        ('{"annotations": 3}', 'COCO\'s "annotations" must be a list of captions, got 3'),
        ('{"annotations": null}', 'COCO\'s "annotations" must be a list of captions, got null'),
        ('{"annotations": {"caption": "x"}}', 'COCO\'s "annotations" must be a list of captions, got an object'),
    ],
)
def test_a_bad_coco_captions_file_is_one_line_naming_the_annotation(tmp_path, content, message):
    path = tmp_path / "captions_val2014.json"
    path.write_text(content)
    _refused(path, message)


def test_coco_image_ids_that_are_all_strings_are_read_as_before(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(_coco({"image_id": "b", "caption": "x"}, {"image_id": "a", "caption": "y"}, {"caption": "z"}))
    assert load_prompts(path) == ["x", "y", "z"]  # a record without an id: not COCO's layout, all kept
    path.write_text(_coco({"image_id": "b", "caption": "x"}, {"image_id": "a", "caption": "y"}))
    assert load_prompts(path) == ["y", "x"]


@pytest.mark.parametrize("name, delimiter", [("p.csv", ","), ("p.tsv", "\t")])
def test_a_table_with_a_prompt_past_the_csv_field_limit_is_read(tmp_path, name, delimiter):
    """csv refuses a field over 131072 characters (a csv.Error traceback); a text or JSON Lines file
    holds such a prompt, and a 1 GiB prompt file can. The process's limit is left as it was."""
    import csv

    long = "a long caption " * 14_000  # 210 kB
    path = tmp_path / name
    path.write_text(f"id{delimiter}caption\n1{delimiter}{long}\n2{delimiter}a dog\n")
    before = csv.field_size_limit()
    assert load_prompts(path) == [long.strip(), "a dog"]
    assert csv.field_size_limit() == before


def test_a_table_with_old_mac_line_endings_is_read(tmp_path):
    r"""A lone \r ends a line in a text file; in a CSV row it was csv's 'new-line character seen in
    unquoted field' traceback. A quoted field keeps its line breaks, as before."""
    path = tmp_path / "p.csv"
    path.write_bytes(b'id,caption\r1,a cat\r2,"a dog\r\non a mat"\r3,a\r4,b\n')
    assert load_prompts(path) == ["a cat", "a dog\r\non a mat", "a", "b"]


def test_any_other_csv_error_is_one_line(tmp_path, monkeypatch):
    import csv

    from nitrofusion.data import prompts

    monkeypatch.setattr(prompts, "_CSV_FIELD_LIMIT", 10)
    before = csv.field_size_limit(10)
    try:
        path = tmp_path / "p.tsv"
        path.write_text("caption\nshort\nfar longer than ten\n")
        _refused(path, r"line 3: not TSV \(field larger than field limit \(10\)\)")
        assert csv.field_size_limit() == 10
    finally:
        csv.field_size_limit(before)


def test_generate_refuses_a_too_deeply_nested_prompt_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text("[" * 200_000)
    assert main(["generate", "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
