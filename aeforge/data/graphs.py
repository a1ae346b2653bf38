"""Attributed graphs for node clustering (SDCN / SCGC family).

The `.npz` layout of the staged benchmarks: `x` (N, d) float features, `y` (N,) int labels, `adj` (E, 2)
int edge list [src, dst], directed exactly as in the source file. Preprocessing follows SCGC's
`load_graph`: A = max(A, A^T) (so an edge listed both ways is not counted twice), Ã = A + I, row
normalisation Â = D̃^-1 Ã (not the symmetric form; Â is not symmetric).

Graphs without an edge list (USPS-style data) get SDCN's heat-kernel kNN graph built from the features.

The positive-weight matrix of the neighbour-contrastive loss, Γ = Â^r or Σ_{m<=r} Â^m (IAC), is a
property of the graph; it is computed here once, as a *sparse* matrix (the original densifies N×N and
multiplies dense matrices every run). Batches carry the block Γ[B, B] as a COO triple (local row,
local col, value):

- full-batch (`batch_size: null`): one batch per epoch holding every node (the SCGC recipe);
- mini-batch: shuffled node batches of `batch_size`; Γ[B, B] is sliced from the cached sparse Γ, or,
  when Γ would be too large to hold (`max_gamma_nnz`), propagated for the batch rows only
  (e_B Â ... Â, r sparse products), so memory is bounded by the batch's r-hop neighbourhood, not N².
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import scipy.sparse as sp
import torch

from aeforge.data.images import DataFileError, load_npz

log = logging.getLogger("aeforge")


# -- graph construction and normalisation -------------------------------------------------------------
def edges_to_adjacency(edges: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary symmetric adjacency from a directed edge list: max(A, A^T), no self loops added yet."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise DataFileError(f"edge list refers to node {int(edges.max())} but the graph has {n} nodes")
    a = sp.coo_matrix((np.ones(len(edges), np.float32), (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    a.data[:] = 1.0  # duplicate lines must not weigh more (coo sums duplicates)
    return a.maximum(a.T).tocsr()


def normalize_adjacency(a: sp.spmatrix, self_loops: bool = True, mode: str = "row") -> sp.csr_matrix:
    """Â = D̃^-1 (A + I) (SCGC, `mode=row`) or D̃^-1/2 (A + I) D̃^-1/2 (`mode=sym`, GCN)."""
    a = sp.csr_matrix(a, dtype=np.float64)
    if self_loops:
        a = a + sp.eye(a.shape[0], dtype=np.float64, format="csr")
    deg = np.asarray(a.sum(1)).ravel()
    with np.errstate(divide="ignore"):
        if mode == "row":
            inv = np.where(deg > 0, 1.0 / deg, 0.0)
            return sp.diags(inv) @ a
        if mode == "sym":
            inv = np.where(deg > 0, deg**-0.5, 0.0)
            return (sp.diags(inv) @ a @ sp.diags(inv)).tocsr()
    raise ValueError(f"adjacency normalisation {mode!r}; valid: ['row', 'sym']")


def propagate(start: sp.csr_matrix, a_hat: sp.csr_matrix, order: int, cumulative: bool):
    """start · Â^(m-1), or the IAC sum start · (I + Â + ... + Â^(m-1)), for m = 1..order, yielded as it grows
    (so a caller can stop once it is too large)."""
    power = total = start
    yield total
    for _ in range(order - 1):
        power = (power @ a_hat).tocsr()
        total = total + power if cumulative else power
        yield total


def adjacency_power(a_hat: sp.csr_matrix, order: int, cumulative: bool) -> sp.csr_matrix:
    """Γ = Â^r, or the IAC influence matrix Â + Â^2 + ... + Â^r, as a sparse matrix."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    *_, total = propagate(a_hat, a_hat, order, cumulative)
    return total.tocsr()


def power_rows(a_hat: sp.csr_matrix, rows: np.ndarray, order: int, cumulative: bool) -> sp.csr_matrix:
    """Rows `rows` of adjacency_power without forming it: (e_rows Â) Â ... Â, |rows| × N sparse."""
    *_, total = propagate(a_hat[rows], a_hat, order, cumulative)
    return total.tocsr()


def knn_graph(x: np.ndarray, k: int, method: str = "heat", chunk: int = 1024) -> np.ndarray:
    """SDCN's `calcu_graph`: for every node the top-(k+1) most similar nodes by argpartition (itself
    included), edges i -> j for j != i. Returns the directed (E, 2) edge list in SDCN's file order.

    heat: S = exp(-||x_i - x_j||^2 / 2) (continuous features); ncos: binarised, L1-normalised rows,
    S = X X^T (tf-idf text). Rows are processed in chunks so memory is chunk × N, not N × N."""
    x = np.asarray(x, dtype=np.float64)
    if method == "ncos":
        x = (x > 0).astype(np.float64)
        x = x / np.maximum(x.sum(1, keepdims=True), 1e-12)
    elif method != "heat":
        raise ValueError(f"knn method {method!r}; valid: ['heat', 'ncos']")
    sq = (x * x).sum(1)
    out = []
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]
        if method == "heat":
            # the same dot-product expansion and sqrt->square round trip as sklearn's pairwise_distances,
            # so that near-ties break as they did when SDCN wrote its graph files
            d2 = np.maximum(sq[s : s + chunk, None] - 2 * xb @ x.T + sq[None, :], 0)
            d = np.sqrt(d2)
            for i in range(len(xb)):  # sklearn zeroes the distance of a point to itself
                d[i, s + i] = 0.0
            sim = np.exp(-0.5 * d**2)
        else:
            sim = xb @ x.T
        top = np.argpartition(sim, -(k + 1), axis=1)[:, -(k + 1) :]
        for i, row in enumerate(top):
            out.extend((s + i, int(j)) for j in row if j != s + i)
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


# -- batches ----------------------------------------------------------------------------------------
def block(gamma_rows: sp.csr_matrix, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Γ[B, B] from the rows Γ[B, :] as ((2, nnz) local indices, (nnz,) float32 values)."""
    sub = gamma_rows[:, cols].tocoo()
    index = torch.from_numpy(np.stack([sub.row, sub.col]).astype(np.int64))
    return index, torch.from_numpy(sub.data.astype(np.float32))


class NodeBatches(torch.utils.data.Dataset):
    """Node indices; `__getitems__` assembles a whole batch (features, labels, Γ block) at once."""

    def __init__(self, dm: GraphDataModule):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.num_nodes

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.dm.make_batch(np.sort(np.asarray(idx, dtype=np.int64)))


class _FullGraph(torch.utils.data.IterableDataset):
    def __init__(self, dm: GraphDataModule):
        self.dm = dm

    def __iter__(self):
        yield self.dm.full_batch()

    def __len__(self) -> int:
        return 1


class GraphDataModule(pl.LightningDataModule):
    """One attributed graph; every node is in the (unsupervised) training set, labels only for metrics."""

    modality = "graph"

    def __init__(
        self,
        path: str,
        batch_size: int | None = None,
        num_workers: int = 0,
        adj_key: str = "adj",
        edge_list: str | None = None,
        knn_k: int | None = None,
        knn_method: str = "heat",
        feature_scale: float = 1.0,
        normalization: str = "row",
        order: int = 1,
        cumulative: bool = False,
        max_gamma_nnz: int = 50_000_000,
        full_batch_above: bool = True,
        seed: int = 0,
    ):
        """path: `.npz` with x, y and (unless knn_k is set) the edge list under `adj_key`.
        edge_list: optional text file of "src dst" lines replacing the npz edges.
        knn_k: build SDCN's kNN graph from the features instead of reading edges.
        feature_scale: multiply the features (USPS: 2, SDCN's [0, 2] range).
        batch_size: null = full batch (SCGC); an int = sampled node batches (smoke runs set 4).
        full_batch_above: with an int batch_size >= N, use the single full batch.
        order, cumulative: Γ = Â^order, or Σ_{m<=order} Â^m (IAC); the data configs interpolate the
        objective's (`${objective.order}`: one source of truth for sweeps over objective.order)."""
        super().__init__()
        self.path, self.batch_size, self.num_workers, self.seed = path, batch_size, num_workers, seed
        self.order, self.cumulative, self.max_gamma_nnz = order, cumulative, max_gamma_nnz
        self.full_batch_above = full_batch_above
        arrays = load_npz(path, ("x", "y") if knn_k or edge_list else ("x", "y", adj_key))
        x = np.asarray(arrays["x"], dtype=np.float32)
        if x.ndim != 2:
            x = x.reshape(len(x), -1)
        self.features = torch.from_numpy(x * np.float32(feature_scale))
        self.labels = torch.from_numpy(np.asarray(arrays["y"]).astype(np.int64))
        self.labels = self.labels - self.labels.min()  # 1-based label files (Citeseer, HHAR in SDCN)
        n = len(x)
        if len(self.labels) != n:
            raise DataFileError(f"{path}: x has {n} rows but y has {len(self.labels)}")
        if edge_list:
            if not Path(edge_list).is_file():
                raise DataFileError(f"edge list file not found: {edge_list}")
            edges = np.loadtxt(edge_list, dtype=np.int64, ndmin=2)
        elif knn_k:
            edges = knn_graph(x, knn_k, knn_method)  # unscaled x: the kNN order is scale-invariant
        else:
            edges = arrays[adj_key]
        self.edges = np.asarray(edges, dtype=np.int64)
        self.adj_norm = normalize_adjacency(edges_to_adjacency(self.edges, n), mode=normalization)
        self.input_shape = (x.shape[1],)
        self.num_classes = int(self.labels.max()) + 1
        self.num_nodes = n
        self._gamma: sp.csr_matrix | None = None
        self._gamma_key = None
        self._full = None

    # -- Γ ------------------------------------------------------------------------------------------
    def gamma(self) -> sp.csr_matrix | None:
        """The cached sparse Γ, or None when it would exceed max_gamma_nnz (then rows are propagated
        per batch). The size check multiplies out nnz growth one power at a time and stops early."""
        key = (self.order, self.cumulative)
        if self._gamma_key != key:
            self._gamma, self._gamma_key = None, key
            for m, total in enumerate(propagate(self.adj_norm, self.adj_norm, self.order, self.cumulative)):
                if m and total.nnz > self.max_gamma_nnz:  # Â itself is held anyway
                    log.info("Γ has > %d non-zeros: computing its rows per batch", self.max_gamma_nnz)
                    return None
            self._gamma = total.astype(np.float32).tocsr()
        return self._gamma

    def gamma_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        g = self.gamma()
        return g[idx] if g is not None else power_rows(self.adj_norm, idx, self.order, self.cumulative)

    # -- batches ------------------------------------------------------------------------------------
    @property
    def full_batch_mode(self) -> bool:
        return self.batch_size is None or (self.full_batch_above and self.batch_size >= self.num_nodes)

    def make_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        gi, gv = block(self.gamma_rows(idx), idx)
        t = torch.from_numpy(idx)
        return {"x": self.features[t], "y": self.labels[t], "idx": t, "gamma_index": gi, "gamma_value": gv}

    def full_batch(self) -> dict[str, torch.Tensor]:
        """Every node; built once and reused, so an epoch costs no data work at all."""
        key = (self.order, self.cumulative)
        if self._full is None or self._full[0] != key:
            g = self.gamma()
            if g is None:
                raise MemoryError(
                    f"Γ = Â^{self.order} has more than max_gamma_nnz={self.max_gamma_nnz} non-zeros: "
                    f"full-batch training would hold it whole; set data.batch_size for mini-batches"
                )
            coo = g.tocoo()
            batch = {
                "x": self.features,
                "y": self.labels,
                "idx": torch.arange(self.num_nodes),
                "gamma_index": torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64)),
                "gamma_value": torch.from_numpy(coo.data.astype(np.float32)),
            }
            self._full = (key, batch)
        return self._full[1]

    def train_dataloader(self):
        if self.full_batch_mode:
            return torch.utils.data.DataLoader(_FullGraph(self), batch_size=None, num_workers=0)
        from aeforge.data.loading import ResumableLoader

        return ResumableLoader(
            NodeBatches(self), batch_size=self.batch_size, shuffle=True, seed=self.seed,
            num_workers=self.num_workers,
        )

    def eval_dataloader(self, split: str, batch_size: int):
        """All nodes in order (x, y, idx), for evaluators; there is no held-out split in clustering."""
        ds = torch.utils.data.TensorDataset(self.features, self.labels, torch.arange(self.num_nodes))
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, collate_fn=lambda items: _stack(items)
        )

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        return x  # features are used as stored (SCGC does no scaling beyond feature_scale)

    def describe(self) -> str:
        mode = "full batch" if self.full_batch_mode else f"batches of {self.batch_size}"
        return (
            f"GraphDataModule({Path(self.path).name}: {self.num_nodes} nodes, {self.adj_norm.nnz} Â entries, "
            f"d={self.input_shape[0]}, {self.num_classes} classes, {mode})"
        )


def _stack(items) -> dict[str, torch.Tensor]:
    x, y, i = zip(*items)
    return {"x": torch.stack(x), "y": torch.stack(y), "idx": torch.stack(i)}


def synthetic_sbm(
    n: int, k: int, d: int, p_in: float, p_out: float, feature_noise: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Stochastic block model with Gaussian-mixture features whose clusters overlap (tests, benchmarks).
    Edges are drawn per block pair without forming N×N, so n can be in the hundreds of thousands."""
    rng = np.random.default_rng(seed)
    y = rng.integers(k, size=n)
    centres = rng.normal(size=(k, d))
    x = (centres[y] + feature_noise * rng.normal(size=(n, d))).astype(np.float32)
    members = [np.flatnonzero(y == c) for c in range(k)]
    edges = []
    for a in range(k):
        for b in range(a, k):
            p = p_in if a == b else p_out
            m = rng.binomial(len(members[a]) * len(members[b]), p)
            src = rng.choice(members[a], m)
            dst = rng.choice(members[b], m)
            edges.append(np.stack([src, dst], 1))
    e = np.concatenate(edges)
    e = e[e[:, 0] != e[:, 1]]
    return {"x": x, "y": y.astype(np.int64), "adj": e.astype(np.int32)}


def save_graph_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
