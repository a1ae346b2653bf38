"""TopK SAE training throughput: naive dense PyTorch TopK (no AuxK) vs aeforge's (sparse encoder backward,
embedding-bag decoder, AuxK on), same shapes, same machine, one after the other in separate processes.

    python scripts/bench_sae.py                                   # CPU-sized default (batch 2048)
    python scripts/bench_sae.py --batch 32768 --steps 20          # the issue's GPU shape (d 768, 24576, k 32)

One training step = forward, loss, backward, Adam step, decoder renormalisation. Prints one JSON object:
tokens/s and peak memory (CUDA: max allocated; CPU: peak RSS of the case's process) per implementation,
and `speedup` = ours / naive.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_case(impl: str, a) -> dict:
    import torch

    from aeforge.models.sae import SparseAutoencoder
    from aeforge.models.sae_activations import TopK
    from aeforge.objectives.sparsity import SAEObjective

    torch.manual_seed(0)
    dev = torch.device(a.device)
    d, h, k, n = a.d, a.latents, a.k, a.batch
    x = torch.randn(n, d, device=dev)
    if impl == "naive":
        w_enc = torch.nn.Parameter(torch.randn(h, d, device=dev) / d**0.5)
        w_dec = torch.nn.Parameter(w_enc.detach().clone())
        b_enc = torch.nn.Parameter(torch.zeros(h, device=dev))
        b_dec = torch.nn.Parameter(torch.zeros(d, device=dev))
        params = [w_enc, w_dec, b_enc, b_dec]

        def step():
            pre = (x - b_dec) @ w_enc.t() + b_enc
            vals, idx = pre.topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
            recon = z @ w_dec + b_dec
            return (recon - x).pow(2).mean()
    else:
        # --bf16: our encoder GEMM in bf16 (model.matmul_dtype), the rest fp32; the naive case autocasts
        sae = SparseAutoencoder(d, h, TopK(k=k), aux_k=a.aux_k, dead_tokens=1,
                                matmul_dtype="bfloat16" if a.bf16 else None).to(dev)
        with torch.no_grad():  # a realistic share of dead latents so AuxK does its work
            sae.tokens_since_fired.zero_()
            sae.tokens_since_fired[torch.rand(h, device=dev) < a.dead_frac] = 10
        sae.dead_tokens = 5
        obj = SAEObjective(recon="mse", aux_coef=1 / 32)
        params = list(sae.parameters())

        def step():
            out = sae(x)  # k_aux = min(aux_k, #dead): after one step nearly every unfired latent is dead
            return obj({"sites": [out]}, {})["loss"]

    opt = torch.optim.Adam(params, lr=1e-4)
    amp = (
        torch.autocast(dev.type, dtype=torch.bfloat16) if a.bf16 and impl == "naive"
        else torch.autocast(dev.type, enabled=False)
    )

    def train_step():
        with amp:
            loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if impl == "ours":
            sae.renormalize_decoder()
        return loss

    for _ in range(a.warmup):
        train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "tokens_per_s": n * a.steps / dt,
        "seconds_per_step": dt / a.steps,
        "peak_mem_gib": peak / 2**30,
        "loss": float(loss),
        "aux_k": a.aux_k if impl == "ours" else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--latents", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--aux-k", type=int, default=512)
    p.add_argument("--dead-frac", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--impl", choices=["naive", "ours"], default=None, help="internal: run one case")
    a = p.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.impl:
        print(json.dumps(run_case(a.impl, a)))
        return
    results = {}
    for impl in ("naive", "ours"):
        args = [sys.executable, __file__, "--impl", impl, "--device", a.device] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("impl", "device", "bf16")
        ]
        args += ["--bf16"] if a.bf16 else []
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    import platform

    import torch

    report = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({platform.processor()})",
        "threads": torch.get_num_threads(),
        "shape": {"d": a.d, "latents": a.latents, "k": a.k, "batch": a.batch},
        "bf16": a.bf16,
        **results,
        "speedup": results["ours"]["tokens_per_s"] / results["naive"]["tokens_per_s"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
