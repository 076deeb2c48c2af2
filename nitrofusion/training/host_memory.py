"""Host copies of many tensors, packed into a few blocks of pinned memory.

torch's pinned-memory allocator rounds every block up to a power of two, so pinning SDXL's
tensors one by one costs ×1.31–1.75 their size (the EMA's fp32 student: 12.6 GiB pinned for
9.6 GiB; the teacher's text encoders ×1.34, its VAE ×1.75). `host_copies` packs the tensors
(first fit, largest first) into blocks whose size is itself a power of two, so the allocator
adds nothing and only the last block's tail and the alignment gaps are spare: ×1.003–1.014 on
those parts (benchmarks/pinned_host.py). Page-locked memory is memory the rest of the machine
cannot page out, so the spare matters. (torch 2.13's `pinned_max_round_threshold` allocator
setting can turn the rounding off for large requests; packing needs no setting, on any torch.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGN = 512  # bytes between the starts of two copies: every dtype's alignment, and whole cache lines for the DMA
BLOCK = 256 * 2**20  # bytes a block; a larger tensor gets a block of its own (the next power of two)


def padded(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGN."""
    return -(-nbytes // ALIGN) * ALIGN


def power_of_two(nbytes: int) -> int:
    """The smallest power of two at least `nbytes` (what torch's pinned allocator gives a request)."""
    return 1 << max(nbytes - 1, 0).bit_length()


def pack(sizes: Sequence[int], block: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Block sizes and each size's (block, offset): first fit, largest first. A block's size is
    the next power of two above what it holds, so a full block is `block` bytes exactly. The
    default block is a sixteenth of the total (the last block's spare stays under 1/16 of it: a
    164 MiB VAE in one 256 MiB block would be ×1.6), at least eight of the largest tensor (a
    block of two 4.5 MiB tensors would hold one: ×1.8), at most BLOCK."""
    if block is None:
        total, largest = sum(map(padded, sizes)), max(sizes, default=0)
        block = min(BLOCK, max(ALIGN, power_of_two(total // 16), 8 * power_of_two(largest)))
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = padded(sizes[i])
        for b, filled in enumerate(used):
            if filled + need <= max(block, power_of_two(filled)):
                places[i], used[b] = (b, filled), filled + need
                break
        else:
            places[i] = (len(used), 0)
            used.append(need)
    return [power_of_two(u) for u in used], places


def host_copies(tensors: Sequence[torch.Tensor], pin: bool, block: int | None = None) -> list[torch.Tensor]:
    """A host copy of each tensor (same dtype and shape, contiguous), views into shared blocks;
    `pin`: the blocks are page-locked, so copies to and from a GPU run asynchronously."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    blocks, places = pack(sizes, block)
    memory = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in blocks]
    copies = []
    for t, n, (b, offset) in zip(tensors, sizes, places):
        home = memory[b][offset : offset + n].view(t.dtype).view(t.shape)
        home.copy_(t.detach())
        copies.append(home)
    return copies
