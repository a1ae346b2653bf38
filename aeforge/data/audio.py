"""Audio as spectrogram "images": a Kaldi-compatible log-mel filterbank front end written in torch, and the
Free Spoken Digit Dataset (FSDD) DataModule built on it.

Clips travel as float waveforms padded with NaN to a fixed length; `normalize` runs the front end on the
accelerator (waveform augmentations -> fbank -> pad/crop to `target_length` frames with the batch minimum
-> (x - mean) / (2 std)), so a batch leaves it as (B, 1, time, mel) and every image model applies.

The front end follows `torchaudio.compliance.kaldi.fbank` as Bird-MAE calls it (htk_compat=True,
window_type='hanning', use_energy=False, dither=0, frame 25 ms, shift 10 ms, snip_edges, remove DC offset,
pre-emphasis 0.97, power spectrum, FFT size rounded up to a power of two, Kaldi mel scale
1127 ln(1 + f/700), low_freq 20 Hz, high_freq = Nyquist, log with a float-eps floor). It is re-derived from
that definition (no torchaudio dependency).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from aeforge.data.images import DataFileError, ImageDataModule, load_npz


def mel_scale(freq):
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def kaldi_mel_banks(
    num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0, high_freq: float = 0.0
) -> torch.Tensor:
    """Triangular filters on the Kaldi mel scale: (num_bins, n_fft // 2 + 1); the Nyquist column is zero."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel bank needs 0 <= low_freq < high_freq <= Nyquist, got {low_freq}, {high_freq}")
    n_bins_fft = n_fft // 2
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = mel_scale(sample_rate / n_fft * torch.arange(n_bins_fft, dtype=torch.float64)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).float()


def num_frames(num_samples: torch.Tensor | int, win: int, shift: int):
    """Frames Kaldi cuts from a clip with snip_edges=True (0 if the clip is shorter than one window)."""
    if isinstance(num_samples, int):
        return 0 if num_samples < win else 1 + (num_samples - win) // shift
    return torch.where(num_samples < win, torch.zeros_like(num_samples), 1 + (num_samples - win) // shift)


def kaldi_fbank(
    wave: torch.Tensor,
    sample_rate: float,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    window: str = "hanning",
) -> torch.Tensor:
    """Log-mel filterbank of a batch of equal-length waveforms (B, S) -> (B, frames, num_mel_bins)."""
    if wave.ndim == 1:
        wave = wave.unsqueeze(0)
    wave = wave.float()
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n = num_frames(wave.shape[1], win, shift)
    if n == 0:
        raise ValueError(f"waveform of {wave.shape[1]} samples is shorter than one {win}-sample frame")
    frames = wave.unfold(1, win, shift)[:, :n]  # (B, n, win)
    frames = frames - frames.mean(-1, keepdim=True)  # remove DC offset per frame
    if preemphasis:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[-1] := x[0], as Kaldi
        frames = frames - preemphasis * prev
    if window == "hanning":
        w = torch.hann_window(win, periodic=False, dtype=frames.dtype, device=frames.device)
    elif window == "povey":
        w = torch.hann_window(win, periodic=False, dtype=frames.dtype, device=frames.device).pow(0.85)
    elif window == "rectangular":
        w = torch.ones(win, dtype=frames.dtype, device=frames.device)
    else:
        raise ValueError(f"window must be hanning, povey or rectangular, got {window!r}")
    frames = frames * w
    n_fft = 1 << math.ceil(math.log2(win))
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (B, n, n_fft/2 + 1)
    banks = kaldi_mel_banks(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).to(power)
    mel = power @ banks.T
    return mel.clamp_min(torch.finfo(mel.dtype).eps).log()


def pad_or_crop(spec: torch.Tensor, valid: torch.Tensor, target_length: int) -> torch.Tensor:
    """(B, T, F) with `valid` frames per clip -> (B, target_length, F); frames past a clip's end are filled
    with the minimum of the batch's valid values (Bird-MAE pads with the batch minimum, not zero)."""
    b, t, f = spec.shape
    if t < target_length:
        spec = torch.nn.functional.pad(spec, (0, 0, 0, target_length - t))
    spec = spec[:, :target_length]
    keep = torch.arange(target_length, device=spec.device).unsqueeze(0) < valid.unsqueeze(1)  # (B, T)
    fill = spec[keep].min() if keep.any() else spec.new_zeros(())
    return torch.where(keep.unsqueeze(-1), spec, fill)


class WaveformDataset(torch.utils.data.Dataset):
    """NaN-padded float waveforms (N, S) + integer label arrays (y, speaker, ...); batched indexing."""

    def __init__(self, wave: torch.Tensor, labels: dict[str, torch.Tensor]):
        self.wave, self.labels = wave, labels

    def __len__(self) -> int:
        return len(self.wave)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        return {"x": self.wave[i], **{k: v[i] for k, v in self.labels.items()}}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class SpectrogramDataModule(ImageDataModule):
    """Waveforms in, normalised log-mel spectrograms (B, 1, target_length, num_mel_bins) out.

    augment (training only): cyclic rolling start, volume scaling by 0.5 + Beta(10, 10), and waveform
    mixup (with probability `mixup_p` a clip gets 1..`mixup_max` other clips of the batch added at an SNR
    drawn uniformly from `mixup_snr_db`; labels are left unchanged: self-supervised use only).
    mean/std: dataset constants for (x - mean) / (2 std); null computes them on the training clips."""

    gpu_augment = False

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        sample_rate: int = 8000,
        num_mel_bins: int = 64,
        target_length: int = 96,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        window: str = "hanning",
        mean: float | None = None,
        std: float | None = None,
        cyclic_roll: bool = True,
        gain: bool = True,
        mixup_p: float = 0.0,
        mixup_max: int = 3,
        mixup_snr_db: list[float] | None = None,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, mean=[0.0], std=[1.0], seed=seed)
        self.sample_rate, self.num_mel_bins, self.target_length = sample_rate, num_mel_bins, target_length
        self.frame_length_ms, self.frame_shift_ms, self.window = frame_length_ms, frame_shift_ms, window
        self.win = int(sample_rate * frame_length_ms * 0.001)
        self.shift = int(sample_rate * frame_shift_ms * 0.001)
        self.max_samples = self.win + (target_length - 1) * self.shift  # samples that fill target_length
        self.spec_mean, self.spec_std = mean, std
        self.cyclic_roll, self.gain = cyclic_roll, gain
        self.mixup_p, self.mixup_max = mixup_p, mixup_max
        self.mixup_snr_db = tuple(mixup_snr_db or (5.0, 25.0))
        self.input_shape = (1, target_length, num_mel_bins)

    # -- front end -------------------------------------------------------------------------------------
    def _augment(self, wave: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        b, s = wave.shape
        dev = wave.device
        if self.cyclic_roll:  # circular shift inside each clip's own length
            offset = (torch.rand(b, device=dev) * length).long()
            pos = torch.arange(s, device=dev).unsqueeze(0)
            src = (pos + offset.unsqueeze(1)) % length.clamp_min(1).unsqueeze(1)
            wave = torch.where(pos < length.unsqueeze(1), torch.gather(wave, 1, src), wave)
        if self.mixup_p > 0 and b > 1:
            power = wave.pow(2).sum(1) / length.clamp_min(1)
            out = wave.clone()
            chosen = torch.rand(b, device=dev) < self.mixup_p
            n_mix = torch.randint(1, self.mixup_max + 1, (b,), device=dev)
            for k in range(self.mixup_max):
                other = (torch.arange(b, device=dev) + torch.randint(1, b, (b,), device=dev)) % b
                use = chosen & (n_mix > k)
                snr = torch.empty(b, device=dev).uniform_(*self.mixup_snr_db)
                scale = (power / (power[other] * 10 ** (snr / 10)).clamp_min(1e-12)).sqrt()
                out = out + torch.where(use, scale, torch.zeros_like(scale)).unsqueeze(1) * wave[other]
            wave = out
        if self.gain:
            g = 0.5 + torch.distributions.Beta(10.0, 10.0).sample((b,)).to(dev)
            wave = wave * g.unsqueeze(1)
        return wave

    def _spectrogram(self, x: torch.Tensor, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if x.ndim == 3:
            x = x.squeeze(1)
        length = (~torch.isnan(x)).sum(1)
        x = torch.nan_to_num(x, nan=0.0)
        x = x - x.sum(1, keepdim=True) / length.clamp_min(1).unsqueeze(1)  # per-clip mean
        x = torch.where(torch.arange(x.shape[1], device=x.device) < length.unsqueeze(1), x, 0.0)
        if augment:
            x = self._augment(x, length)
        if x.shape[1] < self.win:
            x = torch.nn.functional.pad(x, (0, self.win - x.shape[1]))
        spec = kaldi_fbank(
            x,
            self.sample_rate,
            self.num_mel_bins,
            self.frame_length_ms,
            self.frame_shift_ms,
            window=self.window,
        )
        return spec, num_frames(length, self.win, self.shift)

    def fbank(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """NaN-padded waveforms (B, S) -> un-normalised log-mel (B, 1, target_length, mel)."""
        spec, valid = self._spectrogram(x, augment)
        return pad_or_crop(spec, valid, self.target_length).unsqueeze(1)

    def normalize(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        if x.ndim == 4 and x.shape[1:] == self.input_shape:  # already a spectrogram
            return x
        return (self.fbank(x, augment) - self.spec_mean) / (2 * self.spec_std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised spectrogram -> [0, 1] for pictures and PSNR (the range -2.5..2.5 mapped linearly)."""
        return ((x + 2.5) / 5.0).clamp(0, 1)

    def _fit_stats(self, wave: torch.Tensor) -> None:
        """Mean and std of the log-mel values of the valid (unpadded) frames of `wave`."""
        if self.spec_mean is not None and self.spec_std is not None:
            return
        total, total_sq, count = 0.0, 0.0, 0
        for chunk in wave.split(512):
            spec, valid = self._spectrogram(chunk, augment=False)
            keep = torch.arange(spec.shape[1]).unsqueeze(0) < valid.unsqueeze(1)
            v = spec[keep].double()
            total, total_sq, count = (
                total + v.sum().item(),
                total_sq + v.pow(2).sum().item(),
                count + v.numel(),
            )
        m = total / count
        sd = math.sqrt(max(total_sq / count - m * m, 1e-12))
        self.spec_mean = float(m) if self.spec_mean is None else self.spec_mean
        self.spec_std = float(sd) if self.spec_std is None else self.spec_std

    def describe(self) -> str:
        return (
            f"{type(self).__name__}(log-mel {self.input_shape} @ {self.sample_rate} Hz, {self.num_classes} "
            f"classes, mean {self.spec_mean:.2f}, std {self.spec_std:.2f})"
        )


class FSDDDataModule(SpectrogramDataModule):
    """Free Spoken Digit Dataset from one .npz (audio, offsets, lengths, y, speaker, index, sample_rate):
    3000 clips, 8 kHz, 10 digits x 6 speakers x 50 recordings. Labels: `y` = digit, `speaker` = speaker id.

    split: "recording" (the dataset's official split: recordings 0-4 of each speaker/digit are test),
    or "speaker" (`val_speakers` held out entirely: an identity-exclusive split)."""

    def __init__(
        self,
        path: str,
        split: str = "recording",
        val_speakers: list[int] | None = None,
        max_train: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if split not in ("recording", "speaker"):
            raise ValueError(f"data.split must be 'recording' or 'speaker', got {split!r}")
        self.path, self.split = path, split
        a = load_npz(path, ("audio", "offsets", "lengths", "y", "speaker", "index"))
        sr = int(a["sample_rate"]) if "sample_rate" in a else self.sample_rate
        if sr != self.sample_rate:
            raise DataFileError(f"{path} is sampled at {sr} Hz but data.sample_rate={self.sample_rate}")
        n = len(a["offsets"])
        lengths = np.minimum(a["lengths"], self.max_samples)
        wave = torch.full((n, self.max_samples), float("nan"))
        audio = torch.from_numpy(a["audio"].astype(np.float32) / 32768.0)
        for i, (o, ln) in enumerate(zip(a["offsets"], lengths)):
            wave[i, :ln] = audio[o : o + ln]
        y = torch.from_numpy(a["y"].astype(np.int64))
        spk = torch.from_numpy(a["speaker"].astype(np.int64))
        if split == "recording":
            val = torch.from_numpy(a["index"] < 5)
        else:
            held = torch.tensor(val_speakers if val_speakers is not None else [int(spk.max())])
            val = torch.isin(spk, held)
        tr = (~val).nonzero().squeeze(1)
        if max_train is not None:
            tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(1234))[:max_train]]
        va = val.nonzero().squeeze(1)
        self.train_set = WaveformDataset(wave[tr], {"y": y[tr], "speaker": spk[tr]})
        self.val_set = WaveformDataset(wave[va], {"y": y[va], "speaker": spk[va]})
        self.num_classes = int(y.max()) + 1
        self.num_speakers = int(spk.max()) + 1
        self.speaker_names = [str(s) for s in a.get("speaker_names", [])]
        self._fit_stats(wave[tr])
