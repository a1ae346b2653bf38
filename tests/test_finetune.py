"""eval=finetune (MAE end-to-end fine-tuning: layer-wise lr decay, drop path, mixup/cutmix, learning on real
digits without touching the trained model) and aeforge-eval (aeforge/evaluate.py: any eval on any checkpoint, its
errors)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from aeforge import evaluate
from aeforge.config import ConfigError
from aeforge.data.images import TensorImageDataset
from aeforge.eval import Evaluation
from aeforge.eval.finetune import (
    FeatureClassifier,
    FineTune,
    MixupCutmix,
    RandAugmented,
    ViTClassifier,
    build_classifier,
    param_groups,
    random_erasing,
)
from aeforge.models.ae import MLPAutoencoder
from aeforge.models.mae import MAE
from aeforge.train import build, run, validate
from tests.conftest import ROOT, compose_cfg, run_command, run_train

TINY_MAE = ["model=mae", "model.patch_size=7", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]


def _tiny_mae(depth: int = 3) -> MAE:
    torch.manual_seed(0)
    return MAE((1, 28, 28), patch_size=7, embed_dim=32, depth=depth, num_heads=2, decoder_embed_dim=16,
               decoder_depth=1, decoder_num_heads=2)


def _example(n: int = 4) -> dict:
    return {"x": torch.randn(n, 1, 28, 28), "y": torch.arange(n) % 10}


# -- layer-wise lr decay ---------------------------------------------------------------------------------
@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_groups_follow_the_formula(global_pool):
    """Block i (1-based) of L gets lr * d^(L+1-i); patch embedding / cls d^(L+1); norms and head lr."""
    L, lr, d, wd = 3, 1e-3, 0.5, 0.05
    net = build_classifier(_tiny_mae(L), 10, _example(), global_pool=global_pool)
    groups = param_groups(net, lr, wd, d)
    seen = set()
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            seen.add(name)
            if name.startswith(("encoder.patch_embed.", "encoder.cls_token")):
                expected = lr * d ** (L + 1)
            elif name.startswith("encoder.blocks."):
                i = int(name.split(".")[2]) + 1
                expected = lr * d ** (L + 1 - i)
            else:
                assert name.startswith(("head.", "fc_norm.", "encoder.norm.")), name
                expected = lr
            assert g["lr"] == pytest.approx(expected), name
            no_decay = p.ndim <= 1 or name.endswith(".bias") or name.endswith("cls_token")
            assert g["weight_decay"] == (0.0 if no_decay else wd), name
    assert seen == {n for n, _ in net.named_parameters()}  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(seen)
    # global pooling drops the final encoder norm (fc_norm replaces it); cls pooling keeps it at the top layer
    assert any(n.startswith("fc_norm.") for n in seen) == global_pool
    assert any(n.startswith("encoder.norm.") for n in seen) == (not global_pool)


def test_eval_max_epochs_caps_finetune_and_its_schedule(monkeypatch):
    """eval.max_epochs (debug=smoke: 2) shortens fine-tuning; the schedule spans the capped run."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"] / self.param_groups[0]["lr_scale"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    dm = build(compose_cfg(TINY_MAE).data, seed=0)
    ev = FineTune(epochs=100, blr=None, lr=1e-3, batch_size=50, warmup_epochs=0, min_lr=0.0, mixup=0, cutmix=0)
    Evaluation({"finetune": ev}, max_samples=100, max_epochs=2)(
        build(compose_cfg(TINY_MAE).model, input_shape=(1, 28, 28)), dm, torch.device("cpu"))
    assert len(seen) == 4  # 2 epochs x 2 batches, not 100 epochs
    assert seen[-1] < 0.2e-3  # the cosine reaches its end within the capped run
    assert compose_cfg([*TINY_MAE, "debug=smoke", "eval=finetune"]).eval.max_epochs == 2
    with pytest.raises(ConfigError, match="max_epochs"):
        Evaluation({}, max_epochs=0)


def test_lr_schedule_applies_layer_scales_each_step(monkeypatch):
    """During training each group's lr is lr_scale * lr * warmup-cosine multiplier."""
    from aeforge.eval import finetune as ft

    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([(g["lr_scale"], g["lr"]) for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    dm = build(compose_cfg(TINY_MAE).data, seed=0)
    ev = FineTune(epochs=2, blr=None, lr=1e-3, batch_size=50, warmup_epochs=1, min_lr=0.0, mixup=0, cutmix=0)
    Evaluation({"finetune": ev}, max_samples=100)(build(compose_cfg(TINY_MAE).model, input_shape=(1, 28, 28)),
                                                  dm, torch.device("cpu"))
    assert len(seen) == 4  # 100 images / 50 per batch x 2 epochs
    for s, groups in enumerate(seen):
        mult = ft.warmup_cosine(s, 2, 4, 1e-3, 0.0, cosine=True)
        for scale, lr in groups:
            assert lr == pytest.approx(scale * 1e-3 * mult)
    assert {round(scale, 6) for scale, _ in seen[0]} == {round(0.65**k, 6) for k in range(4)}  # depth 2: 4 layers


def test_non_vit_encoder_is_one_group_and_runs():
    """Without blocks layer decay has one layer: every parameter at lr, whatever layer_decay says."""
    torch.manual_seed(0)
    model = MLPAutoencoder((1, 28, 28), [64], 16)
    net = build_classifier(model, 10, _example())
    assert isinstance(net, FeatureClassifier)
    groups = param_groups(net, 1e-3, 0.05, 0.65)
    assert {g["lr_scale"] for g in groups} == {1.0} and {g["lr"] for g in groups} == {1e-3}
    assert {g["layer_id"] for g in groups} == {1}
    dm = build(compose_cfg(["model=ae"]).data, seed=0)
    dm.setup("fit")
    ev = FineTune(epochs=1, blr=None, lr=1e-3, batch_size=64, warmup_epochs=0)
    metrics = Evaluation({"finetune": ev}, max_samples=512)(model, dm, torch.device("cpu"))
    assert 0 <= metrics["finetune/top1"] <= 1 and "finetune/top5" in metrics


# -- drop path, mixup / cutmix ---------------------------------------------------------------------------
def test_drop_path_goes_into_the_copy_only():
    model = _tiny_mae(3)
    net = build_classifier(model, 10, _example(), drop_path=0.2)
    assert isinstance(net, ViTClassifier)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in net.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert all(isinstance(b.drop_path2, type(b.drop_path1)) for b in net.encoder.blocks)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.encoder.blocks)  # the trained model keeps none
    assert isinstance(model.encoder.norm, nn.LayerNorm)  # and its final norm


def test_mixup_mixes_inputs_and_targets_with_one_lambda():
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    mix = MixupCutmix(5, mixup=0.8, cutmix=0.0, label_smoothing=0.1, seed=0)
    xm, t = mix(x, y)
    lam = mix.last_lam
    assert 0 < lam < 1
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0))
    smooth = torch.full((6, 5), 0.02).scatter_(1, y[:, None], 0.92)  # (1 - 0.1) onehot + 0.1 / 5
    assert torch.allclose(t, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(t.sum(1), torch.ones(6))


def test_cutmix_pastes_a_box_and_lambda_is_its_area():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()  # image k is all k
    y = torch.arange(4)
    mix = MixupCutmix(4, mixup=0.0, cutmix=1.0, seed=3)
    for _ in range(5):
        xm, t = mix(x, y)
        from_other = (xm != x).float().mean(dim=(1, 2, 3))
        assert torch.allclose(from_other, torch.full((4,), 1 - mix.last_lam))  # box share = 1 - lambda
        assert torch.allclose(t[0], torch.tensor([mix.last_lam, 0, 0, 1 - mix.last_lam]))
    # off: targets are the smoothed one-hot, images untouched
    xm, t = MixupCutmix(4, label_smoothing=0.0)(x, y)
    assert xm is x and torch.equal(t, torch.eye(4))


def test_random_erasing_fills_one_box_per_erased_image():
    torch.manual_seed(0)
    x = torch.full((400, 3, 24, 24), 7.0)
    assert random_erasing(x, 0.0) is x
    out = random_erasing(x, 0.25)
    changed = out != x  # noise never equals 7.0 exactly
    erased = changed.flatten(1).any(1)
    assert 0.18 < erased.float().mean() < 0.32  # ~ prob
    assert torch.equal(changed[:, 0], changed[:, 1]) and torch.equal(changed[:, 0], changed[:, 2])  # all channels
    for m in changed[erased, 0]:
        rows, cols = m.any(1).nonzero().view(-1), m.any(0).nonzero().view(-1)
        h, w = len(rows), len(cols)
        assert m.sum() == h * w and rows[-1] - rows[0] == h - 1 and cols[-1] - cols[0] == w - 1  # one rectangle
        assert 0.02 * 576 - 24 <= h * w <= 576 / 3 + 24 and h < 24 and w < 24  # area U(0.02, 1/3), rounded sides
    noise = out[changed]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # pixel mode: N(0, 1) on normalised data


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_keeps_batches_and_changes_images(channels):
    import random

    import numpy as np

    torch.manual_seed(0)
    random.seed(0)  # timm draws ops with numpy, magnitudes and p with random
    np.random.seed(0)
    x = (torch.rand(64, channels, 20, 20) * 255).to(torch.uint8)
    ds = RandAugmented(TensorImageDataset(x, torch.arange(64)), "rand-m9-mstd0.5-inc1",
                       torch.full((channels,), 0.5), 20)
    batch = ds.__getitems__(list(range(64)))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == x.shape and torch.equal(batch["y"], torch.arange(64))
    # 2 ops at p 0.5 each: 3/4 of the images get at least one (a few ops are no-ops on these images)
    assert (batch["x"] != x).flatten(1).any(1).float().mean() > 0.5
    assert ds[3]["x"].shape == (channels, 20, 20)


def test_rand_augment_posterize_to_zero_bits_is_black():
    """Magnitude noise reaches level 10, where PosterizeIncreasing keeps 0 bits: Pillow here refuses that."""
    ds = RandAugmented(TensorImageDataset(torch.full((1, 3, 8, 8), 200, dtype=torch.uint8), None),
                       "rand-m9-mstd0.5-inc1", torch.zeros(3), 8)
    (op,) = [op for op in ds.transform.ops if op.name == "PosterizeIncreasing"]
    from PIL import Image

    img = Image.new("RGB", (8, 8), (200, 100, 37))
    assert op.aug_fn(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert op.aug_fn(img, 4).getpixel((0, 0)) == (192, 96, 32)
    assert op.aug_fn(img, 8) is img


def test_rand_augment_rejects_what_it_cannot_augment():
    floats = TensorImageDataset(torch.rand(4, 1, 8, 8), torch.arange(4))
    with pytest.raises(ValueError, match=r"uint8 .* torch.float32 .*rand_augment=null"):
        RandAugmented(floats, "rand-m9-mstd0.5-inc1", torch.zeros(1), 8)

    class Encoded(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return {"jpeg": torch.zeros(10, dtype=torch.uint8), "y": torch.tensor(0)}

    with pytest.raises(ValueError, match="decode_on_device"):
        RandAugmented(Encoded(), "rand-m9-mstd0.5-inc1", torch.zeros(3), 8)


# -- the protocol end to end on real digits --------------------------------------------------------------
def test_finetune_learns_digits_and_leaves_the_model_unchanged():
    """The full recipe (layer decay, drop path, RandAugment, random erasing, mixup/cutmix, label smoothing),
    shortened: 8 epochs on 2000
    digits lift a random-init tiny ViT from chance (0.1) to > 0.35 top-1 on 2000 held-out digits (measured 0.44-0.53
    over 3 evaluator seeds; 0.65 without RandAugment and erasing, which are strong for 8 epochs)."""
    cfg = compose_cfg([*TINY_MAE, "eval=finetune", "eval.max_samples=2000", "eval.evaluators.finetune.epochs=8",
                       "eval.evaluators.finetune.warmup_epochs=1", "eval.evaluators.finetune.blr=null",
                       "eval.evaluators.finetune.lr=5e-3", "eval.evaluators.finetune.batch_size=64"])
    validate(cfg)
    dm = build(cfg.data, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = build(cfg.model, input_shape=dm.input_shape)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = build(cfg.eval)(model, dm, torch.device("cpu"))
    assert metrics["finetune/top1"] > 0.35, metrics
    assert metrics["finetune/top5"] >= metrics["finetune/top1"]
    assert metrics["finetune/train_loss"] < 2.2  # ln 10 = 2.30 at chance
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in state)
    assert model.training and all(isinstance(b.drop_path1, nn.Identity) for b in model.encoder.blocks)


def test_finetune_is_reproducible_and_leaves_global_rngs_alone():
    """RandAugment draws from `random` and numpy: the evaluator seeds them and restores the caller's state."""
    import random

    import numpy as np

    cfg = compose_cfg([*TINY_MAE, "eval=finetune", "eval.max_samples=128", "eval.evaluators.finetune.epochs=1",
                       "eval.evaluators.finetune.batch_size=32", "eval.evaluators.finetune.warmup_epochs=0"])
    dm = build(cfg.data, seed=0)
    dm.setup("fit")
    model = build(cfg.model, input_shape=dm.input_shape)
    random.seed(5)
    np.random.seed(5)
    runs = [build(cfg.eval)(model, dm, torch.device("cpu")) for _ in range(2)]
    assert runs[0] == runs[1]
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    build(cfg.eval)(model, dm, torch.device("cpu"))
    assert (random.random(), np.random.rand()) == expected


def test_finetune_config_rejects_bad_keys():
    with pytest.raises(ConfigError, match="layer_decy"):
        validate(compose_cfg(["model=mae", "eval=finetune", "+eval.evaluators.finetune.layer_decy=0.7"]))
    with pytest.raises(ValueError, match="exactly one of lr"):
        FineTune(lr=1e-3, blr=5e-4)


# -- aeforge-eval (aeforge/evaluate.py) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 3-step tiny MAE run (train.py in a subprocess, as a user would): its run dir."""
    logs = tmp_path_factory.mktemp("logs")
    run_train([*TINY_MAE, "debug=smoke", "eval=none"], logs)
    (run,) = (logs / "mae_mnist_subset" / "runs").iterdir()
    return run


FAST_FT = ["eval.max_samples=256", "eval.evaluators.finetune.epochs=1", "eval.evaluators.finetune.batch_size=32"]


def test_evaluate_script_finetunes_a_checkpoint(tiny_run, capsys):
    metrics_before = (tiny_run / "metrics.json").read_text()
    path = evaluate.main([f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}", "eval=finetune", *FAST_FT])
    assert path == tiny_run / "eval_finetune.json"
    metrics = json.loads(path.read_text())
    assert 0 <= metrics["finetune/top1"] <= 1 and "finetune/top5" in metrics
    out = capsys.readouterr().out
    assert "finetune/top1" in out  # the table
    assert out.strip().splitlines()[-1] == f"eval: {path}"
    assert (tiny_run / "metrics.json").read_text() == metrics_before  # the run's own results stay
    assert (tiny_run / "eval" / "finetune" / "metrics.json").is_file()
    resolved = (tiny_run / "eval" / "finetune" / "config_resolved.yaml").read_text()
    assert "FineTune" in resolved and "linear_probe" not in resolved  # eval node replaced, not merged


def test_finetune_on_two_processes_equals_one_with_twice_the_batch(tiny_run, tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 8 takes the same steps as 1 process x batch 16: the ranks
    interleave one shared permutation and DDP averages their gradients. Randomness that is per rank by design
    (drop path, mixup/cutmix, erasing, RandAugment) is off here."""
    common = [f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}", "eval=finetune", "eval.max_samples=128",
              "trainer.accelerator=cpu", *(f"eval.evaluators.finetune.{k}" for k in (
                  "epochs=2", "lr=2e-3", "blr=null", "drop_path=0", "mixup=0", "cutmix=0", "reprob=0",
                  "rand_augment=null", "warmup_epochs=0.5"))]
    results = {}
    for name, cmd, batch in (
        ("one", [sys.executable, "scripts/evaluate.py"], 16),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "scripts/evaluate.py"], 8),
    ):
        proc = run_command([*cmd, *common, f"eval.evaluators.finetune.batch_size={batch}"], tmp_path, timeout=300)
        results[name] = json.loads((tiny_run / "eval_finetune.json").read_text())
        results[name]["log"] = proc.stdout + proc.stderr
    one, two = results["one"], results["two"]
    assert "batch 8 x 2 processes" in two["log"] and "batch 16 x 1 processes" in one["log"]
    assert two["finetune/lr"] == one["finetune/lr"] == 2e-3
    assert two["finetune/train_loss"] == pytest.approx(one["finetune/train_loss"], rel=1e-4)
    assert two["finetune/top1"] == pytest.approx(one["finetune/top1"], abs=1 / 128)  # at most one image flips


def test_sharded_evaluation_refuses_single_process_evaluators():
    """Under torchrun (train.run passes sharded=True) only evaluators that split their work over the ranks may
    run; the error names the others before any process-group call."""
    from aeforge.eval.probes import LinearProbe

    evaluation = Evaluation({"finetune": FineTune(epochs=1), "linear_probe": LinearProbe()})
    with pytest.raises(ConfigError, match=r"\['linear_probe'\] run in one process; under torchrun"):
        evaluation(MLPAutoencoder((1, 4, 4), [8], 2), None, torch.device("cpu"), sharded=True)


def test_evaluation_on_several_devices_without_torchrun_is_refused(tmp_path):
    """fit=false with trainer.devices=2 outside torchrun: a clear error, not a process group waiting forever."""
    cfg = compose_cfg([*TINY_MAE, "debug=smoke", "fit=false", "resume=random", "eval=finetune", "trainer.devices=2",
                       "trainer.strategy=ddp"], tmp_path)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        run(cfg)


def test_evaluate_script_runs_other_eval_choices(tiny_run):
    path = evaluate.main([f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}", "eval=default", "eval.max_samples=64",
                          "eval.evaluators.linear_probe.epochs=2"])
    metrics = json.loads(path.read_text())
    assert {"linear_probe/acc", "knn/acc", "reconstruction/psnr"} <= metrics.keys()


def test_evaluate_script_without_run_config_needs_model_and_data(tiny_run, tmp_path):
    ckpt = tmp_path / "x.ckpt"
    shutil.copy(tiny_run / "checkpoints" / "last.ckpt", ckpt)
    with pytest.raises(SystemExit, match=r"no run config next to it.*model=\.\.\. data=\.\.\."):
        evaluate.main([f"ckpt={ckpt}", "eval=finetune"])
    path = evaluate.main([f"ckpt={ckpt}", "eval=finetune", *TINY_MAE, "data=mnist_subset", *FAST_FT])
    assert path == tmp_path / "eval_finetune.json" and "finetune/top1" in json.loads(path.read_text())


def test_evaluate_script_errors(tiny_run, tmp_path):
    ckpt = f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(SystemExit, match="no such checkpoint file"):
        evaluate.main([f"ckpt={tmp_path / 'missing.ckpt'}", "eval=finetune"])
    with pytest.raises(SystemExit, match=r"eval='finetuned' is not an eval config.*'default'.*'finetune'"):
        evaluate.main([ckpt, "eval=finetuned"])
    with pytest.raises(SystemExit, match=r"no eval= given; valid choices: \[.*'finetune'"):
        evaluate.main([ckpt])
    with pytest.raises(SystemExit, match="no ckpt= given"):
        evaluate.main(["eval=finetune"])
    with pytest.raises(SystemExit, match="model=vae: the checkpoint was trained with the saved model config"):
        evaluate.main([ckpt, "eval=finetune", "model=vae"])
    # the command line: exit code 1 and the message on stderr, before torch is imported
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), ckpt, "eval=nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "eval='nope' is not an eval config" in proc.stderr and "'finetune'" in proc.stderr
