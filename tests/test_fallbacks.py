"""Fallbacks that used to be silent are loud (issue 12): each is an error, or a warning that names the
consequence plus a `skipped` key in the metrics (docs/evaluation.md, "Skipped results")."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aeforge.config import ConfigError
from aeforge.data.sources import DataFileError
from aeforge.models.sae import SAEBank
from aeforge.models.sae_activations import TopK
from aeforge.train import run
from tests.conftest import compose_cfg


@pytest.fixture
def warnings_of_aeforge(caplog):
    caplog.set_level(logging.WARNING, logger="aeforge")
    return caplog


# -- 1. SAE evaluation without the LM head -----------------------------------------------------------------
class _ActivationData:
    """What collect_site_metrics reads of an ActivationDataModule; the LM fails to load or has no head."""

    hookpoint_names = ["layers.0.residual"]
    lm_name = "some/model"

    def __init__(self, lm_error: Exception | None = None, has_head: bool = True):
        self.lm_error, self._has_head = lm_error, has_head

    @property
    def lm(self):
        if self.lm_error is not None:
            raise self.lm_error
        return torch.nn.Identity()

    @property
    def has_lm_head(self):
        return self.lm is not None and self._has_head

    def eval_dataloader(self, split, batch_size):
        g = torch.Generator().manual_seed(0)
        return [{"x": torch.randn(32, 1, 8, generator=g)} for _ in range(2)]

    def normalize(self, x):
        return x


@pytest.mark.parametrize("data", [_ActivationData(lm_error=OSError("no such model")),
                                  _ActivationData(has_head=False)], ids=["lm_fails_to_load", "headless_lm"])
def test_sae_eval_says_when_it_skips_the_ce_metrics(data, warnings_of_aeforge):
    from aeforge.eval.sae import SAEMetrics, collect_site_metrics, report_site_metrics

    torch.manual_seed(0)
    bank = SAEBank((1, 8), TopK(k=2), n_latents=16, aux_k=0)
    m = report_site_metrics(collect_site_metrics(bank, data, torch.device("cpu"), ce_sequences=4))
    assert "fvu" in m and "ce_recovered" not in m
    assert m["skipped/ce_recovered"] == 1.0
    assert "skipped/ce_recovered" in warnings_of_aeforge.text and "no ce_clean" in warnings_of_aeforge.text
    # the evaluator (eval=sae) carries the key too: metrics.json gets sae/skipped/ce_recovered
    ctx = SimpleNamespace(model=bank, datamodule=data, device=torch.device("cpu"), max_samples=64, batch_size=32)
    assert SAEMetrics(ce_sequences=4)(ctx)["skipped/ce_recovered"] == 1.0


def test_ce_sequences_zero_is_a_choice_not_a_skip():
    from aeforge.eval.sae import collect_site_metrics, report_site_metrics

    bank = SAEBank((1, 8), TopK(k=2), n_latents=16, aux_k=0)
    m = report_site_metrics(collect_site_metrics(bank, _ActivationData(OSError("x")), torch.device("cpu"),
                                                 ce_sequences=0))
    assert not any("skipped" in k for k in m)


# -- 2. the causal LM swapped for a headless model ------------------------------------------------------------
def test_headless_fallback_of_load_lm_is_a_warning_that_names_the_cost(monkeypatch, warnings_of_aeforge):
    import transformers

    from aeforge.data.lm import load_lm

    def no_causal(*a, **k):
        raise ValueError("Unrecognized configuration class for this kind of AutoModel: AutoModelForCausalLM")

    headless = torch.nn.Linear(2, 2)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: SimpleNamespace(model_type="t5"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_causal)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: headless)
    model, _ = load_lm("/models/some-encoder-decoder")
    assert model is headless
    text = warnings_of_aeforge.text
    assert "headless AutoModel" in text and "skipped/ce_recovered" in text and "some-encoder-decoder" in text


# -- 3. SAE data without its corpus ---------------------------------------------------------------------------
def test_missing_default_corpus_is_an_error_unless_synthetic_is_asked_for(tmp_path, monkeypatch):
    from aeforge.data import lm_text

    # no corpus anywhere default_text looks: $AEFORGE_DATA_DIR, ./data, beside the package, ../shared/data
    monkeypatch.setenv("AEFORGE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lm_text, "__file__", str(tmp_path / "repo" / "aeforge" / "data" / "lm_text.py"))
    with pytest.raises(DataFileError, match=r"tinyshakespeare.txt.*data\.text=synthetic"):
        lm_text.default_text()
    assert len(lm_text.synthetic_documents(3, seed=0)) == 3  # data.text=synthetic: generated text, on purpose


# -- 4. evaluators that cannot run ----------------------------------------------------------------------------
def _unlabelled_ctx(model=None):
    feats = (torch.randn(8, 4), None)
    return SimpleNamespace(has_labels=False, features=lambda split: feats, model=model or torch.nn.Identity(),
                           datamodule=SimpleNamespace(num_classes=None), device=torch.device("cpu"))


def _evaluators():
    from aeforge.eval.clustering import ClusteringMetrics
    from aeforge.eval.finetune import FineTune
    from aeforge.eval.probes import KNN, LinearProbe
    from aeforge.eval.prototypical import PrototypicalProbe
    from aeforge.eval.reconstruction import ReconstructionMetrics

    proto = PrototypicalProbe()
    proto._tokens = lambda ctx, split: (torch.randn(8, 4, 3), None)  # tokens without labels
    return {"linear_probe": LinearProbe(), "knn": KNN(), "clustering": ClusteringMetrics(), "finetune": FineTune(),
            "prototypical": proto, "reconstruction": ReconstructionMetrics()}


@pytest.mark.parametrize("name", list(_evaluators()))
def test_an_evaluator_that_cannot_run_says_so(name, warnings_of_aeforge):
    out = _evaluators()[name](_unlabelled_ctx())
    assert out == {"skipped": 1.0}
    assert "skipped" in warnings_of_aeforge.text


def test_skipped_evaluators_land_in_metrics_json_as_name_slash_skipped():
    from aeforge.eval import Evaluation
    from aeforge.eval.probes import LinearProbe

    class NoLabels:
        def eval_dataloader(self, split, bs):
            return [{"x": torch.randn(4, 2)}]

        def normalize(self, x, augment=False):
            return x

    class Flat(torch.nn.Module):
        def encode(self, batch):
            return batch["x"]

    metrics = Evaluation({"linear_probe": LinearProbe()})(Flat(), NoLabels(), torch.device("cpu"))
    assert metrics == {"linear_probe/skipped": 1.0}


# -- 5. fit=false without a checkpoint ------------------------------------------------------------------------
def test_evaluating_without_a_checkpoint_is_refused_unless_random_is_asked_for(tmp_path):
    cfg = compose_cfg(["debug=smoke", "fit=false", "eval=none"], tmp_path)
    with pytest.raises(ConfigError, match="fit=false with resume=None: no checkpoint.*resume=random"):
        run(cfg)
    assert not (tmp_path / "metrics.json").exists()
    cfg = compose_cfg(["debug=smoke", "fit=false", "resume=random", "eval=default", "~eval.evaluators.linear_probe",
                       "~eval.evaluators.knn"], tmp_path)
    run(cfg)
    assert "reconstruction/psnr" in json.loads((tmp_path / "metrics.json").read_text())


# -- 6. an npz test part beside val_fraction ------------------------------------------------------------------
def test_npz_test_part_and_val_fraction_together_are_refused(tmp_path):
    from aeforge.data.images import ArrayImageDataModule

    p = tmp_path / "imgs.npz"
    np.savez(p, x=np.random.randint(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 4,
             x_test=np.random.randint(0, 255, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 4)
    kw = dict(path=str(p), batch_size=4, num_workers=0, mean=[0.5], std=[0.2])
    with pytest.raises(DataFileError, match=r"x_test.*val_fraction=0\.2.*data\.val_fraction=0"):
        ArrayImageDataModule(val_fraction=0.2, **kw)
    dm = ArrayImageDataModule(val_fraction=0.0, **kw)
    assert len(dm.train_set) == 40 and len(dm.val_set) == 12


# -- 7. teacher weights loaded by position --------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))


def _reordered(state: dict, order: list[int]) -> dict:
    """The tensors under another implementation's names (`other.<i>.<last part>`, i its place in `state`),
    saved in `order`."""
    items = list(state.items())
    return {f"other.{i}.{items[i][0].rsplit('.', 1)[-1]}": items[i][1] for i in order}


def test_positional_teacher_loading_checks_names_and_the_stored_pairing():
    from aeforge.targets.teachers import load_state_dict_into, pairing_fingerprint

    src = _net().state_dict()  # 0.weight 0.bias 1.weight 1.bias 2.weight 2.bias 2.running_mean 2.running_var ...
    same_order = _reordered(src, list(range(len(src))))
    good = pairing_fingerprint(same_order, _net().state_dict())
    model = _net()
    assert load_state_dict_into(model, same_order, good) == "positional"
    assert torch.equal(model[1].weight, src["1.weight"])

    with pytest.raises(ValueError, match=f"positional_fingerprint={good}"):
        load_state_dict_into(_net(), same_order)  # a pairing nobody checked is not loaded

    # BatchNorm's running_mean and running_var saved in the other order: same shapes, wrong places
    bn_swapped = _reordered(src, [0, 1, 2, 3, 4, 5, 7, 6, 8])
    with pytest.raises(ValueError, match="would put checkpoint other.7.running_var into model 2.running_mean"):
        load_state_dict_into(_net(), bn_swapped, good)

    # the two equal convs saved in the other order: last name parts and shapes agree, the fingerprint does not
    convs_swapped = _reordered(src, [2, 3, 0, 1, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match="not the stored"):
        load_state_dict_into(_net(), convs_swapped, good)
    # other weights under the same names (another training run): the checked pairing was of other tensors
    retrained = {k: v + 1 if v.is_floating_point() else v for k, v in same_order.items()}
    with pytest.raises(ValueError, match="not the stored"):
        load_state_dict_into(_net(), retrained, good)
