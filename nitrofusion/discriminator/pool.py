"""The dynamic pool of specialised discriminator heads (NitroFusion, section 3).

Heads are organised by (kind, t*, feature level) with `candidates` interchangeable heads
in each slot: the paper's SDXL pool is 3 kinds x 4 noise levels x 10 levels x 4 = 480.
Every iteration `sample_heads` picks t* groups and, for every kind and feature level, one
candidate; only those heads are run and trained. `refresh` re-initialises a random ~1% of
all heads each step (and their optimizer state), so no head overfits the current student.

With pool=False the ablation "single static head set" is built instead: one head per
(kind, feature level), shared by all t*, never refreshed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nitrofusion.discriminator.heads import DiscriminatorHead, max_downsamples


@dataclass(frozen=True)
class Slot:
    kind: str
    t_star: int  # -1 for a static head shared by every t*
    level: int
    candidate: int


class HeadPool(nn.Module):
    """`feature_shapes` are the backbone's maps, (channels, height, width) each. Local heads halve
    their map `downsamples` times; global heads `global_downsamples` times, or by default as many
    as take their map down to 1x1, so that their one logit sees the whole map."""

    def __init__(
        self,
        feature_shapes: list[tuple[int, int, int]],
        kinds: list[str],
        t_stars: list[int],
        cond_dim: int,
        width: int = 32,
        downsamples: int = 2,
        candidates: int = 4,
        dynamic: bool = True,
        seed: int = 0,
        text_init: str = "neutral",
        global_downsamples: int | None = None,
    ) -> None:
        super().__init__()
        self.kinds = list(kinds)
        self.t_stars = list(t_stars)
        self.dynamic = dynamic
        self.candidates = candidates if dynamic else 1
        groups = self.t_stars if dynamic else [-1]
        self.slots: list[Slot] = [
            Slot(kind, t, level, c)
            for kind in self.kinds
            for t in groups
            for level in range(len(feature_shapes))
            for c in range(self.candidates)
        ]

        def depth(kind: str, level: int) -> int:
            if not kind.startswith("global"):
                return downsamples
            if global_downsamples is not None:
                return global_downsamples
            return max_downsamples(min(feature_shapes[level][1:]))

        init = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleList(
            DiscriminatorHead(
                s.kind, feature_shapes[s.level][0], width, cond_dim, depth(s.kind, s.level), init, text_init
            )
            for s in self.slots
        )
        self._index = {s: i for i, s in enumerate(self.slots)}
        self.num_levels = len(feature_shapes)

    def __len__(self) -> int:
        return len(self.heads)

    def sample_heads(self, t_star: int, generator: torch.Generator) -> list[int]:
        """Indices of one head per (kind, feature level) for noise level t_star."""
        group = t_star if self.dynamic else -1
        picks = torch.randint(0, self.candidates, (len(self.kinds), self.num_levels), generator=generator)
        return [
            self._index[Slot(kind, group, level, int(picks[k, level]))]
            for k, kind in enumerate(self.kinds)
            for level in range(self.num_levels)
        ]

    def sample_t_stars(self, count: int, generator: torch.Generator) -> list[int]:
        order = torch.randperm(len(self.t_stars), generator=generator)[:count]
        return [self.t_stars[int(i)] for i in order]

    def refresh(
        self, fraction: float, generator: torch.Generator, optimizer: torch.optim.Optimizer | None
    ) -> list[int]:
        """Re-initialise round(fraction * size) random heads (at least one if fraction > 0)."""
        if not self.dynamic or fraction <= 0:
            return []
        count = max(1, round(fraction * len(self.heads)))
        chosen = torch.randperm(len(self.heads), generator=generator)[:count].tolist()
        for i in chosen:
            head = self.heads[i]
            head.reset_parameters(generator)
            if optimizer is not None:
                for p in head.parameters():
                    optimizer.state.pop(p, None)
        return sorted(chosen)

    @contextmanager
    def frozen(self, head_ids: list[int]) -> Iterator[None]:
        """The chosen heads without parameter gradients, for the student's pass through them.

        Only the chosen heads are toggled: switching the whole pool walks every parameter of
        480 heads twice a step, which cost the pool about a fifth of an embedded iteration.
        """
        heads = [self.heads[i] for i in head_ids]
        for head in heads:
            head.requires_grad_(False)
        try:
            yield
        finally:
            for head in heads:
                head.requires_grad_(True)

    def logits(self, head_ids: list[int], features: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Run the chosen heads on their feature maps; one logits tensor per head."""
        out = []
        for i in head_ids:
            head = self.heads[i]
            out.append(head(features[self.slots[i].level], text if head.is_conditional else None))
        return out
