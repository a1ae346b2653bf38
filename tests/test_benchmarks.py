"""The documented real-data figures, reproduced: each test runs the command a doc gives and checks the figure
that doc reports, within the tolerance stated here. All carry the `benchmark` marker: `make bench` runs them
(2-10 minutes each on 2 CPU cores, ~40 in all), `make test` skips them. They need the staged data
($AEFORGE_DATA_DIR) and skip without it."""

from __future__ import annotations

import json
import re
import sys

import pytest

from aeforge.cli import metrics_json_of
from tests.conftest import ROOT, needs_data, run_command, run_train

pytestmark = pytest.mark.benchmark


def last_json(out: str) -> dict:
    """The JSON object a script prints last (one line or indented)."""
    out = out.rstrip()
    dec = json.JSONDecoder()
    for m in reversed(list(re.finditer(r"^\{", out, re.M))):
        try:
            obj, end = dec.raw_decode(out, m.start())
        except json.JSONDecodeError:
            continue
        if end == len(out):
            return obj
    raise AssertionError(f"no JSON object at the end of the output:\n{out[-2000:]}")


def metrics_of(stdout: str) -> dict:
    """metrics.json of a train.py run (its path is the last line printed)."""
    return json.loads(metrics_json_of(stdout).read_text())


# -- SCGC: the paper protocol (docs/methods/scgc.md, "Results: the paper protocol", final / best epoch, %) ------
# Shared AE (stages.scgc_pretrain.seed=0), run seed 0, 200 full-batch epochs. The doc's 10-seed means, whose
# spread over seeds is <= 0.16 pp; TOLERANCE_PP allows for another CPU's floating-point order.
SCGC_PAPER = {
    "scgc_acm": ("acm", 87.73, 92.23),
    "scgc_cite": ("citeseer", 69.69, 70.02),
    "scgc_star_usps": ("usps", 75.30, 75.32),
}
TOLERANCE_PP = 1.0


@pytest.mark.parametrize("experiment", [pytest.param(k, marks=needs_data(v[0])) for k, v in SCGC_PAPER.items()])
def test_scgc_paper_protocol(experiment, tmp_path):
    _, final_acc, best_acc = SCGC_PAPER[experiment]
    # the documented command: python train.py -m experiment=<x> seed=0,...,9 logger=csv (here its seed 0), in
    # fp32 as the tables were measured (scgc_acm now defaults to bf16-mixed: docs/methods/scgc.md, "Whole run")
    proc = run_train([f"experiment={experiment}", "seed=0", "logger=csv", "trainer.precision=32-true"], tmp_path,
                     timeout=3600)
    m = metrics_of(proc.stdout)
    assert 100 * m["acc"] == pytest.approx(final_acc, abs=TOLERANCE_PP), m
    assert 100 * m["best_acc"] == pytest.approx(best_acc, abs=TOLERANCE_PP), m


# -- SCGC speed (docs/methods/scgc.md, "Speed and memory"): the benchmark runs and reports its figures ---------
# No time is asserted (machines differ and are shared); the figure is printed beside the documented one, for
# the reader to compare on a quiet machine.
SCGC_SPEED = {"acm_full": ("acm", 0.422), "cite_full": ("citeseer", 0.616), "usps_full": ("usps", 1.476)}


@pytest.mark.parametrize("case", [pytest.param(k, marks=needs_data(v[0])) for k, v in SCGC_SPEED.items()])
def test_scgc_speed_benchmark_runs(case, tmp_path):
    _, documented = SCGC_SPEED[case]
    proc = run_command([sys.executable, str(ROOT / "scripts" / "bench_scgc.py"), "--cases", case, "--epochs", "10"],
                       tmp_path, timeout=1800)
    (result,) = last_json(proc.stdout)["results"]
    assert "error" not in result, result
    assert result["s_per_epoch"] > 0
    print(f"{case}: {result['s_per_epoch']:.3f} s/epoch (documented on a quiet machine: {documented})")


# -- MAE / ColorMAE / CAE / MR-MAE CPU proofs (docs/methods/{colormae,cae,mr_mae}.md, "CPU result") -----------
# scripts/proof_mim.py --epochs 15, seed 0, one thread: val top-1 of the linear probe and kNN, and of the
# random-init reference. With 500 val images one standard error is ~2.2 points; the run is seeded and
# single-threaded, so the same machine repeats it closely. PROBE_TOL = 3 points allows for another CPU's
# floating-point order. The claim each doc makes, that the learned encoder beats its random init, is checked
# as stated (both probes above the reference).
MIM_PROOFS = {
    "colormae.md": (["colormae_green", "mae"], {
        "colormae_green": (0.378, 0.390, 0.318, 0.256),
        "mae": (0.376, 0.376, 0.318, 0.256),
    }),
    "cae.md": (["cae", "cae_no_align"], {
        "cae": (0.314, 0.308, 0.276, 0.242),
        "cae_no_align": (0.304, 0.308, 0.276, 0.242),
    }),
    "mr_mae.md": (["mr_mae", "mae"], {
        "mr_mae": (0.378, 0.360, 0.338, 0.302),
        "mae": (0.376, 0.376, 0.318, 0.256),
    }),
}
PROBE_TOL = 0.03


def check_mim_proof(result: dict, expected: dict, tol: float) -> None:
    for run, (linear, knn, rand_linear, rand_knn) in expected.items():
        r = result[run]
        assert r["linear/acc"] == pytest.approx(linear, abs=tol), (run, r)
        assert r["knn/acc"] == pytest.approx(knn, abs=tol), (run, r)
        assert r["random_init"]["linear/acc"] == pytest.approx(rand_linear, abs=tol), (run, r)
        assert r["random_init"]["knn/acc"] == pytest.approx(rand_knn, abs=tol), (run, r)
        assert r["linear_gain_over_random_init"] > 0 and r["knn_gain_over_random_init"] > 0, (run, r)


@needs_data("cifar10_jpeg_subset", "cifar10_test_subset.npz")
@pytest.mark.parametrize("doc", list(MIM_PROOFS))
def test_mim_cpu_proof(doc, tmp_path):
    runs, expected = MIM_PROOFS[doc]
    # the documented command: AEFORGE_DATA_DIR=../shared/data python scripts/proof_mim.py --runs ... --epochs 15
    proc = run_command([sys.executable, str(ROOT / "scripts" / "proof_mim.py"), "--runs", *runs, "--epochs", "15"],
                       tmp_path, timeout=3600)
    check_mim_proof(last_json(proc.stdout), expected, PROBE_TOL)


# -- input faults (docs/reliability.md): 20 injections of each kind, none may lose a run -----------------------
def test_input_faults_lose_no_run():
    proc = run_command([sys.executable, "scripts/inject_faults.py", "--trials", "20"], ROOT, timeout=900)
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    assert len(rows) == 6 and all(r["count"] == 20 for r in rows)
    assert [r for r in rows if r["runs_lost"]] == []
