"""Write the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in the package.

Run once, by hand, with the gzipped BPE list from the open_clip_torch wheel:

    pip download --no-deps open_clip_torch && unzip -j open_clip_torch-*.whl \
        open_clip/bpe_simple_vocab_16e6.txt.gz
    python scripts/make_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz nitrofusion/world/assets/tokenizer

The ids it gives are those of the public CLIP tokenizers (49408 tokens): the 256 byte
symbols, the same with the end-of-word marker, the 48894 merges in rank order, then the
start and end tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode map, in id order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bpe_gz", help="bpe_simple_vocab_16e6.txt.gz from the open_clip_torch wheel")
    p.add_argument("out_dir", help="where vocab.json and merges.txt are written")
    args = p.parse_args()
    if not Path(args.bpe_gz).is_file():
        p.error(f"{args.bpe_gz} is not a file")
    main(args.bpe_gz, args.out_dir)
