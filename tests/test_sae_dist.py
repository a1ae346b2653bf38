"""SAE training beyond one process (aeforge/models/sae_dist.py, aeforge/strategies/): dead-latent counters
merged over DDP ranks, site-parallel SAEs (one SAE per rank) and their exact resume.
Multi-process tests use 2 CPU processes with the gloo backend."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aeforge.models.sae import SparseAutoencoder
from aeforge.models.sae_activations import ReLU
from aeforge.models.sae_dist import sync_dead_counters
from tests.conftest import run_train


def _dead_counter_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        kw = dict(pre_bias=False, unit_norm_decoder=False, aux_k=0, dead_tokens=20)
        synced, local = SparseAutoencoder(4, 4, ReLU(), **kw), SparseAutoencoder(4, 4, ReLU(), **kw)
        for sae in (synced, local):
            with torch.no_grad():
                sae.W_enc.copy_(torch.eye(4))
                sae.b_enc.zero_()
        # latent 0 fires on rank 0's tokens, latent 1 only on rank 1's; 2 and 3 never fire
        x = -torch.ones(8, 4)
        x[:, rank] = 1.0
        for _ in range(3):
            synced(x, defer_dead_update=True)
            sync_dead_counters([synced])
            local(x)
        assert local.dead.tolist() == ([False, True, True, True] if rank == 0 else [True, False, True, True])
        assert synced.dead.tolist() == [False, False, True, True]  # the global view on both ranks
        assert synced.tokens_since_fired.tolist() == [0, 0, 48, 48]  # counted in global tokens (2 × 3 × 8)
        both = [torch.empty_like(synced.tokens_since_fired) for _ in range(2)]
        dist.all_gather(both, synced.tokens_since_fired)
        assert torch.equal(both[0], both[1])
    finally:
        dist.destroy_process_group()


def test_dead_counters_merged_over_two_ranks(tmp_path):
    mp.spawn(_dead_counter_worker, args=(str(tmp_path / "store"),), nprocs=2)


def test_ddp_sae_run_has_one_global_dead_counter(tmp_path):
    """trainer=ddp (2 gloo processes, 4 tokens per rank per step) with a resampling after step 2: both ranks
    end with the same counters, counted in global tokens (multiples of 8), so the AuxK mask and
    train_dead_frac agree across ranks, and the resampled replicas still hold identical weights."""
    probe = tmp_path / "probe"
    run_train(["experiment=sae_topk", "debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.strategy=ddp", "module.eval_tokens=256", "module.ce_sequences=0", "evaluate=false",
               "module.resample_every=2", "module.resample_window=2", "module.resample_batches=1",
               "task_name=ddp_sae", "+callbacks.probe._target_=tests.sae_helpers.SiteProbe",
               f"+callbacks.probe.out_dir={probe}"], tmp_path, timeout=400)
    infos = [json.loads((probe / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    counters = [i["tokens_since_fired"]["0"] for i in infos]
    assert counters[0] == counters[1]
    assert max(counters[0]) >= 8 and all(c % 8 == 0 for c in counters[0])  # 2 ranks × 4 tokens per step
    assert infos[0]["resamples_done"] == infos[1]["resamples_done"] == 1
    assert infos[0]["param_sums"] == infos[1]["param_sums"]


def test_site_parallel_two_ranks_two_hookpoints(tmp_path):
    """trainer=ddp_sites, 2 gloo processes, 2 hookpoints of the random tiny GPT-2: each rank holds and trains
    one SAE, the other site does not exist there, both sites' metrics reach metrics.json, exports and the
    checkpoint hold both sites."""
    probe = tmp_path / "probe"
    run_train(["experiment=sae_topk", "debug=smoke", "trainer=ddp_sites", "trainer.accelerator=cpu",
               "trainer.devices=2",
               "module.distribute_sites=true", "data.hookpoints=[layers.0.residual,layers.1.residual]",
               "module.eval_tokens=256", "module.ce_sequences=2", "evaluate=false", "task_name=sites",
               "+callbacks.probe._target_=tests.sae_helpers.SiteProbe", f"+callbacks.probe.out_dir={probe}"],
              tmp_path, timeout=400)
    for rank in (0, 1):
        info = json.loads((probe / f"probe_rank{rank}.json").read_text())
        assert info["sites"] == [rank]
        assert info["params"] and all(p.startswith(f"saes.{rank}.") for p in info["params"])
        assert info["changed"] == {str(rank): True}
    (run_dir,) = (tmp_path / "sites" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for site in ("layers.0.residual", "layers.1.residual"):
        for key in ("fvu", "l0", "dead_frac", "train_dead_frac", "ce_recovered"):
            assert f"{site}/{key}" in metrics, (site, key)
        assert (run_dir / "sae" / site / "sae.safetensors").is_file()
    assert metrics["steps"] == 3
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert {"model.saes.0.W_enc", "model.saes.1.W_enc"} <= set(state)


def test_site_parallel_resume_is_exact(tmp_path):
    """trainer=ddp_sites on 2 gloo processes with a resampling at step 4: 6 steps straight == 3 steps,
    SIGTERM, resume=auto, 3 more. The resume needs each rank's own optimiser state (gathered into the
    checkpoint) and the open resampling window (firing counts, candidate tokens) of both sites."""
    common = ["experiment=sae_relu", "debug=smoke", "trainer=ddp_sites", "trainer.accelerator=cpu",
              "trainer.devices=2", "module.distribute_sites=true",
              "data.hookpoints=[layers.0.residual,layers.1.residual]",
              "trainer.max_steps=6", "trainer.limit_train_batches=8", "module.resample_every=4",
              "module.resample_window=4", "module.resample_batches=2", "module.final_metrics=false", "evaluate=false",
              "callbacks.model_checkpoint.monitor=null"]
    run_train([*common, "task_name=straight"], tmp_path, timeout=400)
    run_train([*common, "task_name=cut", "+callbacks.kill._target_=tests.helpers.SignalAtStep",
               "+callbacks.kill.at_step=3"], tmp_path, timeout=400)
    (cut,) = (tmp_path / "cut" / "runs").iterdir()
    first = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the checkpoint comes at the end of step 3 or 4 (callback order), before the resampling at step 4
    assert 3 <= first["global_step"] <= 4 and first["sae_resamples_done"] == 0
    assert len(first["sae_site_optimizer_states"]) == 2 and set(first["sae_resampling_window"]["fires"]) == {0, 1}
    run_train([*common, "task_name=cut", "resume=auto"], tmp_path, timeout=400)
    (straight_dir,) = (tmp_path / "straight" / "runs").iterdir()
    straight = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 6
    assert straight["sae_resamples_done"] == resumed["sae_resamples_done"] == 1
    assert {"model.saes.0.W_enc", "model.saes.1.W_enc"} <= set(straight["state_dict"])
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
