"""The scgc_pretrain stage (AE pre-training + k-means start): its cache, its seeds (from the config, never the
environment), the run's random stream left alone; and the export of its cached AE for the official code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aeforge.config import ConfigError
from aeforge.eval.clustering import fit_kmeans
from aeforge.models.scgc import SCGC
from aeforge.nn.mlp import mlp
from aeforge.stages import StageContext
from aeforge.stages.scgc import SCGCPretrain
from aeforge.train import build
from tests.conftest import ROOT, compose_cfg, needs_data


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


def test_restarts_keep_the_ae_the_criterion_prefers(tmp_path):
    """restarts=3 pre-trains the AEs of seeds 0, 1, 2 (each cached: the same AE as a restarts=1 run of that seed)
    and keeps the one the label-free criterion prefers; the start is that AE's, bit for bit."""
    x = torch.cat([torch.rand(40, 8) + 2 * (i % 2) for i in range(2)])  # two blobs: silhouettes differ by AE
    for select, sign in (("silhouette", 1), ("inertia", -1), ("mse", -1)):
        model, info = _start(x, 0, cache_dir=str(tmp_path), restarts=3, select=select)
        scores = [sign * info[f"restart{r}/{select}"] for r in range(3)]
        chosen = int(info["pretrain_restart"])
        assert chosen == int(np.argmax(scores)), (select, scores)
        single, _ = _start(x, 0, cache_dir=str(tmp_path), seed=chosen)
        assert torch.equal(model.encoder[0].weight, single.encoder[0].weight)
        assert torch.equal(model.centres, single.centres)
        assert 0 <= info[f"restart{chosen}/inertia"] <= 1 and -1 <= info[f"restart{chosen}/silhouette"] <= 1
    assert len(list(tmp_path.glob("ae_*.pt"))) == 3  # one file per AE seed, shared by all three criteria


def test_restarts_refuse_an_unknown_criterion(tmp_path):
    cfg = compose_cfg(["experiment=scgc_acm", "stages.scgc_pretrain.select=accuracy"], tmp_path)
    with pytest.raises(ConfigError, match=r"select='accuracy'.*\['inertia', 'mse', 'silhouette'\]"):
        build(cfg.stages.scgc_pretrain)


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


FAKE_OFFICIAL = '''import argparse
p = argparse.ArgumentParser()
for a in ("--name", "--iterations", "--epochs", "--verbosity", "--data_path", "--model", "--alpha", "--beta",
          "--order", "--tau", "--lr"):
    p.add_argument(a)
p.add_argument("--influence", action="store_true")
a = p.parse_args()
import os
assert os.path.isfile(f"{a.data_path}/data/{a.name}.pkl") and os.path.isfile(f"{a.data_path}/data/{a.name}.txt")
for e in range(int(a.epochs)):
    print(f" {e} {a.model}   Z:{0.5 + e / 100:6.4f}  Q:0.0  P:0.0")
'''


@pytest.mark.benchmark  # ~15 s (a whole train.py run in a fresh interpreter): make bench
@needs_data("acm")
def test_side_by_side_with_the_official_code_reports_both_runs_and_the_ratio(tmp_path):
    """scripts/bench_scgc.py --vs-official DIR: our run, then the official train.py (here a stand-in with its
    command line and its per-epoch log line) from the exported data and the AE our run kept; one JSON object."""
    official = tmp_path / "SCGC"
    official.mkdir()
    (official / "train.py").write_text(FAKE_OFFICIAL)
    (official / "models.py").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scgc.py"), "--vs-official", str(official),
                           "--dataset", "acm", "--epochs", "3", "--work", str(tmp_path / "work"), "debug=smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["official"]["acc_final"] == 0.52 and out["official"]["acc_best"] == 0.52
    assert 0 <= out["ours"]["acc_final"] <= 1 and out["ours"]["wall_s"] > 0
    ratio = out["ours"]["wall_s"] / out["official"]["wall_plus_pretrain_s"]  # of the rounded figures
    assert out["ratio_ours_over_official"] == pytest.approx(ratio, rel=0.05)
    assert (tmp_path / "work" / "official_data" / "graph" / "acm_graph.txt").is_file()
