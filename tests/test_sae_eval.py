"""SAE evaluation (aeforge/eval/sae.py): CE with the SAE spliced into the LM, and top-AFA's ZF plot."""

from __future__ import annotations

import json

import pytest
import torch

from aeforge.data.lm import load_lm, resolve_hookpoints
from aeforge.eval.sae import ce_metrics
from aeforge.train import run
from tests.conftest import compose_cfg


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


def test_top_afa_run_writes_zf_plot(tmp_path):
    run(compose_cfg(["experiment=sae_top_afa", "debug=smoke", "eval=none", "module.ce_sequences=0"], tmp_path))
    png = tmp_path / "zf_plot.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eps_lbo"] >= 0 and metrics["kstar"] >= 1
