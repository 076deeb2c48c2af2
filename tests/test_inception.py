"""FID Inception-v3: architecture, FID-specific pooling and safetensors loading (random weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nitrofusion.errors import UserError
from nitrofusion.evaluation.inception import BasicConv2d, FIDInceptionV3, ieee_fp32, load_fid_inception

# Derived per block as sum of cout * (cin * kh * kw + 2) (bias-free conv + BN affine):
# stem 172,672; Mixed_5b/5c/5d 255,904 + 277,472 + 285,152; Mixed_6a 1,153,280;
# Mixed_6b..6e 1,297,408 + 2 * 1,691,008 + 2,141,952; Mixed_7a 1,698,304;
# Mixed_7b/7c 5,044,608 + 6,076,800; fc 2048 * 1008 + 1008 = 2,065,392.
# Cross-check: torchvision's 1000-class model without aux logits has 23,834,568, plus 8 * 2049.
EXPECTED_PARAMS = 23_850_960
NUM_BASIC_CONVS = 94  # stem 5, A 3 x 7, B 4, C 4 x 10, D 6, E 2 x 9


def randomize(model: FIDInceptionV3, seed: int = 0) -> FIDInceptionV3:
    """Scale-preserving random weights and non-trivial BN statistics, so features are O(1)
    and a load that silently skipped BatchNorm buffers would change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BasicConv2d):
                w = m.conv.weight
                w.copy_(torch.randn(w.shape, generator=g) * (2 / w[0].numel()) ** 0.5)
                n = m.bn.num_features
                m.bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        model.fc.weight.normal_(generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return randomize(FIDInceptionV3())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fid.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_features_shape_range_and_determinism(model, images):
    with torch.no_grad():
        a, b = model(images), model(images)
    assert a.shape == (2, 2048) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and (a >= 0).all()  # mean of post-ReLU maps
    assert a.abs().max() > 1e-3  # the randomisation really gives non-degenerate features
    assert torch.equal(a, b)
    f = model.features(images, batch_size=1)
    assert f.device.type == "cpu" and f.dtype == torch.float32
    torch.testing.assert_close(f, a)


def tf32_flags() -> tuple:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_features_are_computed_without_tf32_and_the_flags_are_restored(model, images):
    """torch's default runs cuDNN convolutions in TF32 on recent GPUs: FIDs would depend on the card."""
    seen = []
    hook = model.Mixed_7c.register_forward_hook(lambda *_: seen.append(tf32_flags()))
    before = tf32_flags()
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    exact = ("ieee", "ieee") if isinstance(before[0], str) else (False, False)
    assert seen == [exact]
    assert tf32_flags() == before
    with pytest.raises(RuntimeError), ieee_fp32():  # restored on the way out of an error too
        raise RuntimeError
    assert tf32_flags() == before


def test_state_dict_naming_and_parameter_count():
    m = FIDInceptionV3()
    state = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == EXPECTED_PARAMS
    assert len(list(m.parameters())) == 3 * NUM_BASIC_CONVS + 2  # conv.weight, bn.weight, bn.bias; fc w/b
    assert len(state) == 6 * NUM_BASIC_CONVS + 2  # + running_mean, running_var, num_batches_tracked
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_3a.bn.weight": (384,),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in k for k in state)


def test_fid_specific_pooling(model):
    assert isinstance(model.Mixed_7c.pool, nn.MaxPool2d)
    avg_blocks = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"]
    for name in avg_blocks:
        pool = getattr(model, name).pool
        assert isinstance(pool, nn.AvgPool2d) and not pool.count_include_pad, name
    # Behaviour, not just a flag: a constant map stays constant at the border only when
    # padding is excluded (with zero padding counted, a corner would be 4/9 of the value).
    x = torch.full((1, 4, 6, 6), 2.0)
    assert torch.equal(model.Mixed_5b.pool(x), x)
    # The max pool keeps each 3x3 window's maximum, which an average cannot.
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    assert torch.equal(model.Mixed_7c.pool(spike)[0, 0, 1:4, 1:4], torch.ones(3, 3))


def test_grey_equals_repeated_rgb(model, images):
    grey = images[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model(grey), model(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)


def test_round_trip_through_safetensors(model, images, weights_file):
    loaded = load_fid_inception(weights_file)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_missing_batch_counters_are_tolerated(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    loaded = load_fid_inception(path)
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight, rtol=0, atol=0)


def test_missing_file_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        load_fid_inception(tmp_path / "nope.safetensors")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--inception" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg and "safetensors" in msg


def test_pickle_checkpoint_is_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="save_file"):
        load_fid_inception(path)


def test_wrong_keys_or_shapes_are_user_errors(model, tmp_path):
    # An ImageNet (1000-class) checkpoint has every key but the wrong classifier shape.
    state = dict(model.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    wrong_shape = tmp_path / "imagenet.safetensors"
    save_file(state, str(wrong_shape))
    with pytest.raises(UserError, match="fc.weight") as err:
        load_fid_inception(wrong_shape)
    assert "\n" not in str(err.value)

    wrong_keys = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(wrong_keys))
    with pytest.raises(UserError, match="missing"):
        load_fid_inception(wrong_keys)


# Each branch's place in its block's output, in the order of pytorch-fid's (and torchvision's)
# Inception: a branch written in another order keeps every shape and parameter count and
# computes other features from the real weights. (block, its last layer per branch, first
# channel, channels); the max-pool branches of the reductions have no layer and come last.
BRANCH_ORDER = [
    (
        "InceptionA",
        [("branch1x1", 0, 64), ("branch5x5_2", 64, 64), ("branch3x3dbl_3", 128, 96), ("branch_pool", 224, 8)],
    ),
    ("InceptionB", [("branch3x3", 0, 384), ("branch3x3dbl_3", 384, 96)]),
    (
        "InceptionC",
        [("branch1x1", 0, 192), ("branch7x7_3", 192, 192), ("branch7x7dbl_5", 384, 192), ("branch_pool", 576, 192)],
    ),
    ("InceptionD", [("branch3x3_2", 0, 320), ("branch7x7x3_4", 320, 192)]),
    (
        "InceptionE",
        [
            ("branch1x1", 0, 320),
            ("branch3x3_2a", 320, 384),
            ("branch3x3_2b", 704, 384),
            ("branch3x3dbl_3a", 1088, 384),
            ("branch3x3dbl_3b", 1472, 384),
            ("branch_pool", 1856, 192),
        ],
    ),
]


@pytest.mark.parametrize("block, branches", BRANCH_ORDER, ids=[b for b, _ in BRANCH_ORDER])
def test_each_branch_fills_the_channels_pytorch_fid_gives_it(block, branches):
    """Each branch's last BatchNorm set to a constant, 0 for one branch and 1 for the others (the
    max-pool branches pass the positive input through): exactly that branch's channels of the
    block's output are zero."""
    from nitrofusion.evaluation import inception

    extra = {"InceptionA": {"pool_features": 8}, "InceptionC": {"channels_7x7": 8}}.get(block, {})
    x = torch.rand(1, 8, 9, 9, generator=torch.Generator().manual_seed(0))
    for name, first, width in branches:
        module = getattr(inception, block)(8, **extra).eval()
        with torch.no_grad():
            for other, _, _ in branches:  # each branch a constant: 1 (ReLU(1)), 0 for the one named
                getattr(module, other).bn.weight.zero_()
                getattr(module, other).bn.bias.fill_(0.0 if other == name else 1.0)
            out = module(x)
        zero = out.abs().amax(dim=(0, 2, 3)) == 0
        assert zero[first : first + width].all(), (block, name)
        assert not zero[:first].any() and not zero[first + width :].any(), (block, name)
