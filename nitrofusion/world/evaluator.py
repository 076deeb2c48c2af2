"""The embedded world's own judge: a small CNN classifier of Fashion-MNIST.

Its predictions give prompt alignment (was the prompted garment drawn?) and its
penultimate features give a domain Frechet distance against the real test set, the
embedded stand-ins for CLIP score and FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nitrofusion.errors import UserError
from nitrofusion.evaluation.frechet import GaussianStats, frechet_distance
from nitrofusion.userfiles import replacing

FEATURE_DIM = 128


class FashionClassifier(nn.Module):
    """Three conv stages (32x32 -> 4x4), a 128-d feature layer, a 10-way head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128), nn.Flatten())
        self.features = nn.Sequential(nn.Dropout(0.3), nn.Linear(128 * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """RGB images in [-1, 1] -> grey [N,1,32,32], resized to 32x32 with antialiasing if needed.

    The range is not checked (a generator's failure may be all bright): a pipeline's
    `output_type="pt"` is in [0, 1] and must be mapped to [-1, 1] first (x * 2 - 1), or the
    scores are meaningless (test accuracy 0.40 instead of 0.94). `evaluation.fid.to_tensor` turns
    PIL images into this range.
    """
    x = images.float().mean(1, keepdim=True)
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class Evaluator:
    """Classifier + reference feature statistics of the real Fashion-MNIST test set."""

    model: FashionClassifier
    reference: GaussianStats

    @classmethod
    def load(cls, path: str | Path) -> Evaluator:
        """Every way a file can fail to be an evaluator (missing, not safetensors, corrupt, another
        network's weights, no reference statistics) is one UserError naming it."""
        from nitrofusion.pipelines.loading import check_state_dict, read_safetensors

        tensors = read_safetensors(path)
        what = f"evaluator weights '{path}' (--evaluator)"
        model = FashionClassifier()
        state = {k[6:]: v.float() for k, v in tensors.items() if k.startswith("model.")}
        check_state_dict(model, state, what)
        model.load_state_dict(state)
        ref = {k[4:]: v for k, v in tensors.items() if k.startswith("ref.")}
        # A wrong reference shape would only fail inside the first Frechet distance, after sampling.
        shapes = {"mu": (FEATURE_DIM,), "sigma": (FEATURE_DIM, FEATURE_DIM), "n": ()}
        wrong = [k for k, shape in shapes.items() if k not in ref or tuple(ref[k].shape) != shape]
        if wrong:
            raise UserError(
                f"{what} has no reference statistics of its {FEATURE_DIM}-d features (ref.{wrong[0]} "
                f"{'missing' if wrong[0] not in ref else 'of shape ' + str(list(ref[wrong[0]].shape))}): "
                "it must be an evaluator.safetensors written by train-teacher"
            )
        return cls(model.eval(), GaussianStats.from_tensors(ref))

    def save(self, path: str | Path) -> None:
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update(self.reference.to_tensors("ref."))
        with replacing(path) as tmp:  # whole or absent: every evaluate and reproduce reads it
            save_file(tensors, str(tmp))

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float [N, 3 or 1, H, W] in [-1, 1]."""
        feats, logits = [], []
        for chunk in images.split(batch_size):
            f = self.model.embed(to_classifier_input(chunk))
            feats.append(f)
            logits.append(self.model.head(f))
        return torch.cat(feats), torch.cat(logits)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Prompt alignment (accuracy of the prompted class) and domain FD to the test set."""
        feats, logits = self.features_and_logits(images)
        acc = (logits.argmax(1) == labels.to(logits.device)).float().mean().item()
        fd = frechet_distance(GaussianStats.from_features(feats), self.reference)
        return {"class_accuracy": acc, "domain_fd": fd, "n": int(images.shape[0])}
