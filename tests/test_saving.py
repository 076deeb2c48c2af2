"""Pipeline folders written here hold their CLIP tokenizers as vocab.json + merges.txt."""

import pytest
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from nitrofusion.pipelines.saving import save_pipeline
from nitrofusion.testing import tiny_sdxl_pipeline

PROMPTS = ["a photo of a sneaker", "A  Bag, ÄÖ é 😀 <|endoftext|> it's", "x " * 200, ""]


def ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=77).input_ids


def test_tokenizers_are_written_as_vocab_and_merges_and_read_back_the_same(tmp_path):
    pipe = tiny_sdxl_pipeline()
    save_pipeline(pipe, tmp_path / "p")
    for name in ("tokenizer", "tokenizer_2"):
        assert sorted(p.name for p in (tmp_path / "p" / name).iterdir()) == [
            "merges.txt",
            "tokenizer_config.json",
            "vocab.json",
        ]
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "p")
    for name in ("tokenizer", "tokenizer_2"):
        before, after = pipe.components[name], loaded.components[name]
        assert after.get_vocab() == before.get_vocab() and after.model_max_length == before.model_max_length
        assert all(ids(after, p) == ids(before, p) for p in PROMPTS)


def test_a_tokenizer_that_has_encoded_prompts_is_written_so_too(tmp_path):
    """A pipeline's call leaves truncation and padding set on its tokenizers' backends: the
    tokenizers of a teacher that had encoded prompts (every distill export) kept their tokenizer.json."""
    pipe = tiny_sdxl_pipeline()
    before = ids(pipe.tokenizer, PROMPTS[1])
    backend = pipe.tokenizer.backend_tokenizer
    settings = (backend.truncation, backend.padding)
    assert None not in settings  # as a pipeline's call leaves them
    save_pipeline(pipe, tmp_path / "p")
    for name in ("tokenizer", "tokenizer_2"):
        assert not (tmp_path / "p" / name / "tokenizer.json").exists(), name
    assert (backend.truncation, backend.padding) == settings, "the pipeline's own tokenizer is as it was"
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "p" / "tokenizer")
    assert all(ids(loaded, p) == ids(pipe.tokenizer, p) for p in PROMPTS) and ids(loaded, PROMPTS[1]) == before


def add_a_token(tokenizer):
    tokenizer.add_tokens(["<my-concept>"])  # what a textual inversion adds


def lowercase_only(tokenizer):
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # keeps runs of spaces


@pytest.mark.parametrize("change", [add_a_token, lowercase_only])
def test_a_tokenizer_vocab_and_merges_would_not_rebuild_keeps_its_tokenizer_json(tmp_path, change):
    pipe = tiny_sdxl_pipeline()
    change(pipe.tokenizer)
    save_pipeline(pipe, tmp_path / "p")
    assert (tmp_path / "p" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "p" / "tokenizer" / "vocab.json").exists()
    assert not (tmp_path / "p" / "tokenizer_2" / "tokenizer.json").exists()
    again = CLIPTokenizer.from_pretrained(tmp_path / "p" / "tokenizer")
    prompt = "a  <my-concept>   bag"
    assert ids(again, prompt) == ids(pipe.tokenizer, prompt)


def test_a_tokenizer_changed_after_a_save_is_checked_again(tmp_path):
    """The check's verdict is kept per tokenizer serialisation: one changed since is not the one checked."""
    pipe = tiny_sdxl_pipeline()
    save_pipeline(pipe, tmp_path / "before")
    assert not (tmp_path / "before" / "tokenizer" / "tokenizer.json").exists()
    add_a_token(pipe.tokenizer)
    save_pipeline(pipe, tmp_path / "after")
    assert (tmp_path / "after" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "after" / "tokenizer" / "vocab.json").exists()


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_the_tiny_test_pipelines_are_written_so(tiny_sdxl_dir, name):
    assert (tiny_sdxl_dir / name / "merges.txt").is_file() and not (tiny_sdxl_dir / name / "tokenizer.json").exists()
