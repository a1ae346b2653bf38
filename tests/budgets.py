"""Wall-time budgets of the test files on 2 CPU cores (seconds: setup + call + teardown of every test in the
file). `make test` must stay under 10 minutes on the CI machine; the budgets split that sum between the files so
a slow new test is seen where it lands. Tests never assert times (machines are shared and noisy): the end of
every run lists the files over budget (tests/conftest.py), and CI prints the 15 slowest tests. A file not
listed has DEFAULT_S. Real-data reproductions do not count: they carry the `benchmark` marker (`make bench`)."""

from __future__ import annotations

DEFAULT_S = 15.0
# the files above DEFAULT_S, measured in one quiet run on 2 cores (2026-12-03) plus ~20 % headroom; TOTAL_S is
# the suite's: 10 minutes on the CI machine less start-up and collection
BUDGETS_S: dict[str, float] = {
    "test_readme.py": 180,  # every README command as written: ViT-B runs, sweeps, DDP, torchrun, Optuna
    "test_train.py": 115,  # every experiment under debug=smoke (one per recipe), resume exactness
    "test_sae_dist.py": 70,  # 2-process gloo runs (site-parallel resume)
    "test_gpu_check.py": 45,  # scripts/gpu_check.sh --dry-run: 6 benchmark processes, two at a time
    "test_faults_ddp.py": 45,
    "test_finetune.py": 40,
    "test_configs.py": 40,
    "test_scgc.py": 30,
    "test_config_fuzz.py": 25,
    "test_packaging.py": 20,
    "test_sae_module.py": 20,
    "test_fmae_iat.py": 20,
    "test_scgc_pretrain.py": 25,  # AE restarts (3 AEs x 3 criteria), the export for the official code
}
TOTAL_S = 570.0


def over_budget_lines(seconds: dict[str, float]) -> list[str]:
    """One line per file over its budget, and one for the whole run when it is over TOTAL_S."""
    lines = [f"{name}: {spent:.0f} s (budget {BUDGETS_S.get(name, DEFAULT_S):.0f} s)"
             for name, spent in sorted(seconds.items(), key=lambda kv: -kv[1])
             if spent > BUDGETS_S.get(name, DEFAULT_S)]
    total = sum(seconds.values())
    if total > TOTAL_S and len(seconds) > 1:
        lines.append(f"all files: {total:.0f} s (budget {TOTAL_S:.0f} s)")
    return lines
