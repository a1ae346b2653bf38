"""The scgc_pretrain stage (AE pre-training + k-means start): its cache, its seeds (from the config, never the
environment), the run's random stream left alone; and the export of its cached AE for the official code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from aeforge.eval.clustering import fit_kmeans
from aeforge.models.scgc import SCGC
from aeforge.nn.mlp import mlp
from aeforge.stages import StageContext
from aeforge.stages.scgc import SCGCPretrain
from tests.conftest import ROOT, compose_cfg


class _Graph:
    """What the stage reads of a GraphDataModule."""

    def __init__(self, x: torch.Tensor):
        self.features = x


def _start(x: torch.Tensor, run_seed: int, model: SCGC | None = None, **stage) -> tuple[SCGC, dict]:
    model = model or SCGC((x.shape[1],), hidden_dims=[16], latent_dim=4, n_clusters=2)
    stage = SCGCPretrain(**{"epochs": 1, "batch_size": 32, "kmeans_n_init": 2, "cache_dir": None, **stage})
    info = stage(model, _Graph(x), StageContext(run_dir=Path("."), seed=run_seed, device=torch.device("cpu")))
    return model, info


def test_pretrain_cache_is_per_seed_when_seed_is_null(tmp_path):
    """stages.scgc_pretrain.seed=null gives each run seed its own AE; the cache must not hand seed 1 seed 0's."""
    x = torch.rand(64, 8)

    def pretrained(seed: int) -> tuple[torch.Tensor, float]:
        model, info = _start(x, seed, cache_dir=str(tmp_path), seed=None)
        return model.encoder[0].weight.detach().clone(), info["pretrain_cached"]

    w0, cached0 = pretrained(0)
    w1, cached1 = pretrained(1)
    w0_again, cached0_again = pretrained(0)
    assert (cached0, cached1, cached0_again) == (0.0, 0.0, 1.0)
    assert not torch.equal(w0, w1) and torch.equal(w0, w0_again)


def test_seeds_come_from_the_config_not_the_environment(tmp_path, monkeypatch):
    """The run seed reaches the stage as ctx.seed (cfg.seed) and k-means's as `${seed}`; what Lightning leaves
    in PL_GLOBAL_SEED has no say."""
    x = torch.rand(64, 8)
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    a, _ = _start(x, 0, seed=None, kmeans_seed=None)
    monkeypatch.setenv("PL_GLOBAL_SEED", "6")
    b, _ = _start(x, 0, seed=None, kmeans_seed=None)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    cfg = compose_cfg(["experiment=scgc_acm", "seed=7"], tmp_path)
    assert cfg.stages.scgc_pretrain.kmeans_seed == 7 and cfg.stages.scgc_pretrain.seed == 0


def test_stage_sets_ae_and_kmeans_centres_and_leaves_the_run_stream(tmp_path):
    """The model gets the cached AE's weights and the k-means centres of its z, is marked initialised, and
    the run's torch stream is where it was (the pre-training draws from its own seed). SCGC* keeps the
    encoder of a full AE pre-training."""
    x = torch.rand(64, 8)
    model = SCGC((8,), hidden_dims=[16], latent_dim=4, n_clusters=2)
    state = torch.get_rng_state()
    model, info = _start(x, 3, model, cache_dir=str(tmp_path), kmeans_seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert bool(model.initialised) and info["pretrain_cached"] == 0.0 and info["pretrain_mse"] > 0
    (cached,) = tmp_path.glob("ae_*.pt")
    ae = torch.load(cached, weights_only=True)
    for k, v in ae["encoder"].items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    for k, v in ae["decoder"].items():
        assert torch.equal(model.decoder.state_dict()[k], v), k
    with torch.no_grad():
        z = model.encoder(x).numpy()
    np.testing.assert_array_equal(model.centres.detach().numpy(), fit_kmeans(z, 2, 2, 11).cluster_centers_)
    star, info = _start(x, 3, SCGC((8,), hidden_dims=[16], latent_dim=4, decoder=False, n_clusters=2),
                        cache_dir=str(tmp_path))
    assert info["pretrain_cached"] == 1.0 and torch.equal(star.encoder[0].weight, model.encoder[0].weight)


def test_export_for_the_official_code_keeps_data_graph_and_ae(tmp_path):
    """scripts/export_scgc_official.py: the files the official SCGC/SDCN train.py reads, with our features
    (scaled), labels, edge list and cached AE under SDCN's parameter names."""
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 6)).astype(np.float32), rng.integers(0, 3, 20)
    edges = rng.integers(0, 20, (30, 2))
    np.savez(tmp_path / "g.npz", x=x, y=y, adj=edges, adj_k3=edges[:25])
    torch.manual_seed(0)
    enc, dec = mlp([6, 5, 5, 8, 2], "relu"), mlp([2, 8, 5, 5, 6], "relu")
    torch.save({"encoder": enc.state_dict(), "decoder": dec.state_dict(), "mse": 0.1}, tmp_path / "ae.pt")

    def export(*args: str) -> dict:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_scgc_official.py"), "--npz",
                               str(tmp_path / "g.npz"), *args], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    info = export("--name", "usps", "--k", "3", "--feature-scale", "2", "--ae", str(tmp_path / "ae.pt"),
                  "--out", str(tmp_path / "out"))
    out = tmp_path / "out"
    assert np.allclose(np.loadtxt(out / "data" / "usps.txt"), x * 2, atol=1e-6)
    assert np.array_equal(np.loadtxt(out / "data" / "usps_label.txt", dtype=int), y)
    assert np.array_equal(np.loadtxt(out / "graph" / "usps3_graph.txt", dtype=int), edges[:25])
    state = torch.load(out / "data" / "usps.pkl", weights_only=True)
    assert torch.equal(state["enc_1.weight"], enc[0].weight) and torch.equal(state["z_layer.bias"], enc[6].bias)
    assert torch.equal(state["x_bar_layer.weight"], dec[6].weight) and len(state) == 16
    assert info["nodes"] == 20 and info["edges"] == 25
    export("--name", "acm", "--out", str(tmp_path / "own"))
    assert np.array_equal(np.loadtxt(tmp_path / "own" / "graph" / "acm_graph.txt", dtype=int), edges)
