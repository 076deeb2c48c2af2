"""Discriminator heads can see what separates a student from its teacher.

The heads once normalised each sample's features (GroupNorm with one channel per group) and
sat at chance through whole distillation runs: the scale of the features, which is what a
regression-trained student gets wrong first, was divided out, and on maps down-sampled to
1x1 every logit was a constant. These tests train single heads on synthetic features.
"""

import pytest
import torch
import torch.nn.functional as F

from nitrofusion.discriminator.heads import DiscriminatorHead


def trained_accuracy(head: DiscriminatorHead, batch, steps: int, held_out: int) -> float:
    """Held-out accuracy of `head` trained `steps` times with the non-saturating loss on fresh
    `batch()`es of (real, fake, text), as a discriminator sees them."""
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for _ in range(steps):
        real, fake, text = batch()
        loss = F.softplus(-head(real, text)).mean() + F.softplus(head(fake, text)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake, text = batch(held_out)
    with torch.no_grad():
        r, f = head(real, text), head(fake, text)
    return 0.5 * ((r > 0).float().mean() + (f < 0).float().mean()).item()


def train_and_score(kind: str, side: int, steps: int = 400) -> float:
    """A head told features of scale 1.5 ("teacher") from the same features at scale 1 (a blurred
    "student")."""
    g = torch.Generator().manual_seed(0)

    def batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (n, 8, side, side)
        return 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(n, 6, generator=g)

    head = DiscriminatorHead(kind, 8, 16, 6, downsamples=2, generator=torch.Generator().manual_seed(1))
    return trained_accuracy(head, batch, steps, 256)


@pytest.mark.parametrize("kind", ["global_cond", "local_cond", "local_uncond", "global_uncond"])
def test_a_head_separates_features_that_differ_only_in_scale(kind):
    assert train_and_score(kind, side=8) > 0.9


def test_a_head_on_a_map_downsampled_to_one_pixel_still_answers():
    g = torch.Generator().manual_seed(0)
    head = DiscriminatorHead("global_uncond", 8, 16, 6, downsamples=2, generator=g)  # 4x4 -> 2x2 -> 1x1
    logits = head(torch.randn(32, 8, 4, 4, generator=g))
    assert logits.shape == (32,) and logits.std() > 1e-3
    assert train_and_score("global_uncond", side=4) > 0.9


@pytest.mark.parametrize("kind", ["global_cond", "local_cond", "local_uncond", "global_uncond"])
def test_a_fresh_head_judges_neutrally_whatever_the_prompt(kind):
    """A refreshed head should not push the student before it has learnt anything. He-initialised,
    a conditional head's text term alone gave logits of 0.5-1 on the embedded world's features
    (40x the rest of the head): a random text-image projection judged the student."""
    g = torch.Generator().manual_seed(0)
    features, text = 2 * torch.randn(64, 8, 8, 8, generator=g), torch.randn(64, 32, generator=g)
    neutral = DiscriminatorHead(kind, 8, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert neutral(features, text).abs().mean() < 0.1
    if kind.endswith("_cond"):
        he = DiscriminatorHead(kind, 8, 16, 32, generator=torch.Generator().manual_seed(1), text_init="he")
        with torch.no_grad():
            assert he(features, text).abs().mean() > 0.3  # what "neutral" removes


def test_a_neutral_conditional_head_learns_whether_image_and_prompt_agree():
    """From a zero text projection the head still learns the prompt: real features carry their own
    prompt's pattern, fake ones another prompt's, so only the text term can tell them apart."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(6, 8, generator=g)

    def batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = torch.randn(n, 6, generator=g)
        noise = 0.5 * torch.randn(2, n, 8, 4, 4, generator=g)
        real = (text @ pattern)[:, :, None, None] + noise[0]
        fake = (text.roll(1, 0) @ pattern)[:, :, None, None] + noise[1]  # a prompt's image, shown with another
        return real, fake, text

    scores = {}
    for kind in ("global_cond", "global_uncond"):
        head = DiscriminatorHead(kind, 8, 16, 6, downsamples=1, generator=torch.Generator().manual_seed(1))
        scores[kind] = trained_accuracy(head, batch, 300, 512)
    assert scores["global_cond"] > 0.8 and scores["global_uncond"] < 0.6, scores


def corner_interaction(head: DiscriminatorHead, side: int) -> float:
    """How much a change at one corner of the map alters the effect of a change at the opposite
    corner on the logit (zero when no unit of the head sees both corners)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, side, side, generator=g, dtype=torch.float64)
    text = torch.randn(16, 6, generator=g, dtype=torch.float64)
    a, b = torch.zeros_like(x), torch.zeros_like(x)
    a[..., 0, 0], b[..., -1, -1] = 3.0, 3.0
    with torch.no_grad():
        return (head(x + a + b, text) - head(x + a, text) - head(x + b, text) + head(x, text)).abs().max().item()


def test_a_global_head_of_the_pool_sees_its_whole_map():
    """Global heads once had a local head's depth: the mean of their last map, then a linear logit,
    is the mean of the logits each position would give, so a "global" logit was an average of patch
    logits each seeing 10x10 positions. The pool now halves a global head's map down to 1x1."""
    from nitrofusion.discriminator.pool import HeadPool

    kinds = ["global_cond", "local_cond"]
    full = HeadPool([(8, 16, 16), (8, 8, 8)], kinds, [10], 6, width=16, candidates=1).double()
    pinned = HeadPool([(8, 16, 16)], kinds, [10], 6, width=16, candidates=1, global_downsamples=2).double()
    depths = [sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in h.modules()) for h in full.heads]
    assert depths == [4, 3, 2, 2]  # global on 16x16 and 8x8 maps, then local heads at the default 2
    # float64: exactly additive effects cancel to ~1e-17; a fresh head's logit weights are std 0.01
    assert corner_interaction(full.heads[0], 16) > 1e-6 and corner_interaction(full.heads[1], 8) > 1e-6
    assert corner_interaction(pinned.heads[0], 16) < 1e-12  # the old depth: two corners' effects just add up
