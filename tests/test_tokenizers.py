"""Frozen tokenizers for CAE's token target: the VQ tokenizer aeforge trains itself (model=vq_tokenizer,
tokenizer=vq) and OpenAI's DALL-E encoder (tokenizer=dalle), and CAE predicting their codes."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from aeforge.models.vq import VQTokenizer, strides
from aeforge.nn.masking import BlockMasking
from aeforge.targets.tokenizers import FrozenDalleTokenizer, FrozenVQTokenizer
from aeforge.train import build, run
from tests.conftest import compose_cfg
from tests.mim_helpers import FixedMasking, tiny_cae

MNIST = (1, 28, 28)
MNIST_STATS = {"data_mean": [0.1307], "data_std": [0.3081]}


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A 128-code tokenizer trained for 60 steps through the normal train.py path on the shipped MNIST subset."""
    out = tmp_path_factory.mktemp("vq")
    cfg = compose_cfg(["model=vq_tokenizer", "model.num_codes=128", "model.restart_dead_every=10",
                       "data.batch_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=60",
                       "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5",
                       "trainer.enable_model_summary=false", "optim.lr=2e-3", "evaluate=false"], out)
    run(cfg)
    return out


@pytest.fixture(scope="module")
def mnist_images():
    from aeforge.cli import ASSETS
    from aeforge.data.images import ArrayImageDataModule

    dm = ArrayImageDataModule(path=str(ASSETS / "mnist_subset.npz"), batch_size=64, num_workers=0,
                              mean=MNIST_STATS["data_mean"], std=MNIST_STATS["data_std"])
    return dm.normalize(dm.val_set.x[:1000]), dm


def frozen(run_dir, **kwargs) -> FrozenVQTokenizer:
    return FrozenVQTokenizer(str(run_dir / "checkpoints" / "last.ckpt"), **{**MNIST_STATS, **kwargs})


# -- the VQ tokenizer -----------------------------------------------------------------------------------


def test_vq_tokenizer_learns_and_uses_its_codebook_on_mnist(mnist_run, mnist_images):
    history = json.loads((mnist_run / "loss_history.json").read_text())["train/loss"]
    first, last = history[0][1], history[-1][1]
    assert last < 0.5 * first, history
    assert (mnist_run / "reconstructions.png").is_file()  # the grid callback works as for other AEs
    x, _ = mnist_images
    codes = frozen(mnist_run)(x)
    hist = torch.bincount(codes.flatten(), minlength=128).float()
    usage = float((hist > 0).float().mean())
    p = hist / hist.sum()
    perplexity = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
    assert usage > 0.5 and perplexity > 20, (usage, perplexity)


@pytest.mark.parametrize("shape,patch,grid", [(MNIST, 4, (7, 7)), ((3, 32, 32), 4, (8, 8)), (MNIST, 7, (4, 4)),
                                              ((3, 32, 32), 8, (4, 4)), ((3, 48, 32), 16, (3, 2))])
def test_codes_lie_on_the_vit_patch_grid(shape, patch, grid):
    torch.manual_seed(0)
    tok = VQTokenizer(shape, patch_size=patch, hidden_dim=16, num_codes=32, code_dim=8)
    x = torch.randn(3, *shape)
    codes = tok.tokenize(x)
    assert codes.shape == (3, *grid) and codes.dtype == torch.long and int(codes.max()) < 32
    assert tok.decode_codes(codes).shape == x.shape and tok({"x": x})["recon"].shape == x.shape
    assert grid == (shape[1] // patch, shape[2] // patch)
    assert strides(12) == [2, 2, 3] and strides(7) == [7]


def test_trained_tokenizer_codes_match_the_cae_grid_and_renormalise(mnist_run, mnist_images):
    x, dm = mnist_images
    tok = frozen(mnist_run)
    codes = tok(x[:8])
    cae = tiny_cae(shape=MNIST, depth=1, target="tokens", tokenizer=tok)
    assert codes.shape == (8, *cae.grid) == (8, 7, 7) and tok.vocab_size == 128
    # the same images in [0, 1] (another data config) give the same codes once re-normalised
    raw = x[:8] * 0.3081 + 0.1307
    other = frozen(mnist_run, data_mean=[0.0], data_std=[1.0])
    assert (other(raw) == codes).float().mean() > 0.99
    assert not any(p.requires_grad for p in tok.parameters())


def test_cae_on_trained_tokenizer_predicts_codes_and_draws_reconstructions(mnist_run, mnist_images):
    x, _ = mnist_images
    tok = frozen(mnist_run)
    mask = BlockMasking(0.5, min_num_patches=4)(4, 49, torch.device("cpu"), torch.Generator().manual_seed(0)).mask
    cae = tiny_cae(FixedMasking(mask), MNIST, depth=1, target="tokens", tokenizer=tok)
    out = cae({"x": x[:4]})
    m = out["masked_ids"].shape[1]
    assert out["logits"].shape == (4, m, 128)
    assert torch.equal(out["token_target"], torch.gather(tok(x[:4]).flatten(1), 1, out["masked_ids"]))
    recon = cae.reconstruct({"x": x[:4]})
    visible = cae.patchify(x[:4])[out["mask"] == 0]
    assert recon.shape == x[:4].shape and torch.allclose(cae.patchify(recon)[out["mask"] == 0], visible)
    cae.train()
    assert not tok.training and not tok.model.training  # the tokenizer stays in eval mode


def test_tokenizer_grid_mismatch_names_both_grids(mnist_run):
    with pytest.raises(ValueError, match=r"code grid \(7, 7\) does not match the ViT patch grid \(4, 4\)"):
        tiny_cae(shape=MNIST, patch_size=7, depth=1, target="tokens", tokenizer=frozen(mnist_run))
    with pytest.raises(ValueError, match="trained on 1-channel images, the data has 3"):
        frozen(mnist_run, data_mean=[0.5] * 3, data_std=[0.25] * 3)


def test_missing_tokenizer_checkpoint_is_an_error_outside_smoke_runs(tmp_path, caplog):
    with pytest.raises(ValueError, match="tokenizer.checkpoint is null"):
        FrozenVQTokenizer(None)
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint not found"):
        FrozenVQTokenizer(str(tmp_path / "absent.ckpt"))
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a model=vq_tokenizer checkpoint"):
        FrozenVQTokenizer(str(tmp_path / "other.ckpt"))
    # the recipe: an error as shipped, a random tokenizer with a warning only under debug=smoke
    cfg = compose_cfg(["experiment=cae_tokens_cifar10"], tmp_path)
    with pytest.raises(ValueError, match="tokenizer.checkpoint is null"):
        build(cfg.model, input_shape=(3, 32, 32))
    cfg = compose_cfg(["experiment=cae_tokens_cifar10", "debug=smoke"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="aeforge"):
        model = build(cfg.model, input_shape=(3, 32, 32))
    assert "RANDOMLY INITIALISED" in caplog.text
    assert model.tokenizer(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8) and model.decoder_pred.out_features == 512


# -- the DALL-E tokenizer (OpenAI's dall_e package; a small randomly initialised encoder stands in for the
# released weights, which are not available offline) ------------------------------------------------------


@pytest.fixture(scope="module")
def dalle_files(tmp_path_factory):
    import dall_e

    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    d = tmp_path_factory.mktemp("dalle")
    torch.save(enc, d / "encoder.pkl")  # as OpenAI ships it: the pickled module
    torch.save(enc.state_dict(), d / "state.pt")
    return enc, d


def test_dalle_tokenizer_codes_a_half_size_view_on_the_patch_grid(dalle_files):
    enc, d = dalle_files
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randn(2, 3, 64, 64)
    for path in ("encoder.pkl", "state.pt"):
        tok = FrozenDalleTokenizer(str(d / path), data_mean=mean, data_std=std, patch_size=16,
                                   trust_pickle=path == "encoder.pkl")
        codes = tok(x)
        assert tok.vocab_size == 512 and codes.shape == (2, 4, 4) and codes.dtype == torch.long
        # by hand: back to [0, 1] pixels, the 32 px view, map_pixels, arg-max of the encoder's logits
        pixels = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
        view = F.interpolate(pixels, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        with torch.no_grad():
            assert torch.equal(codes, enc(0.8 * view + 0.1).argmax(1)), path
        assert not any(p.requires_grad for p in tok.parameters())
    cae = tiny_cae(shape=(3, 64, 64), patch_size=16, depth=1, target="tokens", tokenizer=tok)
    out = cae({"x": x})
    assert out["logits"].shape[-1] == 512 and out["token_target"].max() < 512


def test_dalle_pickle_needs_trust_pickle(dalle_files, caplog):
    """encoder.pkl is a pickled module (reading it can run code): refused unless tokenizer.trust_pickle=true."""
    _, d = dalle_files
    with pytest.raises(ValueError, match=r"encoder.pkl is a pickled module.*tokenizer.trust_pickle=true"):
        FrozenDalleTokenizer(str(d / "encoder.pkl"))
    with caplog.at_level(logging.WARNING, logger="aeforge"):
        assert FrozenDalleTokenizer(str(d / "encoder.pkl"), trust_pickle=True).vocab_size == 512
    assert "trust_pickle=true" in caplog.text
    assert compose_cfg(["experiment=cae_tokens_vit_base_imagenet"]).tokenizer.trust_pickle is False


def test_dalle_tokenizer_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match="tokenizer.path is null"):
        FrozenDalleTokenizer(None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        FrozenDalleTokenizer(str(tmp_path / "absent.pkl"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="without DALL-E encoder keys"):
        FrozenDalleTokenizer(str(tmp_path / "other.pt"))
    cfg = compose_cfg(["experiment=cae_tokens_vit_base_imagenet"], tmp_path)
    assert cfg.tokenizer._target_.endswith("FrozenDalleTokenizer") and cfg.model.target == "tokens"
    with pytest.raises(ValueError, match="tokenizer.path is null"):
        build(cfg.tokenizer)
    cfg = compose_cfg(["experiment=cae_tokens_vit_base_imagenet", "debug=smoke"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="aeforge"):
        tok = build(cfg.tokenizer)
    assert "RANDOMLY INITIALISED" in caplog.text and tok.vocab_size == 8192
