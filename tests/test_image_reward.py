"""ImageReward on transformers' BLIP modules, checked on a tiny random model of the same layout.

The checkpoint is written in ImageReward's naming by a hand-written inverse mapping (independent of
the module's rule table), and scores are compared with oracles computed from the original modules
and from a timm-style ViT forward, so a wrong key mapping changes the numbers.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from nitrofusion.errors import UserError
from nitrofusion.evaluation.image_reward import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_TEXT_LENGTH,
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardScorer,
    convert_state_dict,
    image_reward_name,
    preprocess,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "red", "blue", "photo", "of"]
PROMPTS = ["a photo of a red cat", "the blue dog", "a dog on the cat", "red"]
# transformers -> ImageReward (timm ViT) name pieces, applied in order
VISION_TO_TIMM = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding", "patch_embed.proj"),
    ("encoder.layers.", "blocks."),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.projection", "attn.proj"),
    ("self_attn.qkv", "attn.qkv"),
    ("post_layernorm", "norm"),
]


def tiny_configs() -> tuple[BlipVisionConfig, BlipTextConfig]:
    # different vision and text widths, so a cross-attention key/value mix-up cannot fit by accident
    vision = BlipVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=len(VOCAB) + 2,  # + [DEC], [ENC]
        hidden_size=32,
        encoder_hidden_size=24,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        pad_token_id=0,
        bos_token_id=len(VOCAB),  # [DEC]
        sep_token_id=VOCAB.index("[SEP]"),
        is_decoder=True,
    )
    return vision, text


def head_layers(width: int) -> nn.Sequential:
    """ImageReward's MLP written out here (not imported), so the oracle does not share its layout."""
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    ).eval()


def to_image_reward_names(vision: dict, text: dict, head: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in vision.items():
        for old, new in VISION_TO_TIMM:
            key = key.replace(old, new)
        out[f"blip.visual_encoder.{key}"] = value
    out.update({f"blip.text_encoder.{k}": v for k, v in text.items()})  # BERT names on both sides
    out.update({f"mlp.layers.{k}": v for k, v in head.items()})
    return {k: v.clone().contiguous() for k, v in out.items()}


def timm_vit(state: dict[str, torch.Tensor], pixels: torch.Tensor, cfg: BlipVisionConfig) -> torch.Tensor:
    """BLIP's timm ViT forward computed from ImageReward-named tensors."""
    w = {k.removeprefix("blip.visual_encoder."): v for k, v in state.items()}
    d, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps
    x = F.conv2d(pixels, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + w["pos_embed"]
    b, n, _ = x.shape
    for i in range(cfg.num_hidden_layers):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        qkv = F.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(b, n, d), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        h = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), w["norm.weight"], w["norm.bias"], eps)


def random_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 48), (32, 32), (50, 50)]  # portrait, landscape, exact, square to resize
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def write_vocab(directory, words=VOCAB):
    directory.mkdir(exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-reward")
    torch.manual_seed(0)
    vcfg, tcfg = tiny_configs()
    vision, text = BlipVisionModel(vcfg).eval(), BlipTextModel(tcfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # transformers' init leaves the ViT ~0 and LayerNorms at 1/0: make every tensor matter
        for p in [*vision.parameters(), *text.parameters()]:
            p.normal_(0.0, 0.3)
    head = head_layers(tcfg.hidden_size)
    state = to_image_reward_names(vision.state_dict(), text.state_dict(), head.state_dict())
    extras = {  # in the released file but unused for scoring
        "blip.vision_proj.weight": torch.randn(8, 24),
        "blip.text_proj.bias": torch.randn(8),
        "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
    }
    save_file({**state, **extras}, root / "ir.safetensors")
    tok = write_vocab(root / "tok")
    scorer = ImageRewardScorer.load(root / "ir.safetensors", tok, vision_config=vcfg, text_config=tcfg)
    return SimpleNamespace(
        root=root, tok=tok, state=state, extras=extras, vision=vision, text=text, head=head, scorer=scorer
    )


def load_variant(tiny, state, name="variant.safetensors", tok=None):
    save_file(state, tiny.root / name)
    return ImageRewardScorer.load(
        tiny.root / name, tok or tiny.tok, vision_config=tiny_configs()[0], text_config=tiny_configs()[1]
    )


def test_conversion_round_trips_and_consumes_every_key(tiny):
    vision_sd, text_sd, mlp_sd = convert_state_dict({**tiny.state, **tiny.extras})
    for converted, module, component in [
        (vision_sd, tiny.vision, "vision"),
        (text_sd, tiny.text, "text"),
        (mlp_sd, tiny.head, "mlp"),
    ]:
        original = {("layers." if component == "mlp" else "") + k: v for k, v in module.state_dict().items()}
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k], original[k]) for k in original)
        assert all(image_reward_name(component, k) in tiny.state for k in original)  # the module's own inverse
    assert len(vision_sd) + len(text_sd) + len(mlp_sd) == len(tiny.state)  # only the extras were dropped
    assert any(".crossattention." in k for k in text_sd)


def test_vision_mapping_matches_a_timm_vit_forward(tiny):
    pixels = torch.stack([preprocess(im, 32) for im in random_images()])
    with torch.no_grad():
        got = tiny.scorer.vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, timm_vit(tiny.state, pixels, tiny_configs()[0]), rtol=1e-4, atol=1e-5)


def test_score_matches_oracle_from_original_modules(tiny):
    images = random_images()
    pixels = torch.stack([preprocess(im, 32) for im in images])
    tokens = tiny.scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (4, 35) and (tokens.input_ids[:, 0] == VOCAB.index("[CLS]")).all()
    with torch.no_grad():
        image_embeds = tiny.vision(pixel_values=pixels).last_hidden_state
        hidden = tiny.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        ).last_hidden_state
        raw = tiny.head(hidden[:, 0])[:, 0]
    got = tiny.scorer.score(images, PROMPTS, batch_size=3)  # two batches, the second ragged
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, (raw - 0.16717362830052426) / 1.0333394966054072, rtol=1e-5, atol=1e-5)
    # normalisation: (raw - mean) / std with the published constants
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    torch.testing.assert_close(got * REWARD_STD + REWARD_MEAN, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny.scorer.raw_reward(pixels, tokens.input_ids, tokens.attention_mask), raw)


def test_scores_depend_on_prompt_and_image(tiny):
    images = random_images()
    by_prompt = tiny.scorer.score([images[0]] * 4, PROMPTS)
    by_image = tiny.scorer.score(images, "a photo of a cat")
    assert by_prompt.unique().numel() == 4 and by_image.unique().numel() == 4
    assert tiny.scorer.score([], "a cat").shape == (0,)


def test_long_prompt_is_truncated_to_35_tokens(tiny):
    long = " ".join(["a red cat on the blue dog"] * 10)
    assert len(tiny.scorer.tokenizer(long).input_ids) > MAX_TEXT_LENGTH
    image = random_images()[:1]
    first, second = tiny.scorer.score(image, long), tiny.scorer.score(image, long + " photo of the dog")
    assert torch.isfinite(first).all() and torch.equal(first, second)  # words past token 35 are dropped


def test_preprocess_resizes_crops_and_normalises():
    # constant colour: bicubic keeps it, so every pixel is (c/255 - mean) / std, channel by channel
    x = preprocess(Image.new("RGB", (70, 50), (200, 30, 120)), 32)
    expected = (torch.tensor([200, 30, 120]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 32, 32))
    # 64x32, already 32 on the short side: no resize, a centred crop of columns 16..47
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3))
    x = preprocess(Image.fromarray(ramp).convert("L"), 32)  # grey input becomes RGB
    torch.testing.assert_close(x[0, 0] * CLIP_STD[0] + CLIP_MEAN[0], torch.arange(16, 48) / 255.0)


def one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_files_say_what_is_needed(tiny, tmp_path):
    msg = one_line_error(lambda: ImageRewardScorer.load(tmp_path / "nope.safetensors", tiny.tok))
    assert "--image-reward " in msg and "THUDM/ImageReward" in msg and "weights_only=True" in msg
    (tmp_path / "ImageReward.pt").write_bytes(b"pickle")
    assert "safetensors" in one_line_error(lambda: ImageRewardScorer.load(tmp_path / "ImageReward.pt", tiny.tok))
    msg = one_line_error(lambda: ImageRewardScorer.load(tiny.root / "ir.safetensors", tmp_path / "no-tokenizer"))
    assert "--image-reward-tokenizer" in msg and "google-bert/bert-base-uncased" in msg


def test_state_dict_that_does_not_fit_is_named(tiny, tmp_path):
    removed = "blip.visual_encoder.blocks.1.attn.qkv.bias"
    state = {k: v for k, v in tiny.state.items() if k != removed}
    assert removed in one_line_error(lambda: load_variant(tiny, state))
    extra = "blip.visual_encoder.blocks.0.attn.rel_pos"
    assert extra in one_line_error(lambda: load_variant(tiny, {**tiny.state, extra: torch.zeros(1)}))
    beyond = "blip.text_encoder.encoder.layer.2.output.dense.bias"  # mappable, but the model has 2 layers
    assert beyond in one_line_error(lambda: load_variant(tiny, {**tiny.state, beyond: torch.zeros(32)}))
    bigger = write_vocab(tmp_path / "tok", [*VOCAB, "grass"])
    assert "tokens" in one_line_error(lambda: load_variant(tiny, tiny.state, tok=bigger))
