"""What is new in Bird-MAE (fbank front end, spectrogram MAE, prototypical probe), FMAE-IAT (gradient
reversal, identity head, layer decay), PHG-MAE (whole-modality masking, ensembles) and MixedAE (mixing)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from aeforge.data.audio import kaldi_fbank, kaldi_mel_banks, mel_scale, pad_or_crop
from aeforge.eval.prototypical import PrototypeHead, PrototypicalProbe, token_map
from aeforge.models.bird_mae import BirdMAE
from aeforge.models.fmae_iat import IATClassifier, LayerDecayModule, grad_reverse
from aeforge.modules.optim import OptimSettings
from aeforge.nn.masking import RandomMasking
from aeforge.objectives import Objective
from aeforge.objectives.supervised import ClassificationLoss, UniformTargetLoss
from tests.conftest import DATA_DIR, needs_data, run_train

# -- Bird-MAE: front end ---------------------------------------------------------------------------------


def test_fbank_shape_of_a_five_second_clip_at_32k():
    spec = kaldi_fbank(torch.randn(2, 5 * 32000) * 0.1, 32000, num_mel_bins=128, window="hanning")
    assert spec.shape == (2, 498, 128)  # Bird-MAE: ~498 frames before padding to 512


def test_fbank_energy_sanity():
    sr, t = 16000, torch.arange(16000) / 16000
    tone = 0.1 * torch.sin(2 * math.pi * 1000 * t)
    spec = kaldi_fbank(tone, sr, num_mel_bins=64)[0]
    banks = kaldi_mel_banks(64, 512, sr)
    centre_hz = (banks * torch.arange(257) * sr / 512).sum(1) / banks.sum(1)
    peak = spec.mean(0).argmax().item()
    assert abs(centre_hz[peak].item() - 1000) < 120  # energy lands in the 1 kHz filter
    louder = kaldi_fbank(2 * tone, sr, num_mel_bins=64)[0]
    assert torch.allclose((louder - spec)[:, peak], torch.full((spec.shape[0],), math.log(4.0)), atol=1e-3)
    silence = kaldi_fbank(torch.zeros(16000), sr, num_mel_bins=64)
    assert torch.allclose(silence, torch.full_like(silence, math.log(torch.finfo(torch.float32).eps)))
    # Kaldi mel scale and filter geometry: triangles peak at 1, no negative weights
    assert abs(mel_scale(700.0).item() - 1127 * math.log(2)) < 1e-9
    assert banks.min() >= 0 and banks.max() <= 1 and (banks.sum(1) > 0).all()


def test_pad_value_is_batch_minimum():
    spec = torch.randn(3, 10, 4)
    out = pad_or_crop(spec, torch.tensor([10, 4, 7]), 12)
    assert out.shape == (3, 12, 4)
    valid_min = torch.cat([spec[0], spec[1, :4], spec[2, :7]]).min()
    assert (out[1, 4:] == valid_min).all() and (out[0, 10:] == valid_min).all()
    assert torch.equal(out[2, :7], spec[2, :7])


@needs_data("fsdd", "fsdd.npz")
def test_fsdd_datamodule_gives_spectrograms_with_speakers():
    from aeforge.data.audio import FSDDDataModule

    dm = FSDDDataModule(
        path=str(DATA_DIR / "fsdd" / "fsdd.npz"),
        batch_size=8,
        mean=-6.78,
        std=3.91,
        target_length=64,
        mixup_p=0.5,
    )
    assert len(dm.train_set) == 2700 and len(dm.val_set) == 300 and dm.num_classes == 10
    batch = dm.train_set.__getitems__(list(range(8)))
    assert set(batch) == {"x", "y", "speaker"} and batch["speaker"].max() < 6
    x = dm.normalize(batch["x"])
    assert x.shape == (8, 1, 64, 64) == (8, *dm.input_shape) and torch.isfinite(x).all()
    assert -2 < x.mean() < 2
    torch.manual_seed(0)
    xa = dm.normalize(batch["x"], augment=True)  # roll + gain + mixup change the input, shape kept
    assert xa.shape == x.shape and not torch.allclose(xa, x)


def test_bird_mae_rectangular_spectrogram_grid():
    model = BirdMAE(
        (1, 96, 64),
        patch_size=16,
        embed_dim=64,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        masking=RandomMasking(0.75),
    )
    assert model.grid == (6, 4)
    out = model({"x": torch.randn(2, 1, 96, 64)})
    assert out["pred"].shape == (2, 24, 256) and out["mask"].sum().item() == 2 * 18
    assert model.tokens({"x": torch.randn(2, 1, 96, 64)}).shape == (2, 25, 64)
    with pytest.raises(ValueError, match="1-channel"):
        BirdMAE((3, 32, 32), patch_size=16)


# -- Bird-MAE: prototypical probe -------------------------------------------------------------------------


def test_prototype_head_structure_and_orthogonality():
    head = PrototypeHead(dim=8, num_classes=3, num_prototypes=4)
    with torch.no_grad():
        head.last_layer.fill_(-1.0)
        head.last_layer[1, 0] = 2.0
    fmap = torch.randn(5, 8, 3, 3, requires_grad=False)
    logits = head(fmap)
    # negative raw weights contribute nothing (ReLU): classes 0 and 2 give exactly the bias
    assert torch.allclose(logits[:, 0], head.bias[0].expand(5)) and torch.allclose(
        logits[:, 2], head.bias[2].expand(5)
    )
    # class c depends only on its own prototypes
    logits[:, 1].sum().backward()
    g = head.prototypes.grad
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0 and g[1].abs().sum() > 0
    with torch.no_grad():
        head.prototypes.copy_(torch.eye(8)[:4].expand(3, 4, 8))
    assert head.orthogonality().item() == pytest.approx(0.0, abs=1e-7)


def test_prototypical_probe_on_separable_tokens():
    torch.manual_seed(0)
    d, grid, n = 16, (4, 2), 120
    centres = torch.randn(3, d) * 3

    def make(m):
        y = torch.randint(3, (m,))
        toks = torch.randn(m, 1 + 8, d)
        toks[:, 1 + torch.randint(8, (m,))] += 0  # noise only, class signal below
        toks[torch.arange(m), 1 + torch.randint(8, (m,))] += centres[y]  # one patch carries the class
        return toks, y

    (xtr, ytr), (xva, yva) = make(n), make(60)

    class Ctx:
        model = type("M", (), {"grid": grid})()
        cache = {}

    probe = PrototypicalProbe(
        num_prototypes=3, epochs=40, batch_size=32, prototype_lr=5e-2, last_layer_lr=5e-2, focal=False
    )
    Ctx.cache = {"tokens/train/y": (xtr, ytr), "tokens/val/y": (xva, yva)}
    out = probe(Ctx())
    assert out["acc"] > 0.9 and out["map"] > 0.9
    assert token_map(xtr[:2], grid, focal=True, upsample=2).shape == (2, d, 8, 4)


# -- FMAE-IAT -----------------------------------------------------------------------------------------------


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
    mae = BirdMAE(
        (1, 16, 16),
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
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


def test_au_f1_protocols_match_sklearn():
    from sklearn.metrics import f1_score, roc_auc_score

    from aeforge.models.fmae_iat import au_metrics, multilabel_f1

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

    from aeforge.models.fmae_iat import AUF1, au_metrics

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

    from aeforge.models.fmae_iat import AUF1Monitor, au_metrics

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


# -- PHG-MAE ------------------------------------------------------------------------------------------------


def _phg():
    from aeforge.models.phg_mae import PHGMAE

    torch.manual_seed(0)
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    return PHGMAE((3 + 1 + 2 + 1 + 4, 16, 16), mods, num_semantic=4, width=4, keep_prob=0.5)


def test_layout_round_trip_and_whole_modalities_masked():
    from aeforge.models.phg_mae import apply_modality_mask, layout

    blocks = layout(["rgb", "edges", "hsv", "blur", "semantic"], 4)
    assert [(s.start, s.stop) for s in blocks.values()] == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 11)]
    x = torch.randn(64, 11, 5, 5) + 3  # no exact zeros in the data
    model = _phg()
    keep = model.masking(64, x.device)
    assert keep[:, 0].all()  # RGB always kept
    assert 0 < keep[:, 1:].float().mean() < 1  # others sometimes dropped
    masked = apply_modality_mask(x, keep, blocks)
    for i, s in enumerate(blocks.values()):
        block = masked[:, s]
        dropped = ~keep[:, i]
        assert (block[dropped] == 0).all()  # every channel of a dropped modality is exactly zero
        assert torch.equal(block[~dropped], x[:, s][~dropped])  # kept ones untouched
    # unlabelled frames never get their target map as input
    out = model({"x": x[:, :, :4, :4].repeat(1, 1, 4, 4), "labeled": torch.zeros(64, dtype=torch.bool)})
    assert not out["keep"][:, 4].any() and out["pred"].shape == (64, 11, 16, 16)


def test_ensemble_k1_all_kept_equals_single_forward():
    model = _phg().eval()
    x = torch.randn(3, 11, 16, 16)
    probs = model.predict_semantic({"x": x}, k=1, mode="all")
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[:, 4] = False  # the target is never an input at test time
    single = model.net(torch.cat([x[:, :7], torch.zeros(3, 4, 16, 16)], 1))[:, 7:].softmax(1)
    assert torch.allclose(probs, single, atol=1e-6)
    assert torch.equal(model.test_mask(3, "cpu", mode="all"), keep)
    ens = model.predict_semantic({"x": x}, k=8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ens.sum(1), torch.ones(3, 16, 16), atol=1e-5)


def test_modality_losses_only_count_labelled_semantics():
    from aeforge.objectives.multimodal import ModalityLoss

    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    ce = ModalityLoss("semantic", mods, num_semantic=4, kind="ce")
    pred = torch.randn(2, 11, 4, 4)
    sem = torch.randint(4, (2, 4, 4))
    both = ce(
        {"pred": pred, "keep": torch.ones(2, 5, dtype=torch.bool)},
        {"sem": sem, "labeled": torch.tensor([1, 1])},
    )
    first = ce(
        {"pred": pred, "keep": torch.ones(2, 5, dtype=torch.bool)},
        {"sem": sem, "labeled": torch.tensor([1, 0])},
    )
    ref = torch.nn.functional.cross_entropy(pred[:1, 7:], sem[:1])
    assert torch.allclose(first, ref) and not torch.allclose(both, first)
    l1 = ModalityLoss("edges", mods, num_semantic=4, kind="l1", only_masked=True)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 1] = False
    x = torch.randn(2, 11, 4, 4)
    got = l1({"pred": pred, "keep": keep}, {"x": x})
    assert torch.allclose(got, (pred[1, 3] - x[1, 3]).abs().mean())


def _teacher_ckpt(tmp_path, model) -> str:
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def _student(path, **kw):
    from aeforge.models.phg_mae import PHGDistill

    torch.manual_seed(1)
    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    return PHGDistill((11, 16, 16), mods, num_semantic=4, width=2, teacher_checkpoint=path, teacher_k=2, **kw)


def test_distilled_student_reads_rgb_only_and_its_teacher_stays_frozen(tmp_path):
    from aeforge.objectives.multimodal import DistillLoss

    teacher = _phg()
    student = _student(_teacher_ckpt(tmp_path, teacher))
    for k, v in teacher.state_dict().items():
        assert torch.equal(student.teacher.model.state_dict()[k], v), k  # loaded, width read from the weights
    x = torch.randn(4, 11, 16, 16)
    student.train()
    assert not student.teacher.training and not any(p.requires_grad for p in student.teacher.parameters())
    out = student({"x": x})
    assert out["keep"][:, 0].all() and not out["keep"][:, 1:].any()  # RGB in, every other block zero
    other = x.clone()
    other[:, 3:] = torch.randn(4, 8, 16, 16)
    student.eval()
    assert torch.equal(student({"x": x})["pred"], student({"x": other})["pred"])
    assert torch.equal(student.test_mask(4, "cpu", mode="all"), out["keep"])  # every eval mode is RGB only
    assert torch.allclose(out["soft"].sum(1), torch.ones(4, 16, 16), atol=1e-5)
    loss = DistillLoss(["rgb", "edges", "hsv", "blur", "semantic"], num_semantic=4)(out, {"x": x})
    loss.backward()
    assert student.net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.teacher.parameters())


def test_distill_refuses_a_missing_or_foreign_teacher(tmp_path):
    with pytest.raises(ValueError, match="experiment=phg_mae_multimodal"):
        _student(None)
    assert _student(None, allow_random=True).teacher.model.net.out.out_channels == 11  # debug=smoke stand-in
    torch.save({"state_dict": {"model.encoder.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a PHG-MAE checkpoint"):
        _student(str(tmp_path / "other.ckpt"))
    from aeforge.models.phg_mae import PHGMAE

    six = PHGMAE((3 + 1 + 2 + 1 + 6, 16, 16), ["rgb", "edges", "hsv", "blur", "semantic"], num_semantic=6, width=4)
    with pytest.raises(ValueError, match="does not match"):
        _student(_teacher_ckpt(tmp_path, six))


def test_distill_loss_is_soft_cross_entropy_and_the_student_learns_the_teacher(tmp_path):
    from aeforge.objectives.multimodal import DistillLoss

    mods = ["rgb", "edges", "hsv", "blur", "semantic"]
    term = DistillLoss(mods, num_semantic=4)
    pred = torch.randn(2, 11, 4, 4)
    sem = torch.randint(4, (2, 4, 4))
    hard = torch.nn.functional.one_hot(sem, 4).permute(0, 3, 1, 2).float()
    assert torch.allclose(term({"pred": pred, "soft": hard}, {}), torch.nn.functional.cross_entropy(pred[:, 7:], sem))
    # a few Adam steps on 8 fixed frames: the student's KL to its teacher (loss - teacher entropy) falls
    student = _student(_teacher_ckpt(tmp_path, _phg()), teacher_mode="all")  # one deterministic target
    x = torch.randn(8, 11, 16, 16)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    kl = []
    for _ in range(40):
        out = student({"x": x})
        loss = term(out, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        kl.append(loss.item() + (out["soft"] * out["soft"].clamp_min(1e-12).log()).sum(1).mean().item())
    assert kl[-1] < 0.3 * kl[0]


def _video_dm(tmp_path, labeled_fraction=0.5):
    """The real VideoModalitiesDataModule on two small clips of smooth random frames (no staged data needed)."""
    import numpy as np

    from aeforge.models.phg_mae import VideoModalitiesDataModule

    rng = np.random.default_rng(0)
    clips = {n: (rng.random((m, 4, 4, 3)).repeat(4, 1).repeat(4, 2) * 255).astype(np.uint8)
             for n, m in (("a", 24), ("b", 6))}
    np.savez(tmp_path / "clips.npz", **clips)
    return VideoModalitiesDataModule(str(tmp_path / "clips.npz"), ["rgb", "edges", "hsv", "blur", "semantic"],
                                     ["a"], ["b"], num_semantic=4, image_size=16,
                                     labeled_fraction=labeled_fraction, batch_size=8)


def test_pseudo_labels_become_targets_of_unlabelled_frames_and_flip_with_them(tmp_path):
    from types import SimpleNamespace

    from aeforge.models.phg_mae import NO_LABEL

    dm = _video_dm(tmp_path)
    ds = dm.train_set
    dm.trainer = SimpleNamespace(training=True)
    unl = ~ds.labeled
    assert 0 < unl.sum() < len(ds) and (ds.pseudo == NO_LABEL).all()
    raw = ds.__getitems__(list(range(len(ds))))
    plain = dm.on_after_batch_transfer(dict(raw))  # nothing written yet: labelled frames only
    assert torch.equal(plain["labeled"], ds.labeled)
    # the true maps written as pseudo-labels: after the random flips the swapped targets are exactly the maps
    # derived from the flipped frames, i.e. the pseudo maps were flipped with their frames
    ds.pseudo.copy_(dm.make(ds.frames)["sem"].to(torch.uint8))
    torch.manual_seed(0)
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    torch.manual_seed(0)
    ref = dm.make(ds.frames, augment=True)
    assert out["labeled"].all()  # pseudo-labelled frames now count as labelled
    assert torch.equal(out["sem"], ref["sem"])
    assert not torch.equal(ref["sem"], dm.make(ds.frames)["sem"])  # some frames were flipped
    # a constant pseudo map replaces the target and the one-hot input block of unlabelled frames only
    ds.pseudo.fill_(2)
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    assert (out["sem"][unl] == 2).all() and not (out["sem"][~unl] == 2).all()
    block = out["x"][:, dm.blocks["semantic"]]
    assert (block[unl][:, 2] == 1).all() and block[unl].sum(1).eq(1).all()
    # pixels left unlabelled (below the confidence threshold): no one-hot input, no loss
    ds.pseudo[:, :, :8] = NO_LABEL
    out = dm.on_after_batch_transfer(ds.__getitems__(list(range(len(ds)))))
    gone = out["sem"][unl] == NO_LABEL
    assert gone.float().mean() == 0.5 and out["labeled"].all()
    assert (out["x"][:, dm.blocks["semantic"]][unl].sum(1)[gone] == 0).all()
    from aeforge.objectives.multimodal import ModalityLoss

    ce = ModalityLoss("semantic", dm.names, num_semantic=4, kind="ce")
    pred = torch.randn(len(ds), 11, 16, 16)
    frame = int(unl.nonzero()[0])
    one = ce({"pred": pred[frame : frame + 1], "keep": None}, {k: v[frame : frame + 1] for k, v in out.items()})
    ref = torch.nn.functional.cross_entropy(pred[frame : frame + 1, 7:, :, 8:], out["sem"][frame : frame + 1, :, 8:])
    assert torch.allclose(one, ref)  # the mean over the labelled half only


def test_pseudo_label_rounds_write_the_ensemble_and_survive_a_checkpoint(tmp_path):
    from types import SimpleNamespace

    from aeforge.models.phg_mae import NO_LABEL, PHGMAE, PseudoLabelRounds

    dm = _video_dm(tmp_path)
    ds = dm.train_set
    model = PHGMAE(dm.input_shape, dm.names, num_semantic=4, width=2).train()
    logged = {}
    module = SimpleNamespace(model=model, device=torch.device("cpu"), log_dict=lambda d, **_: logged.update(d))
    trainer = SimpleNamespace(datamodule=dm, current_epoch=0)
    cb = PseudoLabelRounds(every_n_epochs=2, k=3)
    cb.setup(trainer, module, "fit")
    cb.on_train_epoch_end(trainer, module)  # epoch 1 of every 2: nothing
    assert (ds.pseudo == NO_LABEL).all() and not logged
    trainer.current_epoch = 1
    cb.on_train_epoch_end(trainer, module)
    unl = ~ds.labeled
    assert (ds.pseudo[unl] != NO_LABEL).all() and (ds.pseudo[~unl] == NO_LABEL).all()
    assert model.training  # back in training mode
    g = torch.Generator().manual_seed(1)  # the callback's seed + epoch
    batch = dm.make(ds.frames[unl.nonzero().flatten()])
    expect = model.eval().predict_semantic(batch, k=3, generator=g).argmax(1)
    assert torch.equal(ds.pseudo[unl].long(), expect)
    assert 0 <= logged["pseudo/acc"] <= 1
    state = cb.state_dict()
    written = ds.pseudo.clone()
    ds.pseudo.fill_(NO_LABEL)  # a fresh process after resume
    again = PseudoLabelRounds(every_n_epochs=2, k=3)
    again.load_state_dict(state)
    again.on_train_start(trainer, module)
    assert torch.equal(ds.pseudo, written)
    with pytest.raises(ValueError, match="every_n_epochs"):
        PseudoLabelRounds(every_n_epochs=-1)
    # a confidence threshold keeps only the pixels the ensemble is sure of
    g = torch.Generator().manual_seed(1)
    conf, pred = model.eval().predict_semantic(batch, k=3, generator=g).max(1)
    tau = float(conf.min() + conf.max()) / 2
    sure = PseudoLabelRounds(every_n_epochs=1, k=3, min_confidence=tau)
    sure.setup(trainer, module, "fit")
    sure.on_train_epoch_end(trainer, module)
    assert 0 < (conf >= tau).float().mean() < 1
    assert torch.equal(ds.pseudo[unl].long(), torch.where(conf >= tau, pred, NO_LABEL))
    assert logged["pseudo/coverage"] == pytest.approx((conf >= tau).float().mean().item())


# -- MixedAE -------------------------------------------------------------------------------------------------


def _mixed(**kw):
    from aeforge.models.mixed_ae import MixedAE

    torch.manual_seed(0)
    return MixedAE(
        (3, 16, 16),
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        visible_ratio=0.25,
        **kw,
    )


def test_mixing_keeps_per_token_source_ids():
    from aeforge.models.mixed_ae import mix_tokens, mixing_assignment

    src = mixing_assignment(3, 16, 4, "cpu", torch.Generator().manual_seed(0))
    assert all((src[g] == s).sum() == 4 for g in range(3) for s in range(4))  # exactly rL tokens per source
    tokens = torch.randn(12, 16, 5)
    mixed = mix_tokens(tokens, src)
    for g in range(3):
        for j in range(16):
            assert torch.equal(mixed[g, j], tokens[g * 4 + src[g, j], j])
    # unmixing round trip: scattering each source's tokens back recovers them at their positions
    for g in range(3):
        for s in range(4):
            pos = src[g] == s
            assert torch.equal(mixed[g, pos], tokens[g * 4 + s, pos])


def test_mixed_ae_outputs_and_masks():
    model = _mixed()
    x = torch.randn(6, 3, 16, 16)  # not a multiple of 4: the last group is padded, outputs are for 6 images
    out = model({"x": x})
    assert out["pred"].shape == (6, 16, 48) and out["mask"].shape == (6, 16)
    assert (out["mask"].sum(1) == 12).all()  # each image: 1 - r of its patches are heterologous
    src = out["sources"]
    assert src.shape == (2, 16)
    for i in range(6):  # image i's visible (homologous) positions are where its group's source id is i % 4
        assert torch.equal(out["mask"][i] == 0, src[i // 4] == i % 4)
    assert 0 <= out["topk_precision"].item() <= 1


def test_topk_attention_with_k_equal_to_length_is_plain_attention():
    from aeforge.models.mixed_ae import topk_attention_mask

    model = _mixed().eval()
    blk = model.encoder.blocks[0]
    x = torch.randn(2, 17, 32)
    mask = topk_attention_mask(x, blk, 17)
    assert (mask == 0).all() and torch.allclose(blk(x, attn_mask=mask), blk(x), atol=1e-6)
    mask = topk_attention_mask(x, blk, 5)
    assert ((mask == 0).sum(-1) == 5).all()


def test_homologous_contrastive_prefers_grouped_tokens():
    from aeforge.objectives.mixing import homologous_contrastive

    torch.manual_seed(0)
    src = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    centres = torch.eye(4)
    grouped = centres[src] + 0.01 * torch.randn(1, 8, 4)
    shuffled = grouped[:, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])]
    assert homologous_contrastive(grouped, src, 0.2) < homologous_contrastive(shuffled, src, 0.2)
