"""SAE export (aeforge/models/sae_export.py): the sparsify layout round-trips exactly; the SAELens layout
holds the transposed encoder and the activation's threshold."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from aeforge.models.sae import SAEBank
from aeforge.models.sae_activations import JumpReLU, TopK
from aeforge.models.sae_export import load_sparsify, save_saelens, save_sparsify


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
