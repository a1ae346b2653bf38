"""FMAE-IAT: gradient reversal, the identity head and its adversaries, layer-wise lr decay with identity-head
extra steps (LayerDecayModule), and the AU-detection F1 evaluator and callback."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from aeforge.callbacks.au_f1 import AUF1Monitor
from aeforge.eval.au_f1 import AUF1, au_metrics, multilabel_f1
from aeforge.models.bird_mae import BirdMAE
from aeforge.models.fmae_iat import IATClassifier, grad_reverse
from aeforge.modules.layer_decay import LayerDecayModule
from aeforge.modules.optim import OptimSettings
from aeforge.objectives import Objective
from aeforge.objectives.supervised import ClassificationLoss, UniformTargetLoss
from tests.conftest import needs_data, run_train
from tests.mim_helpers import TINY_MAE

# -- gradient reversal and the identity head ------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_grl_is_identity_forward_and_scales_gradient_by_minus_lambda(lam):
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.allclose(x.grad, -lam * g)


def _iat(num_identities, lam, seed=0):
    torch.manual_seed(seed)
    return IATClassifier(
        (1, 16, 16),
        num_classes=3,
        num_identities=num_identities,
        grl_lambda=lam,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        drop_path=0.1,
    )


def _train(model, steps=3, with_id=True):
    terms = {"task": ClassificationLoss(pred_key="logits", target_key="y")}
    if with_id:
        terms["identity"] = ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="bce_onehot")
    obj = Objective(terms)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    for _ in range(steps):
        batch = {
            "x": torch.randn(6, 1, 16, 16, generator=g),
            "y": torch.randint(3, (6,), generator=g),
            "speaker": torch.randint(4, (6,), generator=g),
        }
        loss = obj(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_backbone_gets_task_grad_minus_lambda_identity_grad():
    lam = 1.5
    model = _iat(4, lam)
    batch = {"x": torch.randn(5, 1, 16, 16), "y": torch.randint(3, (5,)), "speaker": torch.randint(4, (5,))}
    model.eval()  # no drop path, so the three passes see the same network
    task = ClassificationLoss(pred_key="logits", target_key="y")
    ident = ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="bce_onehot")
    w = model.encoder.blocks[0].attn.qkv.weight

    def grad(fn):
        model.zero_grad()
        out = model(batch)
        fn(out).backward()
        return (
            w.grad.clone(),
            model.id_head.weight.grad.clone() if model.id_head.weight.grad is not None else None,
        )

    g_task, _ = grad(lambda o: task(o, batch))
    g_id, id_head_grad = grad(lambda o: ident(o, batch))
    g_both, _ = grad(lambda o: task(o, batch) + ident(o, batch))
    assert torch.allclose(g_both, g_task + g_id, atol=1e-6)
    # the identity gradient reaching the backbone is the reversed (-lambda) one: compare with lambda -> -1
    model.grl.lam = -1.0
    g_id_plain, id_head_grad_plain = grad(lambda o: ident(o, batch))
    assert torch.allclose(g_id, -lam * g_id_plain, atol=1e-6)
    assert torch.allclose(id_head_grad, id_head_grad_plain)  # the head itself minimises its own loss


def test_lambda_zero_is_bit_identical_to_plain_finetuning():
    a = _train(_iat(4, 0.0), with_id=True)
    b = _train(_iat(0, 0.0), with_id=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) <= set(sa) and any(k.startswith("id_head") for k in sa)
    for k, v in sb.items():
        assert torch.equal(v, sa[k]), k


# -- layer decay and identity-head extra steps ----------------------------------------------------------


def test_layer_decay_param_groups():
    model = _iat(4, 1.0)
    obj = Objective({"task": ClassificationLoss()})
    mod = LayerDecayModule(
        layer_decay=0.5, model=model, objective=obj, optim=OptimSettings(lr=1.0, weight_decay=0.05)
    )
    groups = mod.param_groups(1.0)
    scale_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert scale_of[id(model.encoder.patch_embed.proj.weight)] == 0.5**3
    assert scale_of[id(model.encoder.blocks[1].mlp.fc1.weight)] == 0.5**1
    assert scale_of[id(model.head.weight)] == 1.0 and scale_of[id(model.id_head.weight)] == 1.0
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(model.head.bias)] == 0.0 and wd[id(model.head.weight)] == 0.05


def test_layer_decay_id_head_lr_mult_gets_its_own_groups():
    model = _iat(4, 1.0)
    obj = Objective({"task": ClassificationLoss()})
    kw = dict(layer_decay=0.5, model=model, objective=obj, optim=OptimSettings(lr=1.0, weight_decay=0.05))
    plain = LayerDecayModule(**kw).param_groups(2.0)
    groups = LayerDecayModule(id_head_lr_mult=10.0, **kw).param_groups(2.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    plain_lr = {id(p): g["lr"] for g in plain for p in g["params"]}
    # every parameter exactly once, as before
    assert sorted(lr_of) == sorted(plain_lr) and sum(len(g["params"]) for g in groups) == len(plain_lr)
    for name, p in model.named_parameters():
        mult = 10.0 if name.startswith("id_head.") else 1.0
        assert lr_of[id(p)] == pytest.approx(plain_lr[id(p)] * mult), name
    assert lr_of[id(model.id_head.weight)] == pytest.approx(20.0) and scale_of[id(model.id_head.weight)] == 10.0
    assert lr_of[id(model.head.weight)] == pytest.approx(2.0)
    assert wd_of[id(model.id_head.weight)] == 0.05 and wd_of[id(model.id_head.bias)] == 0.0
    with pytest.raises(ValueError, match="id_head_lr_mult"):
        LayerDecayModule(id_head_lr_mult=0.0, **kw)


class _DictBatches(pl.LightningDataModule):
    """A fixed stream of tiny labelled batches (x, y, speaker) for Trainer-level IAT tests."""

    def __init__(self, n=24, batch_size=6):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.rows = [{"x": torch.randn(1, 16, 16, generator=g), "y": torch.randint(3, (), generator=g),
                      "speaker": torch.randint(4, (), generator=g)} for _ in range(n)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.rows, batch_size=self.batch_size, shuffle=False)


def _iat_module(lam, steps, schedule="cosine", **kw):
    obj = Objective({"task": ClassificationLoss(pred_key="logits", target_key="y"),
                     "identity": ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="bce_onehot")})
    return LayerDecayModule(layer_decay=0.75, id_head_steps=steps, model=_iat(4, lam), objective=obj,
                            optim=OptimSettings(lr=1e-3, weight_decay=0.05, schedule=schedule), **kw)


def _fit(module, max_steps, tmp_path=None, ckpt_path=None, save_to=None):
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    torch.manual_seed(5)
    trainer.fit(module, datamodule=_DictBatches(), ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return module.model.state_dict()


def test_extra_identity_head_steps_touch_only_the_head():
    module = _iat_module(1.0, steps=8, schedule="constant")  # a finished cosine schedule ends at lr 0
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_DictBatches())  # builds the optimizer
    model, term = module.model, module.objective.terms["identity"]
    model.eval()
    batch = _DictBatches().rows[:6]
    x, speaker = torch.stack([r["x"] for r in batch]), torch.stack([r["speaker"] for r in batch])
    feats = model.features(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss0 = term({"id_logits": model.id_head(feats)}, {"speaker": speaker}).item()
    module.train_identity_head(feats, speaker, steps=300)
    loss1 = term({"id_logits": model.id_head(feats)}, {"speaker": speaker}).item()
    assert loss1 < 0.5 * loss0  # the head learns the fixed features' identities
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("id_head."), k  # the head moved, nothing else
    assert all(p.grad is None for p in model.parameters())


def test_extra_identity_head_steps_leave_the_backbone_alone_at_lambda_zero_and_change_it_otherwise():
    one, many = _fit(_iat_module(0.0, steps=1), 6), _fit(_iat_module(0.0, steps=4), 6)
    for k, v in one.items():  # nothing of the extra steps leaks into the backbone's update (weight decay, grads)
        assert torch.equal(v, many[k]) != k.startswith("id_head."), k
    one, many = _fit(_iat_module(1.0, steps=1), 6), _fit(_iat_module(1.0, steps=4), 6)
    assert not torch.equal(one["encoder.blocks.0.attn.qkv.weight"], many["encoder.blocks.0.attn.qkv.weight"])


def test_extra_identity_head_steps_state_travels_in_checkpoints(tmp_path):
    """The next step's extra head updates use the previous batch's features: a checkpoint carries them."""
    module = _iat_module(1.0, steps=3)
    _fit(module, 3, tmp_path, save_to=tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=False)
    feats, target = saved["iat_adversary_batch"]
    assert feats.shape == (6, 32) and torch.equal(target, module._adversary_batch[1])
    fresh = _iat_module(1.0, steps=3)
    fresh.on_load_checkpoint(saved)
    assert all(torch.equal(a, b) for a, b in zip(fresh._adversary_batch, module._adversary_batch))
    plain = _iat_module(1.0, steps=1)
    _fit(plain, 1, tmp_path, save_to=tmp_path / "plain.ckpt")
    assert "iat_adversary_batch" not in torch.load(tmp_path / "plain.ckpt", map_location="cpu", weights_only=False)


def test_extra_identity_head_steps_bad_settings():
    with pytest.raises(ValueError, match="id_head_steps must be >= 1"):
        _iat_module(1.0, steps=0)
    valid = r"id_loss_term='ident' is not an objective term; valid: \['identity', 'task'\]"
    with pytest.raises(ValueError, match=valid):
        _iat_module(1.0, steps=2, id_loss_term="ident")
    obj = Objective({"task": ClassificationLoss()})
    with pytest.raises(ValueError, match="needs an identity head"):
        LayerDecayModule(id_head_steps=2, model=_iat(0, 1.0), objective=obj, optim=OptimSettings(lr=1e-3))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(_iat_module(1.0, steps=2), datamodule=_DictBatches())


# -- confusion adversary, losses, pretrained encoder ----------------------------------------------------


def test_confusion_adversary_gradients():
    """adversary=confusion: the identity loss trains the head only; the confusion loss reaches the backbone only,
    scaled by lambda; the task gradient is unchanged."""
    lam = 0.7
    model = _iat(4, lam)
    model.adversary = "confusion"
    model.eval()
    batch = {"x": torch.randn(5, 1, 16, 16), "y": torch.randint(3, (5,)), "speaker": torch.randint(4, (5,))}
    ident = ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="bce_onehot")
    conf = UniformTargetLoss(pred_key="id_confusion_logits", kind="bce")
    w, head_w = model.encoder.blocks[0].attn.qkv.weight, model.id_head.weight

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn(model(batch)).backward()
        return w.grad, head_w.grad

    g_w, g_head = grads(lambda o: ident(o, batch))
    assert g_w is None and g_head is not None and g_head.abs().sum() > 0
    g_w, g_head = grads(lambda o: conf(o, batch))
    assert g_w is not None and g_w.abs().sum() > 0 and g_head is None
    # the backbone's confusion gradient is lambda x the gradient of the same loss through an unscaled path
    f = model.features(batch["x"])
    model.zero_grad(set_to_none=True)
    conf({"id_confusion_logits": model.id_head(f)}, batch).backward()
    assert torch.allclose(g_w, lam * w.grad, atol=1e-6)


def test_uniform_target_loss_is_smallest_at_the_uniform_posterior():
    flat, peaked = torch.zeros(4, 5), torch.tensor([[4.0, 0, 0, 0, 0]]).repeat(4, 1)
    ce = UniformTargetLoss(pred_key="l", kind="ce")
    assert ce({"l": flat}, {}).item() == pytest.approx(math.log(5)) and ce({"l": peaked}, {}) > ce({"l": flat}, {})
    bce = UniformTargetLoss(pred_key="l", kind="bce")
    best = torch.full((4, 5), math.log(0.2 / 0.8))  # sigmoid = 1/5 everywhere
    entropy = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert bce({"l": best}, {}).item() == pytest.approx(entropy, abs=1e-6)
    assert bce({"l": flat}, {}) > bce({"l": best}, {})
    with pytest.raises(ValueError, match="kind"):
        UniformTargetLoss(kind="mse")


def test_confusion_adversary_needs_its_loss_term():
    model = _iat(4, 1.0)
    model.adversary = "confusion"
    obj = Objective({"task": ClassificationLoss(), "identity": ClassificationLoss(pred_key="id_logits",
                                                                                  target_key="speaker")})
    with pytest.raises(ValueError, match="objective=fmae_iat_confusion"):
        LayerDecayModule(model=model, objective=obj, optim=OptimSettings(lr=1e-3))
    with pytest.raises(ValueError, match=r"model.adversary must be one of \('grl', 'confusion'\)"):
        IATClassifier((1, 16, 16), num_classes=3, num_identities=2, adversary="conf", patch_size=8, embed_dim=32,
                      depth=1, num_heads=2)


@needs_data("fsdd", "fsdd.npz")
def test_iat_stronger_adversary_recipe_runs_and_au_f1_refuses_single_labels(tmp_path):
    """The YAML wiring of the aeforge additions: confusion adversary + its objective + extra head steps train
    through train.py; callbacks=au_f1 on single-label FSDD fails before the first epoch, naming the fix."""
    import json

    run_train(["experiment=fmae_iat_finetune", "debug=smoke", "model.adversary=confusion",
               "objective=fmae_iat_confusion", "module.id_head_steps=3", "task_name=confusion"], tmp_path)
    metrics = json.loads(next((tmp_path / "confusion" / "runs").glob("*/metrics.json")).read_text())
    assert metrics["steps"] >= 1 and "train/confusion_epoch" in metrics
    proc = run_train(["experiment=fmae_iat_finetune", "debug=smoke", "callbacks=au_f1", "task_name=au"], tmp_path,
                     check=False)
    assert proc.returncode != 0 and "callbacks=au_f1 needs multi-hot labels" in proc.stderr
    assert "Epoch 0" not in proc.stderr + proc.stdout


def test_iat_identity_loss_kinds_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    batch = {"speaker": torch.tensor([0, 2])}
    out = {"id_logits": logits}
    ce = ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="ce")(out, batch)
    p = logits.softmax(1)
    assert ce.item() == pytest.approx(-(p[0, 0].log() + p[1, 2].log()).item() / 2, rel=1e-6)
    bce = ClassificationLoss(pred_key="id_logits", target_key="speaker", kind="bce_onehot")(out, batch)
    onehot = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    sig = logits.sigmoid()
    manual = -(onehot * sig.log() + (1 - onehot) * (1 - sig).log()).mean()
    assert bce.item() == pytest.approx(manual.item(), rel=1e-6)


def test_iat_loads_mae_encoder_checkpoint(tmp_path):
    mae = BirdMAE((1, 16, 16), patch_size=8, **TINY_MAE)
    torch.save({"state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()}}, tmp_path / "last.ckpt")
    model = IATClassifier(
        (1, 16, 16),
        num_classes=3,
        num_identities=2,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        pretrained=str(tmp_path / "last.ckpt"),
    )
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, mae.encoder.blocks[1].attn.qkv.weight)
    assert not hasattr(model, "reconstruct")


# -- AU-detection F1 ------------------------------------------------------------------------------------


def test_au_f1_protocols_match_sklearn():
    from sklearn.metrics import f1_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    target = (torch.rand(200, 5, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.0])).long()
    probs = (0.35 * target + 0.65 * torch.rand(200, 5, generator=g)).clamp(0, 1)
    thr = torch.tensor([0.2, 0.5, 0.8])
    f1 = multilabel_f1(probs, target, thr)
    for i, t in enumerate(thr):
        ref = f1_score(target.numpy(), (probs >= t).numpy(), average=None, zero_division=0)
        assert torch.allclose(f1[i], torch.tensor(ref, dtype=f1.dtype)), float(t)
    m = au_metrics(probs, target, tune=(probs, target))
    assert m["f1_best_threshold"] >= m["f1_at_0.5"] - 1e-12 and 0.01 <= m["best_threshold"] <= 0.99
    assert m["f1_tuned_threshold"] == m["f1_best_threshold"]  # tuned on the same split = the test-tuned number
    aucs = [roc_auc_score(target[:, a].numpy(), probs[:, a].numpy()) for a in range(4)]  # AU 4 has no positives
    assert m["auc"] == pytest.approx(sum(aucs) / 4)
    perfect = au_metrics(target.float(), target)
    assert perfect["f1_at_0.5"] == pytest.approx(4 / 5) and perfect["auc"] == 1.0  # the empty AU scores 0 F1


def test_au_f1_evaluator_reads_the_task_head_and_refuses_single_labels():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    data = {s: [{"x": torch.randn(16, 3), "y": (torch.rand(16, 3, generator=g) < 0.5).long()} for _ in range(3)]
            for s in ("train", "val")}
    head = torch.nn.Linear(3, 3)
    ctx = SimpleNamespace(model=lambda b: {"logits": head(b["x"])}, batches=lambda split, desc: iter(data[split]))
    got = AUF1()(ctx)
    with torch.no_grad():
        p = {s: torch.cat([head(b["x"]).sigmoid() for b in data[s]]) for s in data}
    y = {s: torch.cat([b["y"] for b in data[s]]) for s in data}
    assert got == au_metrics(p["val"], y["val"], tune=(p["train"], y["train"]))
    single = {s: [{"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 2, 0])}] for s in ("train", "val")}
    ctx = SimpleNamespace(model=lambda b: {"logits": head(b["x"])}, batches=lambda split, desc: iter(single[split]))
    with pytest.raises(ValueError, match="multi-hot"):
        AUF1(tune_split=None)(ctx)


class _MultiLabelData(pl.LightningDataModule):
    """x (1, 16, 16) whose three quadrant means decide three binary labels: a learnable multi-label task."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        x = torch.randn(96, 1, 16, 16, generator=g)
        y = torch.stack([x[:, 0, :8, :8].mean((1, 2)), x[:, 0, :8, 8:].mean((1, 2)), x[:, 0, 8:, :8].mean((1, 2))], 1)
        self.rows = {"train": [{"x": a, "y": (b > 0).long()} for a, b in zip(x[:64], y[:64])],
                     "val": [{"x": a, "y": (b > 0).long()} for a, b in zip(x[64:], y[64:])]}

    def eval_dataloader(self, split, batch_size):
        return torch.utils.data.DataLoader(self.rows[split], batch_size=batch_size)

    def normalize(self, x, augment=False):
        return x

    def train_dataloader(self):
        return self.eval_dataloader("train", 16)

    def val_dataloader(self):
        return self.eval_dataloader("val", 16)


def test_au_f1_monitor_logs_val_f1_and_keeps_the_best_epoch(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Record(pl.Callback):
        def __init__(self):
            self.scores = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.scores.append(float(trainer.callback_metrics["val/au/f1_best_threshold"]))

    obj = Objective({"task": ClassificationLoss(pred_key="logits", target_key="y", kind="bce")})
    module = LayerDecayModule(layer_decay=0.75, model=_iat(0, 0.0), objective=obj, optim=OptimSettings(lr=3e-3))
    best = ModelCheckpoint(dirpath=tmp_path, filename="best_au_f1", monitor="val/au/f1_best_threshold", mode="max")
    record, dm = Record(), _MultiLabelData()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[AUF1Monitor(batch_size=32), record, best])
    trainer.fit(module, datamodule=dm)
    assert len(record.scores) == 4 and float(best.best_model_score) == pytest.approx(max(record.scores))
    # the logged numbers are au_metrics of the task head's sigmoid on the val split (last epoch)
    module.model.eval()
    with torch.no_grad():
        x, y = torch.stack([r["x"] for r in dm.rows["val"]]), torch.stack([r["y"] for r in dm.rows["val"]])
        expected = au_metrics(module.model({"x": x})["logits"].sigmoid(), y)
    for k, v in expected.items():
        assert float(trainer.callback_metrics[f"val/au/{k}"]) == pytest.approx(v, abs=1e-6), k
    assert max(record.scores) > 0.6  # the head learns the task (chance-level F1 of always-on is ~0.5)
