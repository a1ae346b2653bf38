"""RAE (models/rae.py, nn/feature_disc.py, stages/rae.py) and its latent generator (models/rae_dit.py, nn/dit.py):
tiny widths; the frozen encoders are an aeforge MAE checkpoint written here or random ones (said so)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from aeforge.models.rae import DECODER_PRESETS, RAE
from aeforge.models.rae_dit import RAEDiT
from aeforge.nn.dit import DiT, apply_rope, rope_2d
from aeforge.nn.feature_disc import DINODiscriminator, diff_augment
from aeforge.nn.flow import dimension_shift, time_grid
from aeforge.train import run
from tests.conftest import compose_cfg, needs_data

MAE_NODE = {"_target_": "aeforge.models.mae.MAE", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
TINY_TIMM = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_rae(**kw) -> RAE:
    args = dict(encoder="timm:vit_tiny_patch16_224", encoder_input_size=16, missing_weights="random",
                encoder_kwargs=TINY_TIMM, decoder="B", decoder_width=32, decoder_depth=1, decoder_heads=2,
                decoder_mlp=64, patch_size=4)
    return RAE((3, 16, 16), **{**args, **kw})


def test_noise_augmentation_train_only_uniform_and_halfnormal():
    torch.manual_seed(0)
    for noise, check in (("uniform", lambda s: s.max() < 0.86), ("halfnormal", lambda s: s.max() > 1.5)):
        model = tiny_rae(noise=noise)
        z = torch.zeros(4000, 1, 1)
        sigma = model.add_noise(z.expand(-1, 2000, 1), 0.8).std(1).flatten()  # per-sample sigma
        assert check(sigma)
        # uniform: E[sigma] = tau/2; half-normal: E[sigma] = tau * sqrt(2/pi)
        expected = 0.4 if noise == "uniform" else 0.8 * (2 / torch.pi) ** 0.5
        assert abs(sigma.mean().item() - expected) < 0.02
    model = tiny_rae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model.eval()
    assert torch.equal(model({"x": x})["z"], model.encoder(x))  # no noise outside training
    model.train()
    assert not torch.equal(model({"x": x})["z"], model.encoder(x))


def test_presets_and_bad_values_name_the_key():
    assert DECODER_PRESETS["XL"] == (1152, 28, 16, 4096) and DECODER_PRESETS["B"] == (768, 12, 12, 3072)
    with pytest.raises(ValueError, match="model.decoder='XXL'.*'B', 'L', 'XL'"):
        tiny_rae(decoder="XXL")
    with pytest.raises(ValueError, match="model.noise='gauss'.*'uniform', 'halfnormal'"):
        tiny_rae(noise="gauss")
    with pytest.raises(ValueError, match="model.patch_size=4"):
        tiny_rae(patch_size=8)


def test_dino_discriminator_grad_reaches_images_not_backbone():
    torch.manual_seed(0)
    disc = DINODiscriminator("timm:vit_tiny_patch16_224", input_size=16, missing_weights="random",
                             backbone_kwargs=TINY_TIMM, layers=[0, 1], channels=8)
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (3, 2 * 16)
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="layers \\[5\\] out of range"):
        DINODiscriminator("timm:vit_tiny_patch16_224", input_size=16, missing_weights="random",
                          backbone_kwargs=TINY_TIMM, layers=[5])
    shifted = diff_augment(torch.ones(8, 3, 16, 16), translation=0.25)
    assert shifted.shape == (8, 3, 16, 16) and (shifted == 0).any()  # translation pads with zeros


def test_dit_starts_at_zero_ddt_head_and_rope():
    torch.manual_seed(0)
    dit = DiT(16, (4, 4), width=32, depth=2, heads=2, num_classes=10, head_width=48, head_depth=1, head_heads=2)
    dit.eval()
    x, t, y = torch.randn(3, 16, 16), torch.rand(3), torch.tensor([0, 1, 2])
    assert torch.equal(dit(x, t, y), torch.zeros(3, 16, 16))  # AdaLN-Zero + zero output layer
    assert dit.head[0].ada[1].in_features == 48  # the head is conditioned per token at its own width
    torch.nn.init.normal_(dit.final.linear.weight)
    for blk in [*dit.blocks, *dit.head]:
        torch.nn.init.normal_(blk.ada[1].weight, std=0.1)
    v = dit(x, t, y)
    assert v.shape == (3, 16, 16) and v.abs().sum() > 0
    assert torch.equal(dit(x, t, y), v)  # no label dropout in eval
    cos, sin = rope_2d((4, 4), 8)
    q = torch.randn(2, 16, 8)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation


def test_shift_on_training_times_and_the_sampler_grid(monkeypatch):
    torch.manual_seed(0)
    rae = tiny_rae()
    model = RAEDiT((3, 16, 16), rae, allow_untrained_rae=True, num_classes=10, width=32, depth=1, heads=2,
                   head_depth=0, sample_steps=4)
    s = (16 * 32 / 4096) ** 0.5
    assert model.shift == pytest.approx(s) == pytest.approx(dimension_shift(16 * 32))
    seen = []
    forward = model.dit.forward
    monkeypatch.setattr(model.dit, "forward", lambda x, t, y=None: seen.append(t[0].item()) or forward(x, t, y))
    images = model.sample(2, labels=torch.tensor([1, 2]), guidance=1.0, steps=4)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert seen == pytest.approx(time_grid(4, s)[:-1].tolist(), abs=1e-6)
    off = RAEDiT((3, 16, 16), rae, allow_untrained_rae=True, num_classes=10, width=32, depth=1, heads=2,
                 head_depth=0, use_shift=False)
    assert off.shift == 1.0
    with pytest.raises(ValueError, match="model.rae_ckpt is required"):
        RAEDiT((3, 16, 16), rae, width=32, depth=1, heads=2)


def write_mae_run(root):
    (root / "checkpoints").mkdir(parents=True)
    OmegaConf.save({"model": MAE_NODE, "data": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}},
                   root / "config_resolved.yaml")
    torch.manual_seed(1)
    from aeforge.models.mae import MAE

    mae = MAE((3, 32, 32), **{k: v for k, v in MAE_NODE.items() if k != "_target_"})
    state = {f"model.{k}": v for k, v in mae.state_dict().items()}
    torch.save({"state_dict": state}, root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt", state


TINY_DECODER = ["model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2", "model.decoder_mlp=64",
                "model.patch_size=8"]


@needs_data("cifar10_jpeg_subset")
def test_rae_trains_with_gan_encoder_bit_identical_then_dit_trains_and_samples(tmp_path):
    """rae_cifar10 with a frozen aeforge MAE: GAN on from step 0, 3 steps; the encoder's weights in the
    checkpoint equal the MAE's; the latent statistics are stored. Then rae_dit_cifar10 on that checkpoint:
    3 steps, CFG and AutoGuidance samples in [-1, 1]."""
    mae_ckpt, mae_state = write_mae_run(tmp_path / "mae")
    rae_dir = tmp_path / "rae"
    cfg = compose_cfg(["experiment=rae_cifar10", "debug=smoke", f"rae.encoder_ckpt={mae_ckpt}", *TINY_DECODER,
                       "objective.terms.adversarial.start_epoch=0", "objective.terms.adversarial.disc_start_epoch=0",
                       "objective.terms.adversarial.discriminator.layers=[0,1]",
                       "objective.terms.adversarial.discriminator.channels=8", "evaluate=false"], rae_dir)
    run(cfg)
    metrics = json.loads((rae_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train/adversarial_weight"] > 0  # the GAN term was on
    state = torch.load(rae_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    enc = {k[len("model.encoder.net."):]: v for k, v in state.items() if k.startswith("model.encoder.net.")}
    assert enc and all(torch.equal(v, mae_state[f"model.encoder.{k}"]) for k, v in enc.items()
                       if f"model.encoder.{k}" in mae_state)
    assert bool(state["model.latent_norm.done"]) and state["model.latent_norm.count"] == 8
    assert not torch.equal(state["model.latent_norm.var"], torch.ones_like(state["model.latent_norm.var"]))

    dit_dir = tmp_path / "dit"
    dit_over = ["experiment=rae_dit_cifar10", "debug=smoke", f"rae.ckpt={rae_dir / 'checkpoints' / 'last.ckpt'}",
                f"rae.encoder_ckpt={mae_ckpt}", *[o.replace("model.", "model.rae.") for o in TINY_DECODER],
                "model.width=32", "model.depth=1", "model.heads=2", "model.head_width=48", "model.head_heads=2",
                "evaluate=false"]
    cfg = compose_cfg(dit_over, dit_dir)
    run(cfg)
    assert json.loads((dit_dir / "metrics.json").read_text())["steps"] == 3
    from hydra.utils import instantiate

    model = instantiate(cfg.model, input_shape=(3, 32, 32), num_classes=10,
                        guidance_mode="autoguidance", guide_ckpt=str(dit_dir / "checkpoints" / "last.ckpt"))
    model.load_state_dict({k[6:]: v for k, v in torch.load(dit_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                                                            weights_only=False)["state_dict"].items()
                           if k.startswith("model.")})
    assert torch.equal(model.rae.latent_norm.var, state["model.latent_norm.var"])  # the stats came from rae.ckpt
    g = torch.Generator().manual_seed(0)
    auto = model.sample(3, labels=torch.tensor([0, 1, 2]), guidance=1.5, steps=2, generator=g)
    model.guidance_mode = "cfg"
    cfg_samples = model.sample(3, labels=torch.tensor([0, 1, 2]), guidance=1.5, steps=2, generator=g)
    for images in (auto, cfg_samples):
        assert images.shape == (3, 3, 32, 32) and images.abs().max() <= 1 and torch.isfinite(images).all()
