"""SAE metrics (card §7.5): reconstruction on held-out activations and next-token loss with the SAE
spliced into the language model.

Per site: `l0` (mean active latents per token), `mse` (per-element mean), `fvu` = Σ‖x − x̂‖² / Σ‖x − x̄‖²
(explained variance `ev` = 1 − fvu), `cosine` (mean cos(x, x̂)), `dead_frac` (latents that never fire on
the eval tokens; the window is `eval_tokens`), `dense_frac` (latents firing on more than `dense_threshold`
of the tokens), the feature-density histogram (`feature_density.png`, log10 firing frequency), and with a
language model that has an LM head: `ce_clean`, `ce_spliced`, `ce_zero` (hook zero-ablated), `ce_delta` =
spliced − clean, `ce_recovered` = (ce_zero − ce_spliced) / (ce_zero − ce_clean), `kl` = KL(clean ‖ spliced)
per token. Without such a model (none set, it fails to load, or it has no head) these are
missing and `skipped/ce_recovered: 1` with a warning says so (`aeforge/eval/skips.py`). top-AFA adds
`kstar` (mean k*), `eps_lbo` (median per-token εLBO, card 2.3) and the ZF plot
(`zf_plot.png`: per token ‖z‖ against ‖f̃‖, f̃ = feature magnitudes f_i‖d_i‖ with ‖b_dec‖ appended, next
to the quasi-orthogonality bands ‖z‖/√(1 ± ε(h−1)) for ε(h−1) ∈ {0.25, 0.5, 1}; card 2.3). Reconstructions
are compared in the data's space (after `data.normalize`), where the SAE was trained.

Only the sites the bank holds are evaluated (`SAEBank.local_sites`; all of them except in site-parallel
training, where each rank evaluates its own and `report_site_metrics` merges them on rank 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aeforge.data.lm import hooked, next_token_ce
from aeforge.eval.skips import skipped

ZF_POINTS = 4096  # tokens per site kept for the ZF scatter


def _held_sites(bank) -> list[tuple[int, torch.nn.Module]]:
    return bank.local_sites() if hasattr(bank, "local_sites") else list(enumerate(bank.saes))


@torch.no_grad()
def reconstruction_metrics(
    bank, batches, dense_threshold: float = 0.1, zf: list | None = None
) -> tuple[list[dict], list[torch.Tensor]]:
    """batches: iterable of normalised `x` (B, S, d). Returns per held site metrics and firing counts (h,);
    `zf` (a list) receives per held site an (n, 2) tensor of (‖z‖, ‖f̃‖) for top-AFA sites (else None)."""
    held = _held_sites(bank)
    acc = [
        dict(se=0.0, var_sum=0.0, sum_x=None, sum_x2=0.0, cos=0.0, l0=0.0, n=0, elems=0, kstar=0.0, eps=[], zf=[])
        for _ in held
    ]
    counts = [torch.zeros(sae.h, dtype=torch.long) for _, sae in held]
    for x in batches:
        x = x.unsqueeze(1) if x.ndim == 2 else x
        for j, (s, sae) in enumerate(held):
            xs = x[:, s].float()
            o = sae(xs)
            r = o.recon_raw
            a = acc[j]
            a["se"] += (r - xs).pow(2).sum().item()
            a["sum_x"] = xs.sum(0) if a["sum_x"] is None else a["sum_x"] + xs.sum(0)
            a["sum_x2"] += xs.pow(2).sum().item()
            a["cos"] += torch.nn.functional.cosine_similarity(r, xs, dim=-1).sum().item()
            a["l0"] += o.l0.sum().item()
            a["n"] += len(xs)
            a["elems"] += xs.numel()
            counts[j] += o.firing_counts(sae.h).cpu()
            if o.kstar is not None:
                a["kstar"] += o.kstar.sum().item()
                f_sq = o.f_norm.pow(2) + sae.b_dec.norm().pow(2)
                z_sq = o.x.pow(2).sum(-1)
                a["eps"].append(((z_sq - f_sq).abs() / ((sae.h - 1) * f_sq.clamp_min(1e-12))).cpu())
                kept = sum(len(t) for t in a["zf"])
                if kept < ZF_POINTS:
                    a["zf"].append(torch.stack([z_sq.sqrt(), f_sq.sqrt()], 1)[: ZF_POINTS - kept].cpu())
    out = []
    for j, a in enumerate(acc):
        s = held[j][0]
        n = max(a["n"], 1)
        total_var = a["sum_x2"] - (a["sum_x"].pow(2).sum().item() / n if a["sum_x"] is not None else 0.0)
        fvu = a["se"] / max(total_var, 1e-12)
        freq = counts[j].float() / n
        m = {
            "l0": a["l0"] / n,
            "mse": a["se"] / max(a["elems"], 1),
            "fvu": fvu,
            "ev": 1 - fvu,
            "cosine": a["cos"] / n,
            "dead_frac": (counts[j] == 0).float().mean().item(),
            "dense_frac": (freq > dense_threshold).float().mean().item(),
            "eval_tokens": float(a["n"]),
            "train_dead_frac": bank.saes[s].dead.float().mean().item(),
        }
        if a["eps"]:
            m["kstar"] = a["kstar"] / n
            m["eps_lbo"] = torch.cat(a["eps"]).median().item()
        out.append(m)
        if zf is not None:
            zf.append(torch.cat(a["zf"]) if a["zf"] else None)
    return out, counts


@torch.no_grad()
def ce_metrics(
    lm, hookpoints, ids: torch.Tensor, mask: torch.Tensor, reconstruct, batch_size: int = 8,
    keep_token_id: int | None = None,
) -> list[dict]:
    """CE with each site's activation replaced by `reconstruct(site, activation)` vs clean vs zero-ablated.
    Positions holding `keep_token_id` (BOS when the SAE was trained without it) keep their clean
    activation in both the spliced and the zero-ablated pass."""
    device = next(lm.parameters()).device
    sums = [dict(clean=0.0, spliced=0.0, zero=0.0, kl=0.0) for _ in hookpoints]
    n_tok = 0.0
    for b in range(0, len(ids), batch_size):
        i, m = ids[b : b + batch_size].to(device), mask[b : b + batch_size].to(device)
        valid = (m[:, 1:] * m[:, :-1]).float()
        n_tok += valid.sum().item()
        clean_logits = lm(input_ids=i, attention_mask=m).logits.float()
        clean_ce = next_token_ce(clean_logits, i, m).sum().item()
        clean_lp = torch.log_softmax(clean_logits[:, :-1], -1)
        clean = (i == keep_token_id)[..., None] if keep_token_id is not None else None
        for s in range(len(hookpoints)):
            sums[s]["clean"] += clean_ce
            for kind in ("spliced", "zero"):

                def fn(j, t, s=s, kind=kind, clean=clean):
                    if j != s:
                        return None
                    new = torch.zeros_like(t) if kind == "zero" else reconstruct(s, t.float()).to(t.dtype)
                    if clean is None or t.shape[:2] != clean.shape[:2]:  # not (B, T, ...): no positions to keep
                        return new
                    return torch.where(clean, t, new)

                with hooked(hookpoints, fn):
                    logits = lm(input_ids=i, attention_mask=m).logits.float()
                sums[s][kind] += next_token_ce(logits, i, m).sum().item()
                if kind == "spliced":
                    lp = torch.log_softmax(logits[:, :-1], -1)
                    kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
                    sums[s]["kl"] += (kl * valid).sum().item()
    out = []
    for s in sums:
        c, sp, z = (s[k] / max(n_tok, 1) for k in ("clean", "spliced", "zero"))
        denom = z - c
        out.append(
            {
                "ce_clean": c,
                "ce_spliced": sp,
                "ce_zero": z,
                "ce_delta": sp - c,
                "kl": s["kl"] / max(n_tok, 1),
                "ce_recovered": (z - sp) / denom if abs(denom) > 1e-9 else float("nan"),
            }
        )
    return out


def bank_reconstructor(bank, datamodule, sites: list[int] | None = None):
    """i, raw activation (..., d) -> SAE reconstruction in the raw space (scaling undone) for site
    `sites[i]` (default: site i)."""
    scale = datamodule.site_scales() if datamodule.scaling_mode != "none" else None

    def rec(i, t):
        s = sites[i] if sites is not None else i
        shape = t.shape
        x = t.reshape(-1, shape[-1])
        if scale is not None:
            x = x * scale[s].to(x.device)
        r = bank.saes[s](x).recon_raw
        if scale is not None:
            r = r / scale[s].to(x.device)
        return r.view(shape)

    return rec


def density_histogram(counts: list[torch.Tensor], n_tokens: int, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    floor = math.log10(1.0 / max(n_tokens, 1)) - 1
    for c, name in zip(counts, names):
        freq = c.float() / max(n_tokens, 1)
        logf = torch.where(freq > 0, freq.clamp_min(1e-12).log10(), torch.full_like(freq, floor))
        ax.hist(logf.numpy(), bins=50, alpha=0.5, label=name)
    ax.axvline(floor, color="k", lw=0.5, ls="--")
    ax.set_xlabel(f"log10 firing frequency (dead latents at {floor:.1f})")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def draw_zf_plot(points: list[torch.Tensor], names: list[str], eps_lbo: list[float], path: Path) -> None:
    """One panel per site: ‖f̃‖ against ‖z‖ per token, the line ‖f̃‖ = ‖z‖ and the εLBO bands (card 2.3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(points)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), dpi=100, squeeze=False)
    for ax, p, name, eps in zip(axes[0], points, names, eps_lbo):
        z, f = p[:, 0].numpy(), p[:, 1].numpy()
        ax.scatter(z, f, s=3, alpha=0.4, lw=0)
        # zoomed on the data: with per-token layer norm every ‖z‖ is ≈ √d and a view from 0 hides the spread
        lo, hi = float(min(z.min(), f.min())), float(max(z.max(), f.max()))
        pad = 0.05 * max(hi - lo, 0.1 * hi, 1e-6)
        lo, hi = max(lo - pad, 0.0), hi + pad
        grid = torch.linspace(lo, hi, 50).numpy()
        ax.plot(grid, grid, "k-", lw=0.8, label="‖f̃‖ = ‖z‖")
        for c, style in ((0.25, ":"), (0.5, "--"), (1.0, "-.")):
            ax.plot(grid, grid / (1 + c) ** 0.5, "r" + style, lw=0.7, label=f"ε(h−1) = {c}")
            if c < 1:  # the upper band 1/√(1 − c) is unbounded at c = 1
                ax.plot(grid, grid / (1 - c) ** 0.5, "r" + style, lw=0.7)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("‖z‖ (SAE input)")
        ax.set_ylabel("‖f̃‖ (feature magnitudes + ‖b_dec‖)")
        ax.set_title(f"{name}: median εLBO {eps:.2g}", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def flatten(per_site: list[dict], names: list[str]) -> dict[str, float]:
    """One site: keys as they are; several: `<hookpoint>/<key>` plus the mean over sites unprefixed."""
    if len(per_site) == 1:
        return dict(per_site[0])
    out = {f"{n}/{k}": v for n, m in zip(names, per_site) for k, v in m.items()}
    for k in per_site[0]:
        vals = [m[k] for m in per_site if k in m]
        out[k] = sum(vals) / len(vals)
    return out


def collect_site_metrics(
    bank,
    datamodule,
    device,
    max_tokens: int | None = 16384,
    batch_size: int = 4096,
    ce_sequences: int = 16,
    ce_batch_size: int = 8,
    dense_threshold: float = 0.1,
) -> list[dict]:
    """Per held site: {site, name, metrics, counts (h,), zf (n, 2) or None}, all on the CPU (picklable, so
    site-parallel ranks can send theirs to rank 0)."""
    was = bank.training
    bank.eval().to(device)
    try:

        def batches():
            seen = 0
            for b in datamodule.eval_dataloader("val", batch_size):
                if max_tokens is not None and seen >= max_tokens:
                    break
                x = b["x"].to(device)
                seen += len(x)
                yield datamodule.normalize(x)

        zf: list = []
        per_site, counts = reconstruction_metrics(bank, batches(), dense_threshold, zf)
        sites = [s for s, _ in _held_sites(bank)]
        names = list(datamodule.hookpoint_names)
        skip = None
        if ce_sequences and not datamodule.lm_name:
            skip = "no language model (data.lm is unset and the activation cache names none)"
        elif ce_sequences:
            try:
                lm = datamodule.lm
                if not datamodule.has_lm_head:
                    skip = f"the language model {datamodule.lm_name!r} has no LM head"
            except (OSError, RuntimeError, ValueError) as e:
                skip = f"the language model {datamodule.lm_name!r} did not load ({type(e).__name__}: {e})"
            if skip is None:
                ids, mask = datamodule.eval_sequences(ce_sequences)
                hooks = [datamodule.hooks[s] for s in sites]
                rec = bank_reconstructor(bank, datamodule, sites)
                keep = getattr(datamodule, "drop_token_id", None)
                for m, c in zip(per_site, ce_metrics(lm, hooks, ids, mask, rec, ce_batch_size, keep)):
                    m.update(c)
        return [
            {"site": s, "name": names[s], "metrics": m, "counts": c, "zf": z, "skipped_ce": skip}
            for s, m, c, z in zip(sites, per_site, counts, zf)
        ]
    finally:
        bank.train(was)


def report_site_metrics(
    per_site: list[dict], histogram: str | Path | None = None, zf_plot: str | Path | None = None
) -> dict[str, float]:
    """Flat metrics of `collect_site_metrics` results (from one or several ranks), in site order; draws the
    feature-density histogram and, for top-AFA sites, the ZF plot."""
    per_site = sorted(per_site, key=lambda r: r["site"])
    names = [r["name"] for r in per_site]
    if histogram is not None:
        n_tok = int(per_site[0]["metrics"]["eval_tokens"])
        density_histogram([r["counts"] for r in per_site], n_tok, names, Path(histogram))
    zf = [r for r in per_site if r["zf"] is not None and len(r["zf"])]
    if zf_plot is not None and zf:
        eps = [r["metrics"]["eps_lbo"] for r in zf]
        draw_zf_plot([r["zf"] for r in zf], [r["name"] for r in zf], eps, Path(zf_plot))
    out = flatten([r["metrics"] for r in per_site], names)
    why = next((r["skipped_ce"] for r in per_site if r.get("skipped_ce")), None)
    if why is not None:
        out.update(skipped("SAE evaluation", f"{why}: no ce_clean, ce_spliced, ce_zero, ce_delta, kl",
                           "ce_recovered"))
    return out


class SAEMetrics:
    """Evaluator (`eval.evaluators.<name>`): keys come out as `<name>/l0`, ... (see SAEModule for the
    unprefixed headline keys). Writes `feature_density.png` (and `zf_plot.png` for top-AFA) into `out_dir`."""

    def __init__(
        self,
        max_tokens: int | None = 16384,
        ce_sequences: int = 16,
        ce_batch_size: int = 8,
        dense_threshold: float = 0.1,
        out_dir: str | None = None,
    ):
        self.max_tokens, self.ce_sequences, self.ce_batch_size = max_tokens, ce_sequences, ce_batch_size
        self.dense_threshold, self.out_dir = dense_threshold, out_dir

    def __call__(self, ctx) -> dict[str, float]:
        max_tokens = (
            self.max_tokens if ctx.max_samples is None else min(self.max_tokens or 1 << 62, ctx.max_samples)
        )
        hist = Path(self.out_dir) / "feature_density.png" if self.out_dir else None
        zf = Path(self.out_dir) / "zf_plot.png" if self.out_dir else None
        per_site = collect_site_metrics(
            ctx.model, ctx.datamodule, ctx.device, max_tokens, ctx.batch_size, self.ce_sequences, self.ce_batch_size,
            self.dense_threshold,
        )
        return report_site_metrics(per_site, hist, zf)
