"""SAE export (aeforge/models/sae_export.py): the sparsify layout round-trips exactly; the SAELens layout
holds the transposed encoder and the activation's threshold, and round-trips through load_saelens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aeforge.models.sae import SAEBank
from aeforge.models.sae_activations import BatchTopK, JumpReLU, ReLU, TopK
from aeforge.models.sae_export import load_saelens, load_sparsify, save_saelens, save_sparsify


def test_sparsify_export_round_trip(tmp_path):
    torch.manual_seed(0)
    bank = SAEBank((1, 16), TopK(k=4), n_latents=64, aux_k=0)
    with torch.no_grad():
        bank.saes[0].b_dec.normal_()
    bank.eval()
    (path,) = save_sparsify(bank, tmp_path, ["layers.3.residual"])
    loaded = load_sparsify(path)
    x = torch.randn(10, 16)
    assert torch.allclose(loaded(x).recon_raw, bank.saes[0](x).recon_raw, atol=1e-6)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["k"] == 4 and cfg["activation"] == "topk" and cfg["hookpoint"] == "layers.3.residual"


def test_saelens_export_layout(tmp_path):
    torch.manual_seed(0)
    bank = SAEBank((2, 8), JumpReLU(init_threshold=0.5), n_latents=32, aux_k=0)
    paths = save_saelens(bank, tmp_path, ["layers.0.mlp", "blocks/1"])
    assert [p.name for p in paths] == ["layers.0.mlp", "blocks_1"]
    t = load_file(str(paths[0] / "sae_weights.safetensors"))
    sae = bank.saes[0]
    assert torch.equal(t["W_enc"], sae.W_enc.detach().t()) and torch.equal(t["W_dec"], sae.W_dec.detach())
    assert torch.allclose(t["threshold"], torch.full((32,), 0.5))
    cfg = json.loads((paths[0] / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 32 and cfg["hook_name"] == "layers.0.mlp"
    assert cfg["aeforge"]["activation"] == "jumprelu" and "k" not in cfg["aeforge"]


def _saelens_reference(folder, x: torch.Tensor) -> torch.Tensor:
    """SAELens' forward written from the exported files alone (cfg.json + sae_weights.safetensors)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    x_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = x_in @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        f = pre.relu()
    elif cfg["architecture"] == "jumprelu":
        f = pre.relu() * (pre > t["threshold"])
    else:
        k = cfg["activation_fn_kwargs"]["k"]
        top = pre.relu().topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return f @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("activation,pre_bias", [(ReLU(), True), (JumpReLU(init_threshold=0.3), True),
                                                 (TopK(k=5), False), (BatchTopK(k=5), True)])
def test_saelens_export_round_trip(tmp_path, activation, pre_bias):
    """save_saelens -> load_saelens (the documented loader) gives the same outputs as the exported SAE, and so
    does SAELens' forward computed from the files alone."""
    torch.manual_seed(0)
    bank = SAEBank((1, 16), activation, n_latents=48, aux_k=0, pre_bias=pre_bias)
    sae = bank.saes[0]
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    if activation.name == "batchtopk":
        sae.train()(torch.randn(64, 16))  # a training batch sets the inference threshold
        assert float(sae.threshold) > 0
    bank.eval()
    (folder,) = save_saelens(bank, tmp_path, ["layers.1.residual"])
    loaded = load_saelens(folder)
    x = torch.randn(20, 16)
    with torch.no_grad():
        ours, back = sae(x), loaded(x)
        assert ours.l0.sum() > 0 and (ours.l0 < 48).all()  # a sparse code, so the rule is exercised
        assert torch.allclose(back.recon_raw, ours.recon_raw, atol=1e-5)
        assert torch.allclose(_saelens_reference(folder, x), ours.recon_raw, atol=1e-5)
