#!/usr/bin/env bash
# Every GPU figure in one command, for the first lent GPU (one H100/H200, < 8 minutes): one JSON object per
# benchmark, one per line on stdout ({"bench": <name>, ...}; {"bench": <name>, "error": ...} when one fails,
# and the others still run); the benchmarks' own logs go to stderr and $GPU_CHECK_LOGS.
#
#   scripts/gpu_check.sh              # on the GPU machine, from a checkout (pip-installed or not)
#   scripts/gpu_check.sh --dry-run    # on CPU: every benchmark but ViT-L at a tiny size, same code paths, same
#                                     # JSON keys (tests/test_gpu_check.py runs this); its figures mean nothing
#
# The GPU machine has torch, Lightning, timm and transformers but not Hydra, OmegaConf or datasets: they are
# installed from wheels in an ignored folder ($AEFORGE_WHEELS, default .device-wheels: a copy of
# ../shared/device-wheels) into a temporary site directory, never into the machine's own site-packages.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
logs=${GPU_CHECK_LOGS:-$(mktemp -d -t aeforge-gpu-check-XXXX)}
mkdir -p "$logs"

if ! "$py" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
  wheels=${AEFORGE_WHEELS:-.device-wheels}
  site="$logs/site"
  if ! ls "$wheels"/*.whl >/dev/null 2>&1 ||
     ! "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl >&2; then
    echo "{\"bench\": \"setup\", \"error\": \"Hydra/OmegaConf/datasets missing and no wheels installed from $wheels\"}"
    exit 1
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a checkout that is not pip-installed: the package finds conf/ as aeforge.conf, the name the install maps it to
"$py" -c "import aeforge.conf" 2>/dev/null || ln -sfn ../conf aeforge/conf

# the time limit of one benchmark: its GPU figure, or a generous one for the dry run on a shared CPU
limit() { if [ "$dry" = 1 ]; then echo 900; else echo "$1"; fi; }

# bench NAME SECONDS CMD...: run CMD (stdout+stderr to $logs/NAME.log), print {"bench": NAME, **last JSON object}
bench() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >&2
  local start=$SECONDS
  timeout "$(limit "$limit")" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  "$py" - "$name" "$rc" "$logs/$name.log" "$((SECONDS - start))" <<'EOF'
import json, re, sys
name, rc, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
text = open(path).read().rstrip()
found = None
for m in reversed(list(re.finditer(r"^\{", text, re.M))):  # the last JSON object the benchmark printed
    try:
        found, end = json.JSONDecoder().raw_decode(text, m.start())
        break
    except json.JSONDecodeError:
        continue
if rc != 0 or found is None:
    tail = text.splitlines()[-3:]
    found = {"error": f"exit {rc}" + (" (timed out)" if rc == 124 else ""), "log": path, "tail": tail}
print(json.dumps({"bench": name, **found, "wall_s": seconds}), flush=True)
EOF
}

# run_smoke NAME SECONDS CMD...: a training/eval command; reports its metrics.json (or the error)
run_smoke() {
  local name=$1 limit=$2
  shift 2
  bench "$name" "$limit" "$py" -c '
import json, subprocess, sys
from aeforge.cli import metrics_json_of
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
if proc.returncode != 0:
    sys.exit(proc.returncode)
path = metrics_json_of(proc.stdout)
m = json.loads(path.read_text())
print(json.dumps({"ok": True, "metrics": str(path), "steps": m.get("steps"),
                  "keys": sorted(k for k in m if not k.startswith("skipped"))[:12]}))
' "$@"
}

if [ "$dry" = 1 ]; then
  accel=cpu
  mae_args=(--dry-run)
  input_args=(--batch 4 --batches 2 --workers 0)
  sae_args=(--d 64 --latents 512 --k 8 --batch 256 --aux-k 32 --steps 1 --warmup 1 --device cpu)
else
  accel=gpu
  mae_args=(--compile --steps 60 --warmup 15)
  input_args=(--batch 256 --batches 40 --workers 8)
  sae_args=(--d 768 --latents 24576 --k 32 --batch 32768 --aux-k 512 --steps 20 --warmup 3 --bf16)
fi
run_dir="$logs/runs"

# 1. MAE pre-training throughput: aeforge's Lightning path vs a hand-written loop, same model, same process
mae_base() { bench mae_vit_base 150 "$py" scripts/bench_mae_gpu.py --model base --batch 256 "${mae_args[@]}"; }
mae_large() { bench mae_vit_large 150 "$py" scripts/bench_mae_gpu.py --model large --batch 128 "${mae_args[@]}"; }
# 2. the ImageNet-style input pipeline, JPEGs decoded on the device
input() { bench input_decode_on_device 90 "$py" scripts/bench_input.py --decode-on-device "${input_args[@]}"; }
# 3. TopK SAE: aeforge vs a naive dense TopK at the issue's shape (d 768, 24 576 latents, k 32, 32k tokens, AuxK)
sae() { bench sae_topk 120 "$py" scripts/bench_sae.py "${sae_args[@]}"; }
# 4. one-process DDP (NCCL on a GPU, gloo in the dry run): a fit, fine-tuning from its checkpoint, an SAE run
ddp=(debug=smoke smoke=false trainer=ddp trainer.devices=1 "trainer.accelerator=$accel" "paths.log_dir=$run_dir")
ddp_mae() { run_smoke ddp_fit_mae 120 "$py" train.py experiment=mae_mnist task_name=gpu_check_mae "${ddp[@]}"; }
ddp_finetune() {
  local ckpt
  ckpt=$(ls -t "$run_dir"/gpu_check_mae/runs/*/checkpoints/last.ckpt 2>/dev/null | head -1)
  run_smoke ddp_finetune 120 "$py" scripts/evaluate.py "ckpt=${ckpt:-missing.ckpt}" eval=finetune eval.max_epochs=1 \
    eval.max_samples=64 trainer.strategy=ddp trainer.devices=1 "trainer.accelerator=$accel"
}
ddp_sae() { run_smoke ddp_fit_sae 120 "$py" train.py experiment=sae_topk task_name=gpu_check_sae "${ddp[@]}"; }

# together STEP...: one after the other on the GPU (each figure alone on the machine); two at a time in the dry
# run, whose figures mean nothing and whose time is mostly interpreter start-up (one core each)
together() {
  if [ "$dry" = 0 ]; then
    for step in "$@"; do "$step"; done
    return
  fi
  for step in "$@"; do OMP_NUM_THREADS=1 "$step" >"$logs/$step.out" & done
  wait
  for step in "$@"; do cat "$logs/$step.out"; done
}

if [ "$dry" = 1 ]; then
  # (ViT-L is left out of the dry run: the ViT-B code with another model preset, which tests/test_configs.py
  # composes and validates)
  together mae_base input
else
  together mae_base mae_large input
fi
together sae ddp_mae
together ddp_finetune ddp_sae
echo "logs: $logs" >&2
