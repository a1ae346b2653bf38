"""The SAE training module (aeforge/modules/sae.py): run progress reaches the objective only through the
batch, dead-latent resampling (aeforge/models/sae_resample.py) and its checkpointed window, resume checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import aeforge.models.sae_resample as sae_resample
from aeforge.models.base import RunProgress
from aeforge.models.sae import SAEBank, SparseAutoencoder
from aeforge.models.sae_activations import VSAE, ReLU
from aeforge.models.sae_resample import resample_latents
from aeforge.modules.sae import SAEModule
from aeforge.objectives.sparsity import SAEObjective
from aeforge.train import run
from tests.conftest import compose_cfg, run_train


def test_kl_warmup_follows_batch_progress():
    """vSAE's KL weight ramps over the first `kl_warmup` of the run as read from batch["progress"]; without
    progress (evaluators) training counts as done."""
    torch.manual_seed(0)
    bank = SAEBank((1, 8), VSAE(k=2), n_latents=16, pre_bias=False, unit_norm_decoder=False, aux_k=0)
    obj = SAEObjective(recon="sum", aux_coef=0.0, kl_coef=2.0, kl_warmup=0.1)
    batch = {"x": torch.randn(16, 1, 8)}
    out = bank(batch)
    for progress, ramp in ((RunProgress.of(0, 40, 0), 0.0), (RunProgress.of(2, 40, 0), 0.5),
                           (RunProgress.of(30, 40, 0), 1.0), (None, 1.0)):
        with_progress = batch if progress is None else {**batch, "progress": progress}
        losses = obj(out, with_progress)
        assert torch.allclose(losses["loss"], losses["recon"] + 2.0 * ramp * losses["kl"]), (progress, ramp)


def test_training_sets_no_attribute_of_model_or_objective(tmp_path):
    """A vSAE smoke run (KL warm-up on): the module hands run progress over as batch["progress"] and sets no
    attribute of the model or the objective (it used to write model.progress every step and the sites'
    names in setup); only parameters and buffers change."""
    probe = tmp_path / "probe"
    run(compose_cfg(["experiment=sae_vsae", "debug=smoke", "eval=none", "module.final_metrics=false",
                     "+callbacks.attrs._target_=tests.sae_helpers.AttributeProbe",
                     f"+callbacks.attrs.out_dir={probe}"], tmp_path))
    seen = json.loads((probe / "attributes.json").read_text())
    assert seen["before"] and seen["after"] == seen["before"]


def test_vsae_resume_is_exact(tmp_path):
    """One process, vSAE with its variance head (sampling: RNG) and the KL warm-up over the whole run (run
    progress): 6 steps straight == 3 steps, SIGTERM, resume=auto, 3 more, bit for bit."""
    common = ["experiment=sae_vsae", "debug=smoke", "trainer.max_steps=6", "trainer.limit_train_batches=8",
              "model.activation.var_flag=true", "objective.kl_warmup=1.0", "module.final_metrics=false",
              "module.export=null", "evaluate=false", "callbacks.model_checkpoint.monitor=null"]
    run_train([*common, "task_name=straight"], tmp_path)
    run_train([*common, "task_name=cut", "+callbacks.kill._target_=tests.helpers.SignalAtStep",
               "+callbacks.kill.at_step=3"], tmp_path)
    (cut,) = (tmp_path / "cut" / "runs").iterdir()
    assert 3 <= torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] < 6
    run_train([*common, "task_name=cut", "resume=auto"], tmp_path)
    (straight_dir,) = (tmp_path / "straight" / "runs").iterdir()
    straight = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 6
    assert "model.saes.0.W_sigma" in straight["state_dict"]
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_resampled_latents_fire_on_their_inputs_and_adam_rows_are_reset():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, ReLU(), aux_k=0, tied_init=False)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    for _ in range(2):
        out = sae(x)
        opt.zero_grad()
        ((out.recon - out.x).pow(2).sum(-1).mean() + out.l1.mean()).backward()
        opt.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 20]] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e3  # silent on every input
    sae.eval()
    assert (sae.codes(x)[:, dead] == 0).all()
    alive_enc_norm = sae.W_enc[~dead].norm(dim=1).mean()
    inputs = torch.randn(3, 8) * 3
    resample_latents(sae, dead, inputs, opt, enc_scale=0.2)
    codes = sae.codes(inputs)
    assert (codes[torch.arange(3), dead.nonzero().squeeze(1)] > 0).all()
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    assert torch.allclose(sae.W_enc[dead].norm(dim=1), torch.full((3,), 0.2 * alive_enc_norm.item()))
    assert (sae.b_enc[dead] == 0).all()
    for p in (sae.W_enc, sae.W_dec, sae.b_enc):
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (st[key][dead] == 0).all(), key
            assert st[key][~dead].abs().sum() > 0, key  # the other rows keep their moments


def test_relu_recipe_resamples_during_training(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="aeforge")
    cfg = compose_cfg(["experiment=sae_relu", "debug=smoke", "eval=none", "module.ce_sequences=0",
                       "module.resample_every=2", "module.resample_window=2", "module.resample_batches=1"], tmp_path)
    run(cfg)
    assert any("resampled" in r.getMessage() for r in caplog.records)
    assert Path(tmp_path / "metrics.json").is_file()


def _module(**kwargs) -> SAEModule:
    bank = SAEBank((2, 4), ReLU(), n_latents=8, aux_k=0)
    return SAEModule(model=bank, objective=None, optim=None, **kwargs)


def test_resampling_window_checkpoint_merges_ddp_replicas(monkeypatch):
    """DDP replicas count fires on different tokens: the checkpoint (written by rank 0) holds the sums and
    rank 0's candidate pool; on resume rank 0 takes them and the other ranks start from zero, so the
    all-reduce at the next resampling gives the uninterrupted totals. Two ranks simulated in one process."""
    ranks = [_module(resample_every=10).resampler for _ in range(2)]
    for r, w in enumerate(ranks):
        w.fires = {0: torch.full((8,), r + 1), 1: torch.arange(8) * (r + 1)}
        w.tokens = 32
        w.pool = {0: (torch.full((3, 4), float(r)), torch.zeros(3))}
    parts = [{"fires": w.fires, "tokens": w.tokens, "pool": w.pool} for w in ranks]
    monkeypatch.setattr(sae_resample, "gather_to_zero", lambda obj: parts)
    window = ranks[0].window_state(replicas=True)
    assert torch.equal(window["fires"][0], torch.full((8,), 3)) and torch.equal(window["fires"][1], torch.arange(8) * 3)
    assert window["tokens"] == 64 and (window["pool"][0][0] == 0).all()  # rank 0's candidates
    fresh = [_module(resample_every=10).resampler for _ in range(2)]
    fresh[0].load_window(window, {0, 1}, replicas=True, rank=0)
    fresh[1].load_window(window, {0, 1}, replicas=True, rank=1)
    assert torch.equal(fresh[0].fires[0], window["fires"][0]) and fresh[0].tokens == 64
    assert fresh[1].fires == {} and fresh[1].tokens == 0 and fresh[1].pool == {}


def test_resume_refuses_a_site_layout_change():
    m = _module()
    with pytest.raises(ValueError, match="site-parallel run on 2 ranks.*trainer=ddp_sites.*fit=false"):
        m.on_load_checkpoint({"sae_site_world": 2, "state_dict": {}, "optimizer_states": []})


def test_resample_every_must_be_positive():
    with pytest.raises(ValueError, match="module.resample_every=0"):
        _module(resample_every=0)
