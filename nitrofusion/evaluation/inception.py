"""Inception-v3 pool3 features for FID, in plain torch (torchvision is not a dependency).

This is the network of TensorFlow's 2015-12-05 Inception graph, the one FID is defined
on, laid out with torchvision/pytorch-fid parameter names so pytorch-fid's converted
weights load strictly. It differs from torchvision's ImageNet Inception-v3 in three ways,
all needed to reproduce published FIDs:

* the classifier has 1008 outputs (unused here, kept so the checkpoint loads strictly);
* the average pools in the A, C and first E block exclude padding (count_include_pad=False);
* the last E block (Mixed_7c) pools its pool branch with a 3x3 max pool, not an average.

nitrofusion never unpickles files, so pytorch-fid's release asset
pt_inception-2015-12-05-6726825d.pth
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)
has to be converted to safetensors once, then passed with --inception PATH:

    python -c "import torch; from safetensors.torch import save_file; save_file(torch.load('pt_inception-2015-12-05-6726825d.pth', weights_only=True), 'pt_inception-2015-12-05.safetensors')"
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nitrofusion.errors import UserError
from nitrofusion.pipelines.loading import check_state_dict, read_safetensors

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph has 1008 logits, not ImageNet's 1000
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
CONVERT_HINT = (
    'python -c "import torch; from safetensors.torch import save_file; '
    f"save_file(torch.load('{WEIGHTS_NAME}', weights_only=True), 'pt_inception-2015-12-05.safetensors')\""
)


class BasicConv2d(nn.Module):
    """Conv (no bias: the BatchNorm shift replaces it) + BatchNorm (TF's eps 0.001) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool() -> nn.AvgPool2d:
    # TF's "SAME" average pool divides by the number of real pixels in the window, so
    # border outputs must not be diluted by zero padding.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _avg_pool()
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17: strided 3x3 | 1x1->3x3->strided 3x3 | strided max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1 pairs)."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c = channels_7x7
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, **row)
        self.branch7x7_3 = BasicConv2d(c, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, **col)
        self.branch7x7dbl_3 = BasicConv2d(c, c, **row)
        self.branch7x7dbl_4 = BasicConv2d(c, c, **col)
        self.branch7x7dbl_5 = BasicConv2d(c, 192, **row)
        self.pool = _avg_pool()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8: 1x1->strided 3x3 | 1x1->1x7->7x1->strided 3x3 | strided max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 convolutions.

    `max_pool` selects the pool branch's pooling: False (Mixed_7b) is a padding-excluding
    average, True (Mixed_7c) is the 3x3 max pool that the 2015 TF graph has there.
    """

    def __init__(self, cin: int, max_pool: bool = False) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d3),
                self.branch3x3dbl_3b(d3),
                self.branch_pool(self.pool(x)),
            ],
            1,
        )


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls in IEEE fp32 for the duration.

    torch runs cuDNN convolutions in TF32 by default on Ampere and later GPUs (a 10-bit
    mantissa), which moves Inception features by about 1e-3: an FID would then depend on
    the card, and generated images' statistics computed on a GPU would not be comparable
    with reference statistics computed on a CPU. The flags are restored afterwards.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9; its legacy flags must not be mixed in
        matmul = torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 graph) up to its 2048-d global-average-pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # Unused for features; present only so the FID checkpoint loads strictly.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features [N, 2048] of `images`.

        `images`: float [N, 3, H, W] (or grey [N, 1, H, W]) with values in [-1, 1], the
        project's image convention and the range the TF graph was trained on, so no
        further normalisation happens here. Other sizes are bilinearly resized to 299x299
        (align_corners=False, no antialiasing), as pytorch-fid does. On a GPU it runs in IEEE
        fp32, not TF32 (`ieee_fp32`).
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 3, H, W] or [N, 1, H, W], got shape {tuple(images.shape)}")
        with ieee_fp32():
            return self._pool3(images)

    def _pool3(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.fc.weight.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
        """Batched forward without gradients; float32 [N, 2048] on the CPU.

        Batches are moved to the model's device, so `images` may stay on the CPU. Call on a
        model in eval mode (as `load_fid_inception` returns it): BatchNorm must use its
        running statistics for features to mean anything.
        """
        device = self.fc.weight.device
        chunks = [self(batch.to(device)).float().cpu() for batch in images.split(batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, FEATURE_DIM)


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception-v3 with weights from a safetensors file, in eval mode on the CPU."""
    path = Path(path)
    convert = f"convert {WEIGHTS_URL} to safetensors once with: {CONVERT_HINT}"
    if not path.is_file():
        raise UserError(f"FID Inception weights '{path}' not found: {convert}; then pass it with --inception PATH")
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise UserError(f"'{path}' is a pickled checkpoint, which nitrofusion does not load: {convert}")
    state = read_safetensors(path)
    model = FIDInceptionV3()
    # BatchNorm's step counter is irrelevant in eval mode and absent from checkpoints saved
    # by old torch versions, so a missing one is filled rather than rejected.
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, value)
    check_state_dict(model, state, f"FID Inception weights '{path}'")
    model.load_state_dict(state)
    return model.eval()
