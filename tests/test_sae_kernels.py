"""SAE autograd kernels (aeforge/nn/sparse_ops.py): top-AFA's selection rule, the sparse TopK encoder's
gradients against the dense path, its bf16 encoder GEMM."""

from __future__ import annotations

import torch

from aeforge.models.sae import SparseAutoencoder
from aeforge.models.sae_activations import TopK
from aeforge.nn.sparse_ops import top_afa_select
from aeforge.objectives.sparsity import SAEObjective


def test_top_afa_worked_example():
    """Card 2.6: acts [[5,4,3],[1,1,1],[1,10,2]], W_dec rows (1,2),(3,4),(5,6), target z = acts·W_dec."""
    acts = torch.tensor([[5.0, 4, 3], [1, 1, 1], [1, 10, 2]])
    w_dec = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    target = (acts @ w_dec).norm(dim=-1)
    kstar, vals, idx = top_afa_select(acts, w_dec.norm(dim=1), target)
    assert kstar.tolist() == [2, 2, 2]
    kept = [set(idx[i][vals[i] > 0].tolist()) for i in range(3)]
    assert kept == [{1, 2}, {1, 2}, {1, 2}]


def test_sparse_kernel_matches_dense_gradients():
    torch.manual_seed(0)
    a = SparseAutoencoder(16, 64, TopK(k=4, sparse_kernel=True), aux_k=8, dead_tokens=0)
    b = SparseAutoencoder(16, 64, TopK(k=4, sparse_kernel=False), aux_k=8, dead_tokens=0)
    b.load_state_dict(a.state_dict())
    obj = SAEObjective(recon="mse", aux_coef=1 / 32, aux_mode="gao")
    x = torch.randn(64, 16)
    with torch.no_grad():
        a.tokens_since_fired[:32] = 10  # half of the latents dead
        b.tokens_since_fired[:32] = 10
    for m in (a, b):
        obj({"sites": [m(x)]}, {})["loss"].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_bf16_encoder_gemm_keeps_the_sparse_path():
    """matmul_dtype=bfloat16 used to fall back to the dense path: the sparse kernel now runs its encoder GEMM
    in bf16 and selects exactly the latents the dense bf16 path selects, with fp32 values and gradients
    that agree with it and with fp32 to bf16 precision."""
    torch.manual_seed(0)
    kw = dict(aux_k=8, dead_tokens=0)
    fast = SparseAutoencoder(16, 64, TopK(k=4, sparse_kernel=True), matmul_dtype="bfloat16", **kw)
    dense = SparseAutoencoder(16, 64, TopK(k=4, sparse_kernel=False), matmul_dtype="bfloat16", **kw)
    fp32 = SparseAutoencoder(16, 64, TopK(k=4, sparse_kernel=True), **kw)
    dense.load_state_dict(fast.state_dict())
    fp32.load_state_dict(fast.state_dict())
    obj = SAEObjective(recon="mse", aux_coef=1 / 32, aux_mode="gao")
    x = torch.randn(64, 16)
    outs = []
    for m in (fast, dense, fp32):
        with torch.no_grad():
            m.tokens_since_fired[:32] = 10
        out = m(x)
        obj({"sites": [out]}, {})["loss"].backward()
        outs.append(out)
    assert outs[0].vals.dtype == torch.float32
    assert torch.equal(outs[0].idx.sort(1).values, outs[1].idx.sort(1).values)
    assert torch.allclose(outs[0].recon, outs[1].recon, atol=1e-5)
    assert torch.allclose(outs[0].recon, outs[2].recon, atol=0.05)
    for (n, p), q, r in zip(fast.named_parameters(), dense.parameters(), fp32.parameters()):
        scale = r.grad.abs().max().clamp_min(1e-6)
        assert (p.grad - q.grad).abs().max() / scale < 0.02, n
        assert (p.grad - r.grad).abs().max() / scale < 0.15, n  # bf16 values: measured up to 0.075
