"""GAN losses, averaged over heads (each head's logits averaged over batch and patches).

non_saturating:  L_D = softplus(-D(real)) + softplus(D(fake)),  L_G = softplus(-D(fake))
hinge:           L_D = relu(1 - D(real)) + relu(1 + D(fake)),   L_G = -D(fake)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    terms = []
    for r, f in zip(real, fake):
        if kind == "hinge":
            terms.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            terms.append(F.softplus(-r).mean() + F.softplus(f).mean())
    return torch.stack(terms).mean()


def generator_loss(fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    terms = [(-f).mean() if kind == "hinge" else F.softplus(-f).mean() for f in fake]
    return torch.stack(terms).mean()


def r1_penalty(real_logits: list[torch.Tensor], real_input: torch.Tensor) -> torch.Tensor:
    """E ||d D(x) / d x||^2 on real inputs (x must require grad), D(x) being what the losses average:
    the mean over heads of each head's mean logit (over patches), so that loss.r1_weight means the
    same whatever the number of heads and the latent size. Summed over the batch, each sample's
    gradient is its own D's."""
    total = sum(r.reshape(len(r), -1).mean(1).sum() for r in real_logits) / len(real_logits)
    (grad,) = torch.autograd.grad(total, real_input, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
