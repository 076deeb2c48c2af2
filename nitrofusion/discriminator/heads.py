"""Discriminator heads: small conv stacks on one backbone feature map.

A head is a 1x1 projection to `width` channels, `downsamples` x (4x4 stride-2 conv,
LeakyReLU), then
  global heads: average-pool to one vector -> one logit per image (coherence). The pool
                builds them with as many halvings as take their map down to 1x1 (DMD2's
                head), so the logit sees the whole map: after the last (linear) layer, the
                mean of a map is the mean of the logits each position would give, so with a
                local head's depth a "global" logit was an average of patch logits;
  local heads:  a 1x1 conv -> one logit per patch (texture, detail). Each patch logit sees a
                window of 3 * 2**downsamples - 2 feature positions a side (10 at the default
                2), patches 2**downsamples apart.
Conditional heads add a projection-discriminator term <phi(x), W c> where c is the
prompt's pooled text embedding (Miyato & Koyama 2018): cheap, and it makes the logit
depend on whether image and prompt agree rather than on the prompt alone.

No normalisation layer: a per-sample norm (GroupNorm with a channel or a few per group, as
small heads get) divides out each sample's feature scale, and the scale is what most
separates a regression-trained student (x0 variance 0.83) from the teacher (1.45) on the
embedded world; on the deepest maps, down-sampled to 1x1, it outputs a constant. Heads
built that way stayed at chance (loss 2 ln 2) through whole runs; without the norm, heads
on the same features tell a regression-trained student from the teacher with 93% mean
held-out accuracy at t* = 10 and 88% at t* = 250 (docs/results.md, "The blind discriminator").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# The pool uses the first three; "global_uncond" is DMD2's classifier on the fake score's bottleneck.
HEAD_KINDS = ("global_cond", "local_cond", "local_uncond", "global_uncond")


NEGATIVE_SLOPE = 0.2
TEXT_INITS = ("neutral", "he")  # a conditional head's text projection at init: zero, or He like the trunk


def max_downsamples(side: int) -> int:
    """The most halvings a head can make of a map of this side: a 4x4 stride-2 convolution
    (padding 1) needs an input of at least 2, so d of them need a side of at least 2**d. Each
    floors the side's half, so as many take the side down to 1."""
    return max(side, 1).bit_length() - 1


class DiscriminatorHead(nn.Module):
    def __init__(
        self,
        kind: str,
        in_channels: int,
        width: int,
        cond_dim: int,
        downsamples: int = 2,
        generator: torch.Generator | None = None,
        text_init: str = "neutral",
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}")
        if text_init not in TEXT_INITS:
            raise ValueError(f"unknown text_init {text_init!r}")
        self.kind = kind
        self.text_init = text_init
        self.is_global = kind.startswith("global")
        self.is_conditional = kind.endswith("_cond")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(NEGATIVE_SLOPE)]
        for _ in range(downsamples):
            layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.LeakyReLU(NEGATIVE_SLOPE)]
        self.trunk = nn.Sequential(*layers)
        self.to_logit = nn.Conv2d(width, 1, 1)
        self.embed_text = nn.Linear(cond_dim, width, bias=False) if self.is_conditional else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh init (also what a pool refresh does); seeded by `generator` for exact resumes.

        Drawn on the CPU (where the seeded generators live) and copied in: the same heads on
        any device, and a CPU generator never meets CUDA weights.
        """

        def draw(weight: torch.Tensor, init: Callable[..., object], **kwargs: float) -> None:
            value = torch.empty(weight.shape, dtype=torch.float32)
            init(value, generator=generator, **kwargs)
            weight.copy_(value)

        with torch.no_grad():
            for m in self.modules():
                if m is self.embed_text and self.text_init == "neutral":
                    # A fresh head judges neutrally: He-initialised, <phi(x), W c> alone put the
                    # logits at 0.5-1 (40x the rest of the head) for whatever prompt. From zero W
                    # still learns: its gradient is phi(x) c^T.
                    m.weight.zero_()
                elif isinstance(m, (nn.Conv2d, nn.Linear)):
                    # He init for the LeakyReLU that follows: activations keep their scale with depth.
                    draw(m.weight, nn.init.kaiming_normal_, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
                    if m.bias is not None:
                        m.bias.zero_()
            draw(self.to_logit.weight, nn.init.normal_, std=0.01)

    def forward(self, feature: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: [B] for global heads, [B, h*w] (one per patch) for local heads."""
        h = self.trunk(feature)
        if self.is_global:
            h = h.mean(dim=(2, 3), keepdim=True)
        logits = self.to_logit(h)
        if self.embed_text is not None:
            if text is None:
                raise ValueError("a conditional head needs the text embedding")
            proj = self.embed_text(text.to(h.dtype))[:, :, None, None]
            logits = logits + (h * proj).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logits.flatten(1).squeeze(1) if self.is_global else logits.flatten(1)
