"""SCGC fine-tuning speed and memory: seconds per epoch, total, peak RSS, for full-batch and mini-batch
modes on ACM (SCGC) and USPS (SCGC*), and a ≥200k-node synthetic graph in mini-batch mode.

    AEFORGE_DATA_DIR=../shared/data python scripts/bench_scgc.py                 # every case
    python scripts/bench_scgc.py --cases acm_full usps_full --epochs 20
    python scripts/bench_scgc.py --vs-official ~/src/SCGC --dataset acm          # whole runs, side by side

--vs-official DIR (a checkout of github.com/gayanku/SCGC; it needs `pip install munkres h5py`) runs,
back to back on this machine: `python train.py experiment=scgc_<dataset> seed=42` as a user would (its own
fresh AE cache, so AE pre-training is inside the wall time), then exports our data and the AE that run kept
into DIR/aeforge_data (scripts/export_scgc_official.py) and runs the official train.py from that AE with its
README's settings. The official code starts from a pre-trained AE file, so its total is its process wall time
plus our measured pre-training time of the same SDCN recipe. Its always-on torch profiler is switched off
(a no-op stand-in; it held 16 GB on USPS) — the official code is otherwise unchanged.

Each case runs in its own subprocess so that its peak RSS is its own. The timed loop is the real
`SCGCModule` under a Lightning Trainer (no callbacks, no logger, no progress bar, no profiler); the
scgc_pretrain stage is replaced by k-means on the randomly initialised encoder (the AE is cached in real runs
and its pre-training timed separately by `pretrain_seconds` in metrics.json). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AEFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))

# dataset, variant settings (the official README's), batch size (None = full batch)
CASES = {
    "acm_full": dict(data="acm", star=False, alpha=0.5, order=2, tau=0.25, cumulative=False, batch=None),
    "acm_mini": dict(data="acm", star=False, alpha=0.5, order=2, tau=0.25, cumulative=False, batch=1024),
    "acm_star_full": dict(data="acm", star=True, alpha=1.0, order=1, tau=0.25, cumulative=True, batch=None),
    "cite_full": dict(data="citeseer", star=False, alpha=1.0, order=1, tau=0.25, cumulative=False, batch=None),
    "usps_full": dict(data="usps", star=True, alpha=4.0, order=4, tau=0.25, cumulative=True, batch=None),
    "usps_mini": dict(data="usps", star=True, alpha=4.0, order=4, tau=0.25, cumulative=True, batch=2048),
    "sbm200k_mini": dict(
        data="sbm200k", star=True, alpha=1.0, order=2, tau=0.25, cumulative=True, batch=4096
    ),
}


def run_case(name: str, epochs: int) -> dict:
    import numpy as np
    import pytorch_lightning as pl
    import torch

    from aeforge.data.graphs import GraphDataModule, save_graph_npz, synthetic_sbm
    from aeforge.eval.clustering import fit_kmeans
    from aeforge.models.scgc import SCGC, encode_all
    from aeforge.modules.optim import OptimSettings
    from aeforge.modules.scgc import SCGCModule
    from aeforge.objectives.clustering import SCGCObjective

    c = CASES[name]
    pl.seed_everything(0, verbose=False)
    t0 = time.time()
    if c["data"] == "sbm200k":
        path = Path(tempfile.mkdtemp()) / "sbm200k.npz"
        save_graph_npz(path, synthetic_sbm(200_000, 10, 64, 5e-4, 2e-6, 2.0, seed=0))
        extra = {}
    else:
        path = DATA / c["data"] / f"{c['data']}.npz"
        extra = {"feature_scale": 2.0} if c["data"] == "usps" else {}  # staged adj = SDCN's k=3 graph
    dm = GraphDataModule(str(path), batch_size=c["batch"], order=c["order"], cumulative=c["cumulative"], **extra)
    objective = SCGCObjective(alpha=c["alpha"], beta=0.1, tau=c["tau"], order=c["order"],
                              cumulative=c["cumulative"], recon=0.0 if c["star"] else 1.0)
    model = SCGC(dm.input_shape, decoder=not c["star"], n_clusters=dm.num_classes)
    load_seconds = time.time() - t0
    km = fit_kmeans(encode_all(model.encoder, dm.features).numpy(), dm.num_classes, 20, 0)
    model.start_from(torch.from_numpy(km.cluster_centers_))  # the random encoder's own k-means centres
    optim = OptimSettings(optimizer="adam", lr=1e-3, schedule="constant")
    module = SCGCModule(
        model=model, objective=objective, optim=optim, num_classes=dm.num_classes, log_every=10**9
    )

    times: list[float] = []
    rss: list[float] = []  # resident memory at each epoch end: flat = bounded while it trains

    def current_rss_gib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    class EpochTimer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            times.append(time.perf_counter() - self.t)
            rss.append(round(current_rss_gib(), 3))

    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        default_root_dir=tempfile.mkdtemp(),  # SCGCModule writes clustering_history.json there
        enable_progress_bar=False, enable_model_summary=False, callbacks=[EpochTimer()], log_every_n_steps=1,
    )
    t1 = time.time()
    trainer.fit(module, datamodule=dm)
    total = time.time() - t1
    gamma = dm.gamma()
    steady = times[1:] or times  # the first epoch also builds Γ and the full batch
    return {
        "case": name, "nodes": dm.num_nodes, "mode": "full" if dm.full_batch_mode else f"mini({c['batch']})",
        "variant": "SCGC*" if c["star"] else "SCGC", "order": c["order"], "cumulative": c["cumulative"],
        "gamma_nnz": int(gamma.nnz) if gamma is not None else None, "epochs": len(times),
        "s_per_epoch": float(np.median(steady)), "first_epoch_s": times[0], "fit_total_s": total,
        "load_s": load_seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_gib_per_epoch": rss, "dense_nxn_gib": dm.num_nodes**2 * 4 / 2**30,
        "final_acc": module.history[-1]["acc"], "torch_threads": torch.get_num_threads(),
    }


# dataset -> (our experiment, the official README's arguments, export arguments)
OFFICIAL = {
    "acm": ("scgc_acm", "--model SCGC --alpha 0.5 --beta 0.1 --order 2 --tau 0.25 --lr 0.001", dict(k=0, scale=1.0)),
    "cite": ("scgc_cite", "--model SCGC --alpha 1 --beta 0.1 --order 1 --tau 0.25 --lr 0.0001", dict(k=0, scale=1.0)),
    "usps": ("scgc_star_usps", "--model SCGC_TRIM --alpha 4 --beta 0.1 --order 4 --tau 0.25 --lr 0.001 --influence",
             dict(k=3, scale=2.0)),
}
DATA_FILE = {"acm": "acm/acm.npz", "cite": "citeseer/citeseer.npz", "usps": "usps/usps.npz"}

# runs the official train.py with torch.profiler.profile replaced by a no-op (record_function stays: without
# an active profiler it only checks a flag)
OFFICIAL_RUNNER = """
import contextlib, runpy, sys, torch.profiler as tp
class _Table:
    def table(self, **kwargs): return ''
class _NoProfile:
    def key_averages(self): return _Table()
tp.profile = lambda *a, **k: contextlib.nullcontext(_NoProfile())
sys.argv = ['train.py', *sys.argv[1:]]
runpy.run_path('train.py', run_name='__main__')
"""


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        hint = "\n(the official code needs: pip install munkres h5py)" if "No module named" in tail[-1] else ""
        sys.exit(f"{' '.join(cmd[:3])} … failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail)
                 + hint)
    return seconds


def official_accs(text: str) -> list[float]:
    """Per-epoch ACC of the official log (--verbosity 3 prints `<epoch> <model>   Z:<acc of that epoch> ...`)."""
    return [float(m.group(1)) for m in re.finditer(r"^\s*\d+ SCGC\w*\s+Z:\s*([\d.]+)", text, re.M)]


def vs_official(official_dir: Path, dataset: str, epochs: int, work: Path, extra: list[str]) -> dict:
    """Our whole run and the official one from the same data and AE; wall times, ACCs and their ratio."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_scgc_official import export

    if not (official_dir / "train.py").is_file() or not (official_dir / "models.py").is_file():
        sys.exit(f"--vs-official {official_dir}: not a checkout of github.com/gayanku/SCGC (no train.py/models.py)")
    experiment, official_args, exp = OFFICIAL[dataset]
    work.mkdir(parents=True, exist_ok=True)
    ours_cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", "seed=42",
                f"paths.log_dir={work / 'logs'}", f"stages.scgc_pretrain.cache_dir={work / 'ae_cache'}",
                f"trainer.max_epochs={epochs}", *extra]
    ours_s = timed(ours_cmd, ROOT, work / "ours.log")
    run_dir = sorted((work / "logs" / experiment / "runs").iterdir())[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train_log = (run_dir / "train.log").read_text()
    # the AE the run kept: restart r is the r-th AE the stage trained (cache files are named by a hash)
    made = re.findall(r"pre-trained AE cached at (\S+)", train_log)
    ae = Path(made[int(metrics.get("pretrain_restart", 0))])
    data = work / "official_data"
    export(DATA / DATA_FILE[dataset], dataset, exp["k"], exp["scale"], ae, data)
    official_cmd = [sys.executable, "-c", OFFICIAL_RUNNER, "--name", dataset, "--iterations", "1", "--epochs",
                    str(epochs), "--verbosity", "3", "--data_path", str(data), *official_args.split()]
    official_s = timed(official_cmd, official_dir, work / "official.log")
    accs = official_accs((work / "official.log").read_text())
    pretrain_s = float(metrics.get("pretrain_seconds", 0.0))
    official_total = official_s + pretrain_s
    return {
        "dataset": dataset, "epochs": epochs, "cpu_count": os.cpu_count(),
        "ours": {"wall_s": round(ours_s, 1), "pretrain_s": round(pretrain_s, 1), "acc_final": metrics["acc"],
                 "acc_best": metrics["best_acc"], "command": " ".join(ours_cmd[1:])},
        "official": {"wall_s": round(official_s, 1), "wall_plus_pretrain_s": round(official_total, 1),
                     "acc_final": accs[-1] if accs else None, "acc_best": max(accs) if accs else None,
                     "command": f"cd {official_dir} && python train.py " + " ".join(official_cmd[3:])},
        "ratio_ours_over_official": round(ours_s / official_total, 3),
        "logs": str(work),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--vs-official", type=Path, metavar="DIR", help="a checkout of the official SCGC code")
    ap.add_argument("--dataset", choices=sorted(OFFICIAL), default="acm")
    ap.add_argument("--work", type=Path, default=None, help="where runs and logs go (default: a temp dir)")
    ap.add_argument("overrides", nargs="*",
                    help="extra train.py overrides for our run (e.g. stages.scgc_pretrain.restarts=3)")
    args = ap.parse_args()
    if args.vs_official:
        work = args.work or Path(tempfile.mkdtemp(prefix="scgc-vs-official-"))
        epochs = args.epochs if "--epochs" in sys.argv else 200
        print(json.dumps(vs_official(args.vs_official.expanduser(), args.dataset, epochs, work, args.overrides),
                         indent=2))
        return
    if args.one:
        print(json.dumps(run_case(args.one, args.epochs)))
        return
    results = []
    for name in args.cases:
        epochs = min(args.epochs, 3) if name.startswith("sbm") else args.epochs
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--epochs", str(epochs)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            results.append({"case": name, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
