"""APRE + MSS (card 12): the tabular data protocol, PRE / APRE against their formulas, mean-shift scoring on a
hand-made case, a tiny fit that beats chance, the bad-input errors and the sweep -> one-table aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from aeforge.config import ConfigError
from aeforge.data.sources import DataFileError
from aeforge.data.tabular import TabularDataModule
from aeforge.eval.mss import MeanShift, MeanShiftScoring
from aeforge.models.apre import ProbabilisticAE, TabularAE, width_rule
from aeforge.objectives.apre import GaussianNLL
from aeforge.train import model_inputs
from tests.conftest import DATA_DIR, compose_cfg, load_script, needs_data


def _table(path: Path, n: int = 400, d: int = 6, outliers: int = 40, seed: int = 0) -> Path:
    """Inliers on two Gaussian clusters; outliers uniform in a wide box (between and around the clusters)."""
    rng = np.random.default_rng(seed)
    centres = np.stack([np.full(d, -2.0), np.full(d, 2.0)])
    x = centres[rng.integers(2, size=n - outliers)] + 0.3 * rng.normal(size=(n - outliers, d))
    x = np.concatenate([x, rng.uniform(-4, 4, size=(outliers, d))]) * 5 + 10  # scaled / shifted raw features
    y = np.r_[np.zeros(n - outliers), np.ones(outliers)].astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return _table(tmp_path_factory.mktemp("tab") / "toy.npz")


def test_split_is_stratified_and_scaling_uses_train_only(table):
    dm = TabularDataModule(path=str(table), split_seed=3)
    raw = np.load(table)
    tr, te = dm.parts["train"], dm.parts["test"]
    assert (len(tr["x"]), len(te["x"])) == (280, 120)
    assert int(tr["anomaly"].sum()) == 28 and int(te["anomaly"].sum()) == 12  # 10 % in both parts
    # z-scored with the train part's statistics: exactly mean 0 / std 1 there, not on the test part
    assert torch.allclose(tr["x"].mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(tr["x"].std(0, unbiased=False), torch.ones(6), atol=1e-4)
    assert not torch.allclose(te["x"].mean(0), torch.zeros(6), atol=1e-3)
    back = te["x"].double().numpy() * dm.scale + dm.shift  # unscaled test rows are rows of the file
    assert np.abs(back[:, None] - raw["x"][None]).max(-1).min(1).max() < 1e-4
    # another seed, another split; the same seed, the same split
    assert not torch.equal(TabularDataModule(path=str(table), split_seed=4).parts["test"]["x"], te["x"])
    assert torch.equal(TabularDataModule(path=str(table), split_seed=3).parts["test"]["x"], te["x"])
    batch = next(iter(dm.eval_dataloader("test", 50)))
    assert set(batch) == {"x", "anomaly", "idx"} and batch["x"].shape == (50, 6)
    assert next(iter(dm.train_dataloader()))["x"].shape == (280, 6)  # full batch by default


def test_width_rule_follows_the_code():
    assert width_rule(9) == ([], 5)
    assert width_rule(21) == ([10], 5)  # round(21/2)=10 (banker's), round(21/4)=5
    assert width_rule(166) == ([83, 42], 21)
    assert width_rule(259) == ([130, 65], 16)
    pae = ProbabilisticAE((21,))
    assert pae.decoder[-1].out_features == 42 and isinstance(pae.encoder[-1], torch.nn.ReLU)


def test_pre_and_apre_match_their_formulas():
    torch.manual_seed(0)
    mu, var, x = torch.randn(4, 3), torch.rand(4, 3) + 0.1, torch.randn(4, 3)
    by_hand = ((mu - x) ** 2 / (var + 1e-5)).sum(1) + (var + 1e-5).log().sum(1)
    nll = GaussianNLL()({"recon": mu, "var": var}, {"x": x})
    assert nll.item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    weighted = GaussianNLL(alpha=0.5, beta=2.0)({"recon": mu, "var": var}, {"x": x})
    assert weighted.item() == pytest.approx((0.5 * ((mu - x) ** 2 / (var + 1e-5)).sum(1)
                                             + 2 * (var + 1e-5).log().sum(1)).mean().item(), rel=1e-6)
    model = ProbabilisticAE((3,), alpha=0.5, beta=2.0).eval()
    target = torch.randn(4, 3)
    out = model({"x": x})
    assert torch.all(out["var"] > 0)  # softplus variance
    expect = 0.5 * ((out["recon"] - target) ** 2 / (out["var"] + 1e-5)).sum(1) + 2 * (out["var"] + 1e-5).log().sum(1)
    assert torch.allclose(model.anomaly_score({"x": x, "target": target}), expect, rtol=1e-5)
    assert not torch.allclose(model.anomaly_score({"x": x}), expect)  # no target: scored against x


def test_mean_shift_by_hand():
    pool = np.array([[0.0], [1.0], [2.0], [10.0]])
    # m = 1: mean of the point and its k-1 = 2 nearest pool rows
    assert MeanShift(pool, 3, 1)(np.array([[0.4]]))[0, 0] == pytest.approx((0.4 + 0 + 1) / 3)
    # m = 2: the pool itself shifted once (each row -> mean of its 3 NN, itself included), then step 2 against it
    shifted = np.array([1.0, 1.0, 1.0, 13 / 3])
    t1 = (0.4 + 0 + 1) / 3
    near = np.sort(np.abs(shifted - t1).argsort()[:2])
    assert MeanShift(pool, 3, 2)(np.array([[0.4]]))[0, 0] == pytest.approx((t1 + shifted[near].sum()) / 3)


class _Identity(TabularAE):
    """An AE that reconstructs every input perfectly: its plain error cannot tell outliers apart."""

    def forward(self, batch):
        return {"z": batch["x"], "recon": batch["x"].flatten(1).float()}


class _Ctx:
    max_samples = None

    def __init__(self, model, parts):
        self.model, self.parts = model, parts

    def batches(self, split, desc):
        yield self.parts[split]


def test_mss_ranks_the_too_well_reconstructed_outlier_first():
    rng = np.random.default_rng(0)
    train = torch.tensor(rng.normal(size=(200, 2)), dtype=torch.float32)
    test = torch.tensor(np.r_[rng.normal(size=(30, 2)), [[6.0, 6.0]]], dtype=torch.float32)
    labels = torch.tensor([0] * 30 + [1])
    ctx = _Ctx(_Identity((2,)), {"train": {"x": train}, "test": {"x": test, "anomaly": labels}})
    assert _Identity((2,)).anomaly_score({"x": test}).abs().max() == 0  # plain error: all zero, no ranking
    out = MeanShiftScoring(ks=[5], iterations=[1, 2])(ctx)
    assert out["k5_m1/auroc"] == 1.0 and out["k5_m2/auroc"] == 1.0


def _fit(cfg, dm, steps: int):
    torch.manual_seed(0)
    model = instantiate(cfg.model, **model_inputs(cfg.model, dm))
    objective = instantiate(cfg.objective)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    batch = dm.parts["train"]
    for _ in range(steps):
        loss = objective(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("model", ["apre", "tabular_ae"])
def test_tiny_fit_beats_chance(table, tmp_path, model):
    cfg = compose_cfg(["experiment=apre_mss_adbench", f"model={model}", f"data.path={table}"], tmp_path)
    dm = instantiate(cfg.data)
    fitted = _fit(cfg, dm, 300)
    metrics = instantiate(cfg.eval)(fitted, dm, torch.device("cpu"))
    assert metrics["anomaly/auroc"] > 0.8 and metrics["mss/k10_m1/auroc"] > 0.6, metrics
    assert (model == "apre") == ("mss/x_a1_b1/auroc" in metrics)  # PRE only for the probabilistic model


def test_bad_inputs(tmp_path, table):
    root = tmp_path / "adbench"
    root.mkdir()
    np.savez(root / "cardio.npz", x=np.zeros((10, 2)), y=np.r_[np.zeros(9), 1])
    with pytest.raises(ConfigError, match=r"data.name='nope' is not a dataset.*valid names: \['cardio'\]"):
        TabularDataModule(name="nope", root=str(root))
    with pytest.raises(DataFileError, match="data not found: .*missing_dir/cardio.npz"):
        TabularDataModule(name="cardio", root=str(tmp_path / "missing_dir"))
    with pytest.raises(DataFileError, match="data not found"):
        TabularDataModule(path=str(tmp_path / "absent.csv"))
    np.savez(tmp_path / "cube.npz", x=np.zeros((10, 2, 2)), y=np.zeros(10))
    with pytest.raises(DataFileError, match=r"2-D table \(n, d\), got shape \(10, 2, 2\)"):
        TabularDataModule(path=str(tmp_path / "cube.npz"))
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    with pytest.raises(DataFileError, match="no label column 'y'"):
        TabularDataModule(path=str(tmp_path / "t.csv"))
    # the config route: an unknown data.name is Hydra's error, listing the staged sets
    with pytest.raises(Exception, match=r"(?s)Could not find 'data.name/nope'.*Available options.*cardio"):
        compose_cfg(["experiment=apre_mss_adbench", "data.name=nope"], tmp_path)


def test_csv_and_parquet_read_like_npz(tmp_path, table):
    import pandas as pd

    raw = np.load(table)
    frame = pd.DataFrame(raw["x"], columns=[f"f{i}" for i in range(6)]).assign(label=raw["y"])
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    ref = TabularDataModule(path=str(table)).parts["test"]["x"]
    for name in ("t.csv", "t.parquet"):
        dm = TabularDataModule(path=str(tmp_path / name), label_column="label")
        assert torch.allclose(dm.parts["test"]["x"], ref, atol=1e-5)


def test_glob_sweeps_every_staged_set():
    """`data.name=glob(*)` expands (as Hydra's BasicSweeper does) to one job per option of conf/data.name/."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path("pkg://aeforge.conf"))
    (override,) = OverridesParser.create(config_loader=loader).parse_overrides(["data.name=glob(*)"])
    names = list(override.sweep_string_iterator())
    assert len(names) == 44 and "cardio" in names and "magic.gamma" in names
    staged = DATA_DIR / "adbench_classical"
    if staged.is_dir():
        assert sorted(names) == sorted(p.stem for p in staged.glob("*.npz"))


def test_sweep_aggregates_to_one_table(tmp_path, capsys):
    aggregate = load_script("aggregate_runs")
    job = 0
    for ds, base in (("cardio", 0.6), ("wine", 0.8)):
        for model, shift in (("apre", 0.1), ("tabular_ae", 0.0)):
            for seed in (0, 1):
                run = tmp_path / str(job)
                (run / ".hydra").mkdir(parents=True)
                (run / ".hydra" / "overrides.yaml").write_text(
                    f"- experiment=apre_mss_adbench\n- data.name={ds}\n- model={model}\n- seed={seed}\n")
                auroc = base + shift + 0.02 * seed
                (run / "metrics.json").write_text(json.dumps({"anomaly/auroc": auroc, "train/loss": 1.0}))
                job += 1
    aggregate.main([str(tmp_path), "--markdown"])
    out = capsys.readouterr().out
    assert "| data.name | n | model=apre anomaly/auroc | model=tabular_ae anomaly/auroc |" in out
    assert "| cardio | 2 | 0.71 ± 0.01 | 0.61 ± 0.01 |" in out and "train/loss" not in out
    assert "| average rank (auroc) | | 1.00 | 2.00 |" in out


@pytest.mark.benchmark
@needs_data("adbench_classical", "cardio.npz")
def test_proof_apre_mss_cardio():
    """Real data: on cardio MSS lifts APRE's AUROC (the card's mechanism), 2 seeds, 1000 full-batch epochs."""
    proof = load_script("proof_apre_mss")
    aurocs = {d: [] for d in ("APRE", "APRE+MSS")}
    for seed in (0, 1):
        metrics, _ = proof.fit_and_score("apre", "cardio", seed, 1000)
        aurocs["APRE"].append(metrics["anomaly/auroc"])
        aurocs["APRE+MSS"].append(metrics["mss/k10_m1/auroc"])
    assert np.mean(aurocs["APRE+MSS"]) > np.mean(aurocs["APRE"]), aurocs
