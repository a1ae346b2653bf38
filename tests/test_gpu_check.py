"""scripts/gpu_check.sh, the one command for the first lent GPU: its dry run on CPU runs every benchmark at a tiny
size through the same code paths and prints one JSON object per benchmark with the keys the GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

# benchmark -> keys its object must carry (the figures docs/benchmarks.md takes from a GPU run)
EXPECTED = {
    "mae_vit_base": {"handwritten_img_s", "aeforge_img_s", "ratio_aeforge_over_handwritten", "gflops_per_img_train"},
    "input_decode_on_device": {"images_per_s", "decode"},
    "sae_topk": {"naive", "ours", "speedup", "shape"},
    "ddp_fit_mae": {"ok", "steps", "metrics"},
    "ddp_finetune": {"ok", "metrics"},
    "ddp_fit_sae": {"ok", "steps", "metrics"},
}


def test_gpu_check_dry_run_reports_every_benchmark(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_LOGS": str(tmp_path), "AEFORGE_LOG_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    by_name = {obj["bench"]: obj for obj in lines}
    # one object per benchmark, in the documented order (the GPU run adds mae_vit_large after mae_vit_base)
    assert list(by_name) == list(EXPECTED), proc.stdout
    for name, keys in EXPECTED.items():
        obj = by_name[name]
        assert "error" not in obj, (name, obj)
        assert keys <= obj.keys(), (name, sorted(obj))
    assert by_name["ddp_fit_mae"]["steps"] >= 1 and by_name["ddp_fit_sae"]["steps"] >= 1
    assert by_name["sae_topk"]["ours"]["tokens_per_s"] > 0


def test_gpu_check_refuses_an_unknown_flag():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dryrun"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: scripts/gpu_check.sh [--dry-run]" in proc.stderr
