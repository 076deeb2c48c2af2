"""LAION aesthetic score: the "improved aesthetic predictor" MLP on CLIP ViT-L/14 image
embeddings (L2-normalised), trained to predict 1-10 ratings (SAC + LOGOS + AVA).

The released file is a pickled torch state dict (sac+logos+ava1-l14-linearMSE.pth); nitrofusion
only reads safetensors, so convert it once (see AESTHETIC_HINT). Keys: layers.{0,2,4,6,7}.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from nitrofusion.errors import UserError
from nitrofusion.evaluation.clip import ClipModel
from nitrofusion.pipelines.loading import check_state_dict, read_safetensors

AESTHETIC_HINT = (
    "the LAION improved-aesthetic-predictor weights 'sac+logos+ava1-l14-linearMSE.pth' "
    "(github.com/christophschuhmann/improved-aesthetic-predictor) converted to safetensors: python -c "
    '"import torch; from safetensors.torch import save_file; '
    "save_file(torch.load('sac+logos+ava1-l14-linearMSE.pth', weights_only=True), 'aesthetic.safetensors')\""
)


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts between the first layers, no activations
    (the released predictor is this linear stack; ImageReward's reward head is the same stack,
    with the same `layers.N` names, on BLIP's text features)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic(path: str | Path, embed_dim: int = 768) -> AestheticMLP:
    if not Path(path).expanduser().is_file():
        raise UserError(f"aesthetic predictor weights '{path}' not found: --aesthetic must point at {AESTHETIC_HINT}")
    state = read_safetensors(Path(path).expanduser())
    mlp = AestheticMLP(embed_dim)
    check_state_dict(mlp, state, f"aesthetic weights '{path}'")
    mlp.load_state_dict(state)
    return mlp.eval()


def check_fits(mlp: AestheticMLP, clip: ClipModel) -> None:
    """Before any image is generated: the predictor reads one CLIP's embeddings (ViT-L/14's, 768-d)."""
    width = clip.model.config.projection_dim
    if width != mlp.layers[0].in_features:
        raise UserError(
            f"the aesthetic predictor expects {mlp.layers[0].in_features}-d CLIP embeddings but the CLIP model "
            f"gives {width}-d: use CLIP ViT-L/14 (--aesthetic-clip-model)"
        )


# CLIP ViT-L/14's vision tower, which the released predictor was trained on (LAION's embeddings).
VIT_L14 = {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "num_hidden_layers": 24}


def unlike_vit_l14(clip: ClipModel) -> str | None:
    """A warning where the CLIP has the predictor's width but not ViT-L/14's vision tower (e.g. ViT-L/14
    at 336 px, also 768-d): the scores run, but are not those the predictor's ratings were fitted to."""
    vision = clip.model.config.vision_config
    differ = [
        f"{k} {getattr(vision, k, None)} (ViT-L/14: {v})" for k, v in VIT_L14.items() if getattr(vision, k, None) != v
    ]
    if not differ:
        return None
    return (
        "the aesthetic predictor was fitted to CLIP ViT-L/14's embeddings, and --aesthetic-clip-model differs: "
        + ", ".join(differ)
        + "; its scores compare only with scores from the same CLIP"
    )


@torch.no_grad()
def aesthetic_score(mlp: AestheticMLP, clip: ClipModel, images: list[Image.Image]) -> float:
    """Mean predicted rating (higher is better) over the images."""
    check_fits(mlp, clip)
    return float(mlp(clip.image_embeddings(images)).mean())
