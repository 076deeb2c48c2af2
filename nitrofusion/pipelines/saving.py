"""Write a pipeline folder laid out as the hub's Stable Diffusion folders are.

transformers 5 saves a CLIP tokenizer as one `tokenizer.json` (3.6 MB), which it reads back about
six times slower than the `vocab.json` + `merges.txt` the hub's SD1.5/SDXL/SD3 folders hold
(0.74 s against 0.12 s per tokenizer on one CPU core, 2026-11-28): every command that loads a
folder written here would pay that for each of its two CLIP tokenizers. So the CLIP tokenizers
are written as their vocabulary and merges, which CLIPTokenizer rebuilds into the same tokenizer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffusers import DiffusionPipeline
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import CLIPTokenizer


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path) -> Path:
    """`pipe.save_pretrained(folder)`, with each CLIP tokenizer as vocab.json + merges.txt."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    for name, component in pipe.components.items():
        if type(component) is CLIPTokenizer:
            write_vocab_and_merges(component, folder / name)
    return folder


# Serialisations (by digest) already found to be rebuilt the same, or not, from vocab + merges: a
# run's exports write the same teacher tokenizers again and again (~0.3 s per check).
_REBUILT_SAME: dict[str, bool] = {}


def write_vocab_and_merges(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Replace `folder`'s tokenizer.json by the BPE model's vocab.json + merges.txt, unless the
    tokenizer those rebuild differs from this one (tokens added by a textual inversion, another
    normaliser): tokenizer.json is then kept as it is."""
    serialised = without_call_settings(tokenizer.backend_tokenizer)
    specials = {k: str(getattr(tokenizer, k)) for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
    digest = hashlib.sha256(f"{specials}{serialised}".encode()).hexdigest()
    written = [Path(p) for p in tokenizer.backend_tokenizer.model.save(str(folder))]
    same = _REBUILT_SAME.get(digest)
    if same is None:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        rebuilt = CLIPTokenizer(vocab=vocab, merges=merges, **specials)
        # Compared as text (as parsed JSON it took 0.5 s more): an equal tokenizer serialised in
        # another key order would only keep its tokenizer.json, never be written wrong.
        same = _REBUILT_SAME[digest] = rebuilt.backend_tokenizer.to_str() == serialised
        if len(_REBUILT_SAME) > 64:
            _REBUILT_SAME.pop(next(iter(_REBUILT_SAME)))
    if not same:
        for path in written:
            path.unlink()
        return
    (folder / "tokenizer.json").unlink(missing_ok=True)


def without_call_settings(backend: Tokenizer) -> str:
    """`backend`'s serialisation without its truncation and padding: transformers sets them on the
    backend at a call (`padding="max_length", truncation=True` by every pipeline) and leaves them
    there, and sets them again from each call's arguments, so a tokenizer that has encoded a
    prompt is the same tokenizer as one that has not. They are put back as they were (turned off
    for the moment: a copy of the backend took 0.3 s more)."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
