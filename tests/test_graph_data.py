"""Graph data for SCGC: preprocessing as SCGC's load_graph, SDCN's kNN graph, mini-batch Γ blocks, and Γ's
structure taken from the objective's config (one source for sweeps over objective.order)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hydra.utils import instantiate

from aeforge.data.graphs import (
    GraphDataModule,
    adjacency_power,
    edges_to_adjacency,
    knn_graph,
    normalize_adjacency,
    power_rows,
    save_graph_npz,
    synthetic_sbm,
)
from aeforge.data.images import DataFileError
from tests.conftest import DATA_DIR, compose_cfg, needs_data


def test_graph_normalisation_as_scgc():
    # 0->1 listed both ways and twice, 1->2 one way only: max-symmetrised, no double counting
    edges = np.array([[0, 1], [1, 0], [0, 1], [1, 2]])
    a = edges_to_adjacency(edges, 4).toarray()
    np.testing.assert_array_equal(a, [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    a_hat = normalize_adjacency(sp.csr_matrix(a)).toarray()
    ref = (a + np.eye(4)) / (a + np.eye(4)).sum(1, keepdims=True)  # D^-1 (A + I), isolated node -> 1
    np.testing.assert_allclose(a_hat, ref)
    np.testing.assert_allclose(a_hat.sum(1), 1.0)
    a_hat_s = sp.csr_matrix(a_hat)
    np.testing.assert_allclose(adjacency_power(a_hat_s, 3, False).toarray(), np.linalg.matrix_power(a_hat, 3))
    iac = a_hat + a_hat @ a_hat + a_hat @ a_hat @ a_hat
    np.testing.assert_allclose(adjacency_power(a_hat_s, 3, True).toarray(), iac)
    np.testing.assert_allclose(adjacency_power(a_hat_s, 3, True).sum(1).A1, 3.0)  # IAC rows sum to r
    np.testing.assert_allclose(power_rows(a_hat_s, np.array([2, 0]), 3, True).toarray(), iac[[2, 0]])
    with pytest.raises(DataFileError, match="node 9"):
        edges_to_adjacency(np.array([[0, 9]]), 4)


def _densify(batch, n):
    out = torch.zeros(n, n)
    out[batch["gamma_index"][0], batch["gamma_index"][1]] = batch["gamma_value"]
    return out.numpy()


def test_minibatch_blocks_match_full_gamma(tmp_path):
    path = tmp_path / "sbm.npz"
    save_graph_npz(path, synthetic_sbm(300, 3, 8, 0.05, 0.005, 1.0, seed=1))
    dm = GraphDataModule(str(path), batch_size=64, order=2, cumulative=True)
    full = adjacency_power(dm.adj_norm, 2, True).toarray()
    idx = np.sort(np.random.default_rng(0).choice(300, 64, replace=False))
    b = dm.make_batch(idx)
    np.testing.assert_allclose(_densify(b, 64), full[np.ix_(idx, idx)], rtol=1e-5)
    dm_uncached = GraphDataModule(str(path), batch_size=64, order=2, cumulative=True, max_gamma_nnz=0)
    assert dm_uncached.gamma() is None  # too large to cache -> rows are propagated per batch
    b2 = dm_uncached.make_batch(idx)
    np.testing.assert_allclose(_densify(b2, 64), _densify(b, 64), rtol=1e-5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 300 // 64 and all(len(x["x"]) == 64 for x in batches)
    full_dm = GraphDataModule(str(path), batch_size=None)
    (fb,) = list(full_dm.train_dataloader())
    assert len(fb["x"]) == 300 and fb["gamma_value"].sum().item() == pytest.approx(300, rel=1e-5)


def test_gamma_follows_the_objective_config(tmp_path):
    """Γ's structure is an objective knob: the data config reads objective.order/cumulative, so a sweep over
    objective.order changes the Γ the batches carry (nothing sets them on the DataModule at fit time)."""
    path = tmp_path / "sbm.npz"
    save_graph_npz(path, synthetic_sbm(200, 3, 8, 0.05, 0.005, 1.0, seed=1))

    def data(*overrides: str) -> GraphDataModule:
        cfg = compose_cfg(["data=graph_npz", f"data.path={path}", *overrides], tmp_path)
        return instantiate(cfg.data, seed=0)

    nnz = {}
    for order in (1, 3):
        dm = data("experiment=scgc_acm", f"objective.order={order}")
        assert (dm.order, dm.cumulative) == (order, False)
        nnz[order] = len(dm.full_batch()["gamma_value"])
    assert nnz[3] > nnz[1]  # Â³ reaches further than Â
    star = data("experiment=scgc_star_usps", "objective.order=2")  # IAC: Â + Â², rows sum to 2
    assert (star.order, star.cumulative) == (2, True)
    assert star.full_batch()["gamma_value"].sum().item() == pytest.approx(400, rel=1e-5)
    assert (data().order, data().cumulative) == (1, False)  # an objective without Γ: a harmless default


def test_missing_graph_file_names_it(tmp_path):
    missing = tmp_path / "nope" / "nope.npz"
    with pytest.raises(DataFileError, match=str(missing)):
        GraphDataModule(str(missing))


@needs_data("usps", "usps.npz")
def test_knn_graph_reproduces_staged_usps_k3():
    d = np.load(DATA_DIR / "usps" / "usps.npz")
    edges = knn_graph(d["x"], k=3)
    ref = d["adj_k3"].astype(np.int64)
    # the same directed edges; only the order inside a node's 3 neighbours depends on argpartition
    assert edges.shape == ref.shape
    np.testing.assert_array_equal(np.unique(edges, axis=0), np.unique(ref, axis=0))
    np.testing.assert_array_equal(edges[:, 0], ref[:, 0])
