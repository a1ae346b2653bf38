"""SAE export (docs/methods/sae.md, "Export"): one folder per hookpoint.

- `save_sparsify` / `load_sparsify`: `sae.safetensors` (encoder.weight (h, d), encoder.bias (h,), W_dec (h, d),
  b_dec (d,)) and `cfg.json` (d_in, num_latents, k, ...), the layout EleutherAI sparsify loads;
- `save_saelens`: `sae_weights.safetensors` (W_enc (d, h), W_dec (h, d), b_enc, b_dec[, threshold]) and
  `cfg.json` (d_in, d_sae, architecture, hook_name, ...) for SAELens; `load_saelens` reads one back.
The `aeforge` entry of each cfg.json holds the SAE's own settings (`config_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aeforge.models.sae import SAEBank, SparseAutoencoder
from aeforge.models.sae_activations import TopK

SAELENS_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}  # else "topk"


def config_dict(sae: SparseAutoencoder) -> dict:
    """The SAE's settings, as stored next to the weights (`k` only for activations that have one)."""
    cfg = {
        "d_in": sae.d,
        "num_latents": sae.h,
        "activation": sae.activation.name,
        "k": sae.activation.k,
        "pre_bias": sae.pre_bias,
        "input_norm": sae.input_norm,
        "unit_norm_decoder": sae.unit_norm_decoder,
    }
    return {key: v for key, v in cfg.items() if v is not None}


def _folders(bank: SAEBank, out_dir: str | Path, names: list[str] | None):
    """(folder, site name, SAE) of each held site; folder names are the hookpoints, made path-safe."""
    names = names or [f"site{s}" for s in range(bank.n_sites)]
    for s, sae in bank.local_sites():
        folder = Path(out_dir) / names[s].replace("/", "_").replace("*", "x")
        folder.mkdir(parents=True, exist_ok=True)
        yield folder, names[s], sae


def _write(folder: Path, weights_file: str, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu().float() for k, v in tensors.items()}, str(folder / weights_file))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))


def save_sparsify(bank: SAEBank, out_dir: str | Path, hookpoints: list[str] | None = None) -> list[Path]:
    """sparsify layout: <out_dir>/<hookpoint>/{sae.safetensors, cfg.json}. Folded: sparsify has no input
    layer norm and always subtracts b_dec before the encoder (our pre_bias)."""
    paths = []
    for folder, name, sae in _folders(bank, out_dir, hookpoints):
        b_enc = sae.b_enc.detach()
        if not sae.pre_bias:  # fold: W(x) + b = W(x - b_dec) + (b + W b_dec)
            b_enc = b_enc + sae.W_enc.detach() @ sae.b_dec.detach()
        act = sae.activation
        cfg = {
            "d_in": sae.d,
            "num_latents": sae.h,
            "k": act.k,  # left out without one: sparsify's default applies
            "expansion_factor": sae.h // sae.d,
            "normalize_decoder": sae.unit_norm_decoder,
            "multi_topk": False,
            "skip_connection": False,
            "activation": "topk" if act.sparse else act.name,
            "hookpoint": name,
            "aeforge": config_dict(sae),
        }
        cfg = {key: v for key, v in cfg.items() if v is not None}
        tensors = {"encoder.weight": sae.W_enc, "encoder.bias": b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        _write(folder, "sae.safetensors", tensors, cfg)
        paths.append(folder)
    return paths


def load_sparsify(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read one sparsify-format folder (cfg.json + sae.safetensors) as a TopK SparseAutoencoder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae.safetensors"), device=str(device))
    d_in = int(cfg.get("d_in", t["W_dec"].shape[1]))
    h = int(cfg.get("num_latents") or t["W_dec"].shape[0])
    sae = SparseAutoencoder(
        d_in,
        h,
        TopK(k=int(cfg.get("k", 32))),  # sparsify's default k
        pre_bias=True,
        input_norm=cfg.get("aeforge", {}).get("input_norm", "none"),
        unit_norm_decoder=False,
        aux_k=0,
    )
    with torch.no_grad():
        sae.W_enc.copy_(t["encoder.weight"])
        sae.b_enc.copy_(t["encoder.bias"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
    return sae.to(device).eval()


def save_saelens(bank: SAEBank, out_dir: str | Path, hookpoints: list[str] | None = None) -> list[Path]:
    """SAELens layout: <out_dir>/<hookpoint>/{sae_weights.safetensors, cfg.json}; W_enc is (d, h) there."""
    paths = []
    for folder, name, sae in _folders(bank, out_dir, hookpoints):
        act = sae.activation
        tensors = {"W_enc": sae.W_enc.t(), "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
        if act.name == "jumprelu":
            tensors["threshold"] = sae.log_threshold.exp()
        if act.name == "batchtopk":
            tensors["threshold"] = torch.full((sae.h,), float(sae.threshold.clamp_min(0)))
        cfg = {
            "architecture": SAELENS_ARCHITECTURE.get(act.name, "topk"),
            "d_in": sae.d,
            "d_sae": sae.h,
            "activation_fn_kwargs": {"k": act.k} if act.sparse and act.k is not None else {},
            "apply_b_dec_to_input": sae.pre_bias,
            "hook_name": name,
            "dtype": "float32",
            "normalize_activations": "layer_norm" if sae.input_norm == "layernorm" else "none",
            "aeforge": config_dict(sae),
        }
        _write(folder, "sae_weights.safetensors", tensors, cfg)
        paths.append(folder)
    return paths


def load_saelens(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read one SAELens-format folder (cfg.json + sae_weights.safetensors) as a SparseAutoencoder that computes
    what SAELens computes from those files: `standard` ReLU, `jumprelu` (a BatchTopK export: its inference
    threshold) or `topk`, on x − b_dec when `apply_b_dec_to_input`."""
    from safetensors.torch import load_file

    from aeforge.models.sae_activations import JumpReLU, ReLU

    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    t = load_file(str(path / "sae_weights.safetensors"), device=str(device))
    arch = cfg["architecture"]
    if arch == "standard":
        act = ReLU()
    elif arch == "jumprelu":
        act = JumpReLU()
    elif arch == "topk":
        act = TopK(k=int(cfg["activation_fn_kwargs"]["k"]))
    else:
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not one aeforge exports")
    norm = "layernorm" if cfg.get("normalize_activations") == "layer_norm" else "none"
    sae = SparseAutoencoder(int(cfg["d_in"]), int(cfg["d_sae"]), act, pre_bias=bool(cfg["apply_b_dec_to_input"]),
                            input_norm=norm, unit_norm_decoder=False, aux_k=0)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].t())
        sae.b_enc.copy_(t["b_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_dec.copy_(t["b_dec"])
        if arch == "jumprelu":
            sae.log_threshold.copy_(t["threshold"].log())
    return sae.to(device).eval()
