"""Video data (aeforge/data/videos.py, video_files.py), the video_recon evaluator and the proof baselines:
clip sampling, the batch contract, joint image batches, PyAV decoding of the staged originals, clear errors
for missing/corrupt files, the compression factor from real latent shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from aeforge.data.sources import DataFileError
from aeforge.data.videos import ClipsDataModule, clip_windows
from aeforge.eval import Evaluation
from aeforge.eval.video_recon import VideoReconstruction, compression_factor, peak_memory_mb
from tests.conftest import DATA_DIR, load_script, needs_data

ORIG = DATA_DIR / "videos" / "orig"


@pytest.fixture
def clips_npz(tmp_path):
    """Three 12x12 videos whose pixels encode (video, frame): value = 20 * frame + video (+ a gradient)."""
    arrays = {}
    ramp = np.arange(12, dtype=np.uint8)[None, :, None, None]
    for v, name in enumerate(["a", "b", "c"]):
        t = np.arange(12 if v < 2 else 9)[:, None, None, None]
        arrays[name] = (np.zeros((len(t), 12, 12, 3)) + 20 * (t % 12) + v + ramp).astype(np.uint8)
        arrays[f"{name}_fps"] = np.float64(10.0 * (v + 1))
    path = tmp_path / "clips.npz"
    np.savez(path, **arrays)
    return path


def _dm(path, **kw):
    args = {"path": str(path), "frames": 3, "image_size": 8, "batch_size": 2, "val_video": "c", "hop": 2}
    return ClipsDataModule(**{**args, **kw})


def frame_ids(x: torch.Tensor) -> torch.Tensor:
    """The frame index each frame of uint8 clips (B, C, T, H, W) encodes (see clips_npz)."""
    return (x[:, 0, :, 0, 0].long() // 20)


def test_clip_windows_stride_fps_and_held_out_clip(clips_npz):
    assert clip_windows([12, 5], 3, [2, 1], 4) == [(0, 0, 2), (0, 4, 2), (1, 0, 1)]
    dm = _dm(clips_npz, stride=2)
    batch = dm.train_set.__getitems__(list(range(len(dm.train_set))))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape[1:] == (3, 3, 12, 12)
    assert (frame_ids(batch["x"]).diff(dim=1) == 2).all()  # 3 frames, 2 apart
    assert set(batch["x"][:, 0, 0, 0, 0].tolist()) <= {20 * s + v for s in range(12) for v in (0, 1)}  # no "c"
    assert dm.input_shape == (3, 3, 8, 8) and dm.modality == "video"
    # fps: each video at 10 frames/s -> video a (10 fps) stride 1, video b (20 fps) stride 2
    dm = _dm(clips_npz, fps=10.0)
    assert {v: stride for v, _, stride in dm.train_set.windows} == {0: 1, 1: 2}
    # the held-out clip: always the same frames of the held-out video, centre-cropped on the device
    val = [next(iter(dm.eval_dataloader("val", 4)))["x"] for _ in range(2)]
    assert torch.equal(val[0], val[1]) and val[0].shape == (1, 3, 3, 12, 12)
    assert frame_ids(val[0]).tolist() == [[0, 3, 6]]  # c is at 30 fps -> stride 3
    x = dm.normalize(val[0])
    assert x.shape == (1, 3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(dm.denormalize(x), val[0][..., 2:10, 2:10].float() / 255)


def test_random_crop_and_flip_only_when_training(clips_npz):
    dm = _dm(clips_npz, hflip=True)
    x = dm.train_set.__getitems__([0, 1])["x"]
    torch.manual_seed(0)
    crops = {tuple(dm.normalize(x, augment=True)[0, 0, 0, 0].tolist()) for _ in range(20)}
    assert len(crops) > 1  # offsets and flips vary
    centre = dm.normalize(x)[0, 0, 0, 0]
    assert torch.equal(centre, dm.normalize(x)[0, 0, 0, 0])


def test_joint_image_batches_are_reproducible(clips_npz):
    dm = _dm(clips_npz, images="frames", image_ratio=0.5, image_frames=2)
    batches = [list(dm.train_dataloader()) for _ in range(2)]
    kinds = [bool(b["is_image"].all()) for b in batches[0]]
    assert any(kinds) and not all(kinds)
    for b in batches[0]:
        assert b["is_image"].all() or not b["is_image"].any()  # a batch is all stills or all clips
        if b["is_image"].all():
            assert b["x"].shape[2] == 2  # image_frames independent stills
            assert set((b["x"][:, 0, :, 0, 0] % 20).flatten().tolist()) <= {0, 1}  # frames of a and b, not c
    fresh = _dm(clips_npz, images="frames", image_ratio=0.5, image_frames=2)
    again = list(fresh.train_dataloader())
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches[0], again))  # a pure function of (seed, order)
    assert not next(iter(dm.eval_dataloader("train", 64)))["is_image"].any()  # evaluators read clips only
    with pytest.raises(ValueError, match=r"data\.image_ratio=0\.5 .* data\.images is null"):
        _dm(clips_npz, image_ratio=0.5)


def test_bad_configs_name_the_key(clips_npz):
    with pytest.raises(ValueError, match=r"data\.crop='middle'.*\['random', 'center'\]"):
        _dm(clips_npz, crop="middle")
    with pytest.raises(DataFileError, match=r"no videos \['zz'\]; it has \['a', 'b', 'c'\]"):
        _dm(clips_npz, val_video="zz")
    with pytest.raises(ValueError, match=r"data\.fps=10\.0 and data\.stride=2"):
        _dm(clips_npz, fps=10.0, stride=2)
    with pytest.raises(ValueError, match=r"held-out clip must be unseen"):
        _dm(clips_npz, train_videos=["a", "c"])
    with pytest.raises(DataFileError, match=r"c has 9 frames, too few"):
        _dm(clips_npz, val_count=4)
    with pytest.raises(ValueError, match=r"data\.val_start=-1 must be >= 0"):
        _dm(clips_npz, val_start=-1)


@needs_data("videos", "videos_64px.npz")
def test_staged_clips_config_gives_the_batch_contract():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["data=video_clips", "data.frames=5", "data.resize=16", "data.image_size=16"])
    dm = instantiate(cfg.data, seed=0)
    assert dm.val_clip == "cockatoo[0:5:1]" and "cockatoo" not in dm.train_videos
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 3, 5, 16, 16) and batch["x"].dtype == torch.uint8


# -- video files (PyAV) ---------------------------------------------------------------------------------------
@needs_data("videos", "orig", "bikes.mp4")
def test_pyav_decodes_the_staged_originals_at_the_right_frames():
    from aeforge.data.video_files import decode_clip

    ref = torch.from_numpy(np.load(DATA_DIR / "videos" / "videos_64px.npz")["bikes"]).float()
    clip = decode_clip(ORIG / "bikes.mp4", "bikes", frames=3, stride=2, fps=None, position=0.0, resize=64)
    off = (clip.shape[-1] - 64) // 2  # the npz frames are the centre square
    clip = clip[..., off : off + 64].float().permute(1, 2, 3, 0)

    def psnr(a, b):
        return 10 * torch.log10(255**2 / (a - b).pow(2).mean())

    for k in range(3):  # frame 2k of the file, not its neighbour
        assert psnr(clip[k], ref[2 * k]) > 27 and psnr(clip[k], ref[2 * k]) > psnr(clip[k], ref[2 * k + 1]) + 3
    gif = decode_clip(ORIG / "newtonscradle.gif", "gif", frames=4, stride=1, fps=8.0, position=0.0, resize=16)
    assert gif.shape[:2] == (3, 4) and min(gif.shape[-2:]) == 16


@needs_data("videos", "orig", "realshort.mp4")
def test_truncated_missing_and_short_videos_name_the_file(tmp_path):
    from aeforge.data.video_files import VideoFileDataModule, decode_clip

    broken = tmp_path / "broken.mp4"
    data = (ORIG / "realshort.mp4").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: truncated = undecodable
    with pytest.raises(DataFileError, match=r"broken\.mp4: the video does not decode"):
        decode_clip(broken, str(broken), 3, 1, None, 0.0, 16)
    with pytest.raises(DataFileError, match=r"video file not found: .*absent\.mp4"):
        decode_clip(tmp_path / "absent.mp4", "absent", 3, 1, None, 0.0, 16)
    with pytest.raises(DataFileError, match=r"realshort: too short .* data\.pad_short=true"):
        decode_clip(ORIG / "realshort.mp4", "realshort", 20, 1, 4.0, 0.0, 16)
    assert decode_clip(ORIG / "realshort.mp4", "r", 20, 1, 4.0, 0.0, 16, pad_short=True).shape[1] == 20
    (tmp_path / "train.csv").write_text("path,caption\nbroken.mp4,a clip\nabsent.mp4,gone\n")
    with pytest.raises(DataFileError, match=r"data not found: .*absent\.mp4"):
        VideoFileDataModule(path=str(tmp_path), captions=str(tmp_path / "train.csv"), frames=3, image_size=16,
                            batch_size=1, val_fraction=0.5)
    (tmp_path / "train.csv").write_text("path,caption\nbroken.mp4,a clip\nok.mp4,fine\n")
    shutil.copy(ORIG / "realshort.mp4", tmp_path / "ok.mp4")
    dm = VideoFileDataModule(path=str(tmp_path), captions=str(tmp_path / "train.csv"), frames=3, image_size=16,
                             batch_size=2, val_fraction=0.5)
    broken_set = dm.train_set if dm.train_set.items == ["broken.mp4"] else dm.val_set
    with pytest.raises(DataFileError, match=r"broken\.mp4: the video does not decode"):
        broken_set.__getitems__([0])


@needs_data("videos", "orig", "carphone_pristine.mp4")
def test_webvid_folder_with_captions_and_hf_dataset(tmp_path):
    from aeforge.data.video_files import VideoFileDataModule

    for name in ("realshort.mp4", "carphone_pristine.mp4"):
        shutil.copy(ORIG / name, tmp_path / name)
    (tmp_path / "train.csv").write_text("videoid,name\nrealshort,a man talks\n")
    (tmp_path / "val.csv").write_text("videoid,name\ncarphone_pristine,a man in a car\n")
    dm = VideoFileDataModule(path=str(tmp_path), captions=str(tmp_path / "train.csv"), frames=4, stride=2,
                             image_size=16, batch_size=1, val_captions=str(tmp_path / "val.csv"),
                             path_format="{videoid}.mp4", caption_key="name", crop="random")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (1, 3, 4, 16, 16) and batch["caption"] == ["a man talks"]
    assert not batch["is_image"].any()
    val = [next(iter(dm.eval_dataloader("val", 1))) for _ in range(2)]
    assert val[0]["caption"] == ["a man in a car"] and torch.equal(val[0]["x"], val[1]["x"])  # a fixed clip
    # the same files as a Hugging Face dataset of bytes + captions
    import datasets

    ds = datasets.Dataset.from_dict({"video": [(tmp_path / "realshort.mp4").read_bytes()] * 2,
                                     "caption": ["one", "two"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    hf = VideoFileDataModule(path=str(tmp_path / "hf"), source="hf", frames=2, image_size=16, batch_size=1,
                             val_fraction=0.5)
    b = hf.val_set.__getitems__([0])
    assert b["x"].shape == (1, 3, 2, 16, 16) and b["caption"][0] in ("one", "two")
    sub = VideoFileDataModule(path=str(tmp_path), files=["realshort.mp4", "carphone_pristine.mp4"], frames=2,
                              image_size=16, batch_size=1, val_fraction=0.5, clips_per_video=3)
    assert len(sub.train_set) == 3 and len(sub.val_set) == 1  # the folder's other files (hf/) left out
    with pytest.raises(DataFileError, match=r"data\.files \['nope\.mp4'\] are not among the videos"):
        VideoFileDataModule(path=str(tmp_path), files=["nope.mp4"], frames=2, image_size=16, batch_size=1,
                            val_fraction=0.5)
    with pytest.raises(ValueError, match=r"data\.val_captions .* or data\.val_fraction"):
        VideoFileDataModule(path=str(tmp_path), frames=2, image_size=16, batch_size=1)


# -- the evaluator --------------------------------------------------------------------------------------------
class TinyVideoAE(nn.Module):
    """Latents of known shapes: a (4, T/2, H/4, W/4) grid plus a reference frame (3, H, W); reconstructs by
    repeating the reference frame with a learnable-free offset."""

    modality = "video"

    def latents(self, batch):
        x = batch["x"]
        b, c, t, h, w = x.shape
        return {"z": torch.zeros(b, 4, t // 2, h // 4, w // 4), "z_ref": x[:, :, 0]}

    def reconstruct(self, batch):
        x = batch["x"]
        return x[:, :, :1].expand_as(x).clone()


def test_video_recon_metrics_cf_and_gif(clips_npz, tmp_path):
    dm = _dm(clips_npz, frames=4, image_size=12, hop=4)
    # squeeze: the smallest LPIPS network (random backbone here, as offline), built in a fraction of alex's time
    ev = VideoReconstruction(str(tmp_path), lpips_net="squeeze", reference_keys=["z_ref"], gif_clips=2, fps=5.0,
                             warmup=0)
    m = Evaluation({"video_recon": ev}, batch_size=1)(TinyVideoAE(), dm, torch.device("cpu"))
    # CF = C·T·H·W / latent values per clip: 3·4·12·12 / (4·2·3·3 + 3·12·12)
    assert m["video_recon/cf"] == pytest.approx(3 * 4 * 144 / (72 + 432))
    assert m["video_recon/cf_without_reference"] == pytest.approx(3 * 4 * 144 / 72)
    assert m["video_recon/latent_values_per_clip"] == 504
    x = dm.normalize(next(iter(dm.eval_dataloader("val", 1)))["x"])
    a, b = dm.denormalize(x[:, :, :1].expand_as(x)), dm.denormalize(x)
    assert m["video_recon/psnr"] == pytest.approx(float(10 * torch.log10(1 / (a - b).pow(2).mean())), rel=1e-4)
    assert 0 < m["video_recon/ssim"] < 1 and m["video_recon/lpips_random_net"] > 0  # random LPIPS net, labelled
    assert m["video_recon/encode_frames_per_s"] > 0 and m["video_recon/decode_timed_by_difference"] == 1
    from PIL import Image

    with Image.open(tmp_path / "video_recon.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (2 * (2 * 12 + 2), 2 * 12)
    curves = json.loads((tmp_path / "video_recon.json").read_text())["per_frame"]
    assert curves["psnr"][0] == 100.0 and len(curves["ssim"]) == 4  # the copied frame is exact
    assert compression_factor((3, 4, 12, 12), {"z": torch.zeros(2, 1, 4, 3, 3)}) == 48.0
    with pytest.raises(ValueError, match=r"reference_keys \['ref'\] are not latents .* \['z', 'z_ref'\]"):
        VideoReconstruction(str(tmp_path), lpips=False, reference_keys=["ref"])(_ctx(dm))
    assert VideoReconstruction(str(tmp_path))(_ctx(dm, nn.Identity())) == {"skipped": 1.0}


def test_cpu_peak_memory_counts_live_tensors():
    def two_live_then_one():  # 2 x 4 MB alive at once, then one freed before a third: peak 8 MB
        a, b = torch.ones(2**20), torch.ones(2**20)
        del a
        return b + 1

    assert peak_memory_mb(two_live_then_one, torch.device("cpu")) == pytest.approx(8.0, abs=0.5)


def _ctx(dm, model=None):
    from aeforge.eval import EvalContext

    return EvalContext(model or TinyVideoAE(), dm, torch.device("cpu"), 1, None)


def test_baselines_frame_repeat_and_per_frame_ae_at_the_latent_size(clips_npz):
    vb = load_script("video_baselines")
    assert vb.latent_layout(32, 64) == (8, 1) and vb.latent_layout(32, 32) == (4, 2)
    assert vb.latent_layout(12, 7) == (1, 0)  # no grid divides 7 values: a dense latent
    dm = _dm(clips_npz, frames=4, image_size=8, hop=4)
    batch = {"x": dm.normalize(next(iter(dm.eval_dataloader("val", 1)))["x"])}
    trained, _ = vb.train_image_ae(dm, 8, steps=1, seed=0, batch_size=4, width=8)
    for ae, per_frame in ((trained, 8), (vb.PerFrameAE(8, 7, width=8), 7)):  # latents 2x2x2 and 7x1x1 a frame
        assert sum(v[0].numel() for v in ae.latents(batch).values()) == 4 * per_frame
        assert ae.reconstruct(batch).shape == batch["x"].shape
    rep = vb.FrameRepeat().reconstruct(batch)
    assert torch.equal(rep[:, :, 3], batch["x"][:, :, 0])
