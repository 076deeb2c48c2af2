"""ImageReward (Xu et al. 2023, THUDM/ImageReward) on transformers' public BLIP modules.

The model, as read from the ImageReward source (ImageReward/ImageReward.py, models/BLIP/*.py):

- image encoder: BLIP's timm-style ViT-L/16 at 224 px (width 1024, 24 blocks, 16 heads, MLP ratio 4,
  qkv bias, LayerNorm eps 1e-6, no pre-norm, final `norm`); its full token sequence is the image embedding.
- text encoder: BLIP's BERT-base (med.py) with a cross-attention block in every layer, no pooler
  (`add_pooling_layer=False`); med_config: hidden 768, 12 layers, 12 heads, intermediate 3072, GELU,
  LayerNorm eps 1e-12, absolute positions (512), vocab 30524, `add_cross_attention`; `encoder_width` is
  overwritten with the ViT width (1024) in code.
- tokenizer: bert-base-uncased plus `{'bos_token': '[DEC]'}` and the additional special token `[ENC]`
  (30522 + 2 = 30524 rows), called with padding="max_length", truncation=True, max_length=35. The
  [ENC] token is never substituted when scoring: position 0 holds the ordinary [CLS] (id 101).
- reward: the text encoder runs bidirectionally on the prompt tokens with the image tokens as
  `encoder_hidden_states` (all attended), the last layer's position-0 state goes through
  768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear layers (dropouts between the first four, the ReLUs are
  commented out upstream), and the result is normalised as (r - 0.16717362830052426) / 1.0333394966054072.
- preprocessing: resize the short side to 224 (bicubic), center-crop 224, convert to RGB, to [0, 1],
  normalise with CLIP's mean/std. torchvision is not a dependency, so its Resize/CenterCrop are
  reproduced on PIL (same size and crop-offset rounding, same PIL bicubic filter).

Checkpoint keys follow from `ImageReward.state_dict()`: `blip.visual_encoder.*` (timm names),
`blip.text_encoder.*` (BERT names, identical to transformers' BlipTextModel), `blip.vision_proj.*`,
`blip.text_proj.*` (unused for scoring) and `mlp.layers.{0,2,4,6,7}.*`; med.py registers
`embeddings.position_ids` as a persistent buffer, so it may be present too. Not verified: the released
`ImageReward.pt` itself was not available here, and upstream loads it with `strict=False`, so the exact
key set of the file (and the hub's med_config.json, of which only the training copy was read) is inferred
from the code; the 30524-row embedding follows because `strict=False` still rejects shape mismatches.
Loading here is strict, so a file that differs is reported key by key instead of scoring silently.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from nitrofusion.errors import UserError
from nitrofusion.evaluation.aesthetic import AestheticMLP
from nitrofusion.pipelines.loading import layout_problems, read_safetensors

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONVERT_COMMAND = (
    "python -c \"import torch; from safetensors.torch import save_file; sd=torch.load('ImageReward.pt', "
    "map_location='cpu', weights_only=True); save_file({k: v.contiguous() for k, v in sd.items()}, "
    "'ImageReward.safetensors')\""
)
CONVERT_HINT = (
    "--image-reward is 'ImageReward.pt' from the hub repo THUDM/ImageReward converted to safetensors "
    f"(nitrofusion never unpickles) with: {CONVERT_COMMAND}; --image-reward-tokenizer is a directory with "
    "vocab.txt from the hub repo google-bert/bert-base-uncased"
)

# Components of the ImageReward state dict: (file prefix, [(ImageReward name, transformers name)]).
# `{i}` is a layer index and `{p}` "weight" or "bias"; an empty rule list means the names are identical.
_VISION_RULES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),  # same [3, heads, dim] split
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
_COMPONENTS = {
    "vision": ("blip.visual_encoder.", _VISION_RULES),
    "text": ("blip.text_encoder.", []),
    "mlp": ("mlp.", []),
}
# In the file but not used for scoring: the ITC projections, med.py's position-id buffer, and the
# decoder / ITM heads that full BLIP checkpoints carry.
_IGNORED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_decoder.", "blip.itm_head.")
_IGNORED_KEYS = {"blip.text_encoder.embeddings.position_ids"}


def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(body + r"\Z")


def _rename(name: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    if not rules:
        return name
    for src, dst in rules:
        if reverse:
            src, dst = dst, src
        if m := _pattern(src).match(name):
            return dst.format(**m.groupdict())
    return None


def image_reward_name(component: str, name: str) -> str:
    """The ImageReward checkpoint key of a transformers parameter name ("vision", "text" or "mlp")."""
    prefix, rules = _COMPONENTS[component]
    return prefix + (_rename(name, rules, reverse=True) or name)


def convert_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward keys -> (BlipVisionModel, BlipTextModel, MLP head) state dicts.

    Keys not used for scoring are dropped; any other key that has no counterpart is a UserError.
    Completeness and shapes are checked against the modules by `ImageRewardScorer.load`.
    """
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in _COMPONENTS}
    unexpected = []
    for key, value in state.items():
        if key in _IGNORED_KEYS or key.startswith(_IGNORED):
            continue
        for component, (prefix, rules) in _COMPONENTS.items():
            if key.startswith(prefix) and (name := _rename(key[len(prefix) :], rules)) is not None:
                out[component][name] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise UserError(
            f"not an ImageReward state dict: {len(unexpected)} unexpected keys, first: {', '.join(unexpected[:3])}"
        )
    return out["vision"], out["text"], out["mlp"]


def image_reward_vision_config() -> BlipVisionConfig:
    """BLIP's ViT-L/16 at 224 px as ImageReward builds it."""
    return BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        layer_norm_eps=1e-6,
    )


def image_reward_text_config() -> BlipTextConfig:
    """med_config.json's BERT-base with cross-attention onto the 1024-wide ViT tokens."""
    return BlipTextConfig(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        is_decoder=True,  # transformers only builds the cross-attention blocks for "decoder" configs
    )


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + RGB + ToTensor + CLIP Normalize, on PIL."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _check_fit(modules: dict[str, nn.Module], converted: dict[str, dict[str, torch.Tensor]], what: str) -> None:
    """Every parameter of the three modules provided with its shape, and nothing else (in ImageReward names)."""
    problems = []
    for component, module in modules.items():
        label = functools.partial(image_reward_name, component)
        problems += layout_problems(converted[component], module.state_dict(), label=label)
    if problems:
        raise UserError(f"{what} does not fit the ImageReward model: " + "; ".join(problems))


def load_tokenizer(directory: str | Path) -> BertTokenizer:
    """bert-base-uncased with the two tokens BLIP adds ([DEC] as bos, [ENC])."""
    path = Path(directory).expanduser()
    if not (path / "vocab.txt").is_file():
        raise UserError(f"ImageReward tokenizer directory '{directory}' has no vocab.txt; {CONVERT_HINT}")
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """ImageReward's BLIP encoders and reward head, scoring (image, prompt) pairs."""

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: AestheticMLP,
        tokenizer: BertTokenizer,
        device: str | torch.device = "cpu",
    ) -> None:
        self.vision, self.text, self.head = (m.to(device).eval() for m in (vision, text, head))
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = vision.config.image_size

    @classmethod
    def load(
        cls,
        weights: str | Path,
        tokenizer: str | Path,
        device: str | torch.device = "cpu",
        vision_config: BlipVisionConfig | None = None,
        text_config: BlipTextConfig | None = None,
    ) -> ImageRewardScorer:
        """Load converted ImageReward weights (.safetensors) and bert-base-uncased's vocab from a directory.

        The configs default to the released model; pass others only for differently sized copies (tests).
        """
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"ImageReward weights '{weights}' not found; {CONVERT_HINT}")
        if path.suffix != ".safetensors":
            raise UserError(f"ImageReward weights '{weights}' are not .safetensors; {CONVERT_HINT}")
        tok = load_tokenizer(tokenizer)
        vision_sd, text_sd, mlp_sd = convert_state_dict(read_safetensors(path))

        embedding = text_sd.get("embeddings.word_embeddings.weight")  # if absent, _check_fit names it
        if embedding is not None and len(tok) != embedding.shape[0]:
            raise UserError(
                f"the ImageReward tokenizer in '{tokenizer}' has {len(tok)} tokens (with [DEC] and [ENC]) but the "
                f"weights '{weights}' embed {embedding.shape[0]}: use bert-base-uncased's vocab.txt"
            )

        vision_config = vision_config or image_reward_vision_config()
        text_config = copy.deepcopy(text_config or image_reward_text_config())
        text_config.is_decoder = True  # builds the cross-attention blocks; attention is bidirectional per call
        modules = {
            "vision": BlipVisionModel(vision_config),
            "text": BlipTextModel(text_config, add_pooling_layer=False),
            "mlp": AestheticMLP(text_config.hidden_size),  # the same linear stack
        }
        converted = {"vision": vision_sd, "text": text_sd, "mlp": mlp_sd}
        _check_fit(modules, converted, f"ImageReward weights '{weights}'")
        for component, module in modules.items():
            module.load_state_dict(converted[component])
        return cls(modules["vision"], modules["text"], modules["mlp"], tok, device)

    @torch.no_grad()
    def raw_reward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Unnormalised rewards [N] for preprocessed images and tokenised prompts."""
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device)).last_hidden_state
        hidden = self.text(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
            is_decoder=False,  # ImageReward's encoder mode: bidirectional self-attention
        ).last_hidden_state
        return self.head(hidden[:, 0].float()).float()

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str] | str, batch_size: int = 16) -> torch.Tensor:
        """Normalised ImageReward of each image for its prompt (one prompt may serve all), float [N] on CPU."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rewards = [torch.zeros(0)]
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(im, self.image_size) for im in images[start : start + batch_size]])
            tokens = self.tokenizer(
                prompts[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=MAX_TEXT_LENGTH,
                return_tensors="pt",
            )
            rewards.append(self.raw_reward(pixels, tokens.input_ids, tokens.attention_mask).cpu())
        return (torch.cat(rewards) - REWARD_MEAN) / REWARD_STD
