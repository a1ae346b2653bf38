"""aeforge/targets/encoders.py: frozen encoders (tiny random HF / timm configs built here, no download, and an
aeforge MAE checkpoint written here) and per-position latent statistics."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from aeforge.models.mae import MAE
from aeforge.targets.encoders import FrozenEncoder, LatentNorm

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4,
            image_size=16)


def save_hf(tmp_path, kind: str) -> str:
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTMAEConfig,
        ViTMAEModel,
    )

    config, cls = {"dino": (Dinov2WithRegistersConfig(**TINY, num_register_tokens=4), Dinov2WithRegistersModel),
                   "siglip": (SiglipVisionConfig(**TINY), SiglipVisionModel),
                   "mae": (ViTMAEConfig(**TINY), ViTMAEModel)}[kind]
    torch.manual_seed(0)
    model = cls(config)
    norm = getattr(model, "vision_model", model).post_layernorm if kind == "siglip" else model.layernorm
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)  # a non-trivial affine, so stripping it is visible
    torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    model.save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


def write_mae_run(tmp_path):
    """An aeforge MAE run as train.py leaves it: <run>/.hydra/config.yaml + <run>/checkpoints/last.ckpt."""
    node = {"_target_": "aeforge.models.mae.MAE", "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
    data = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "checkpoints").mkdir()
    OmegaConf.save({"model": node, "data": data}, tmp_path / ".hydra" / "config.yaml")
    torch.manual_seed(1)
    mae = MAE((3, 16, 16), **{k: v for k, v in node.items() if k != "_target_"})
    torch.save({"state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()}},
               tmp_path / "checkpoints" / "last.ckpt")
    return str(tmp_path / "checkpoints" / "last.ckpt"), mae, data


@pytest.mark.parametrize("kind,prefix", [("dino", 5), ("siglip", 0), ("mae", 1)])
def test_hf_encoders_drop_prefix_and_strip_final_affine(tmp_path, kind, prefix):
    path = save_hf(tmp_path, kind)
    enc = FrozenEncoder(f"hf:{path}", input_size=16)
    raw = FrozenEncoder(f"hf:{path}", input_size=16, drop_prefix_tokens=False, strip_final_norm_affine=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z, h = enc(x), raw(x)
    assert z.shape == (2, 16, 32) and enc.grid == (4, 4) and (enc.dim, enc.num_tokens) == (32, 16)
    assert h.shape == (2, 16 + prefix, 32)
    # the same tokens, with the LayerNorm's affine undone: zero mean and unit variance per token
    w, b = raw.final_norm.weight, raw.final_norm.bias
    assert torch.allclose((h[:, prefix:] - b) / w, z, atol=1e-4)
    assert z.mean(-1).abs().max() < 1e-4 and torch.allclose(z.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-2)
    assert torch.equal(enc(x), z)  # deterministic (ViT-MAE's random masking is off, the order is raster)


def test_aeforge_mae_checkpoint_is_the_offline_encoder(tmp_path):
    ckpt, mae, data = write_mae_run(tmp_path)
    enc = FrozenEncoder(f"aeforge:{ckpt}")  # images in [-1, 1] (data_mean = data_std = 0.5)
    assert (enc.grid, enc.dim, enc.input_size) == ((4, 4), 32, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    own = ((x + 1) / 2 - torch.tensor(data["mean"]).view(1, 3, 1, 1)) / torch.tensor(data["std"]).view(1, 3, 1, 1)
    h = mae.encoder.run_blocks(mae.encoder.embed(own))  # the MAE's own pipeline, then the stripped final norm
    pre = mae.encoder.norm
    expected = F.layer_norm((h[:, 1:] - pre.bias) / pre.weight, (32,), eps=pre.eps)
    assert torch.allclose(enc(x), expected, atol=1e-4)


def test_timm_random_stand_in_is_logged_and_weights_file_loads(tmp_path, caplog):
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with caplog.at_level(logging.WARNING):
        enc = FrozenEncoder("timm:vit_tiny_patch16_224", missing_weights="random", model_kwargs=kw,
                            strip_final_norm_affine=False)
    assert enc.stood_in and "RANDOM frozen encoder" in caplog.text
    assert enc(torch.zeros(2, 3, 16, 16)).shape == (2, 16, 32)
    torch.save(enc.net.state_dict(), tmp_path / "w.pt")
    loaded = FrozenEncoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "w.pt"), model_kwargs=kw,
                           strip_final_norm_affine=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert not loaded.stood_in and torch.equal(loaded(x), enc(x))


def test_bad_source_and_missing_weights_are_clear_errors():
    with pytest.raises(ValueError, match="source='dino:x'.*'hf:<...>', 'timm:<...>', 'aeforge:<...>'"):
        FrozenEncoder("dino:x")
    with pytest.raises(ValueError, match="missing_weights='maybe'.*'error', 'random'"):
        FrozenEncoder("hf:x", missing_weights="maybe")
    with pytest.raises(FileNotFoundError, match="missing_weights=random"):
        FrozenEncoder("hf:/nonexistent/folder")


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval(tmp_path):
    enc = FrozenEncoder(f"hf:{save_hf(tmp_path, 'dino')}", input_size=16)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    assert not enc(x).requires_grad


def test_latent_norm_merges_batches_exactly():
    z = torch.randn(50, 4, 3) * torch.rand(4, 3) * 3 + torch.randn(4, 3)
    norm = LatentNorm(4, 3)
    for chunk in z.split(7):
        norm.update(chunk)
    norm.finish()
    assert norm.ready
    assert torch.allclose(norm.mean, z.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, z.var(0, unbiased=False), atol=1e-4)
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-5)
    assert {"mean", "var", "count", "done"} <= set(norm.state_dict())  # stored in the checkpoint
