#!/usr/bin/env bash
# The accelerator run of issue 10, one script, under 10 minutes on one H100:
#   1. benchmarks/train_step.py --preset shards --size 256 --batch 32, float32 and bfloat16
#      (medjax against MONAI's same-width DiffusionModelUNet with torch AMP when torch and
#      monai import; medjax alone when they do not);
#   2. the README's default experiment (experiments/phantom.py, 1000 steps, flow) trained
#      and evaluated under a wall-clock cap.
# Each figure is one JSON line appended to $OUT/figures.jsonl; logs go beside it.
#
#   bash benchmarks/accelerator.sh            # the accelerator run
#   bash benchmarks/accelerator.sh --smoke    # tiny sizes, any CPU, under 2 minutes
#
# Installs nothing (the device machine has no network): it runs with $PYTHON, else
# .venv/bin/python, else python3, as found. Environment: OUT (default ./accelerator_out),
# PYTHON, BENCH_TIMEOUT (s per train_step.py run, default 150), TRAIN_CAP (s for the
# training run, evaluation included, default 240). A run that hits its cap is reported as
# such, never silently dropped.
set -u -o pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "accelerator.sh: unknown argument $arg (known: --smoke)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./accelerator_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
FIGURES="$OUT/figures.jsonl"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
TRAIN_CAP=${TRAIN_CAP:-240}
START=$(date +%s)

# One JSON line: {"label", "elapsed_s", "load_avg", ...fields}; fields given as a JSON object.
emit() {
  "$PYTHON" - "$1" "$2" "$START" >> "$FIGURES" <<'EOF'
import json, os, sys, time
label, fields, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
print(json.dumps({"label": label, "elapsed_s": round(time.time() - start, 1),
                  "load_avg": round(os.getloadavg()[0], 2), **fields}))
EOF
}

"$PYTHON" - > "$OUT/environment.json" <<'EOF'
import json, platform
info = {"python": platform.python_version()}
try:
  import jax
  info.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
              device_kind=getattr(jax.devices()[0], "device_kind", None))
except Exception as error:  # noqa: BLE001
  info["jax_error"] = repr(error)
for name in ("torch", "monai", "einops"):
  try:
    info[name] = __import__(name).__version__
  except Exception as error:  # noqa: BLE001
    info[name] = f"missing ({error.__class__.__name__})"
print(json.dumps(info))
EOF
emit environment "$(cat "$OUT/environment.json")"
echo "accelerator.sh: python $PYTHON, out $OUT, smoke=$SMOKE; $(cat "$OUT/environment.json")"

# --- 1. the train step at 256² batch 32, float32 and bfloat16 -----------------------------
if [ "$SMOKE" = 1 ]; then
  STEP_ARGS=(--preset default --size 32 --batch 2 --steps 2 --warmup 1 --rounds 1
             --config.model.channels=8)
else
  STEP_ARGS=(--preset shards --size 256 --batch 32 --steps 20 --warmup 3 --rounds 3)
fi
for dtype in float32 bfloat16; do
  log="$OUT/train_step_$dtype.log"
  echo "== train_step.py ${STEP_ARGS[*]} --dtype $dtype (cap ${BENCH_TIMEOUT}s) → $log"
  # Both sides share one process and one GPU: jax must not take 75 % of it up front.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout --signal=TERM --kill-after=10 "$BENCH_TIMEOUT" \
    "$PYTHON" benchmarks/train_step.py "${STEP_ARGS[@]}" --dtype "$dtype" > "$log" 2>&1
  rc=$?
  grep -E '^(config|medjax|MONAI|ratio|torch/monai)' "$log" | sed 's/^/   /'
  last=$(tail -n 1 "$log")
  if [ "$rc" = 0 ] && "$PYTHON" -c 'import json,sys; json.loads(sys.argv[1])' "$last" 2>/dev/null; then
    emit "train_step $dtype" "$last"
  else
    emit "train_step $dtype" "{\"error\": \"exit status $rc (124: over ${BENCH_TIMEOUT}s)\", \"log\": \"$log\"}"
  fi
done

# --- 2. the README default experiment, capped ---------------------------------------------
if [ "$SMOKE" = 1 ]; then
  EXPERIMENT="experiments/phantom.py:size=tiny"
else
  EXPERIMENT="experiments/phantom.py"
fi
WORKDIR="$OUT/phantom_flow"
rm -rf "$WORKDIR"
log="$OUT/train.log"
echo "== medjax train --config $EXPERIMENT (cap ${TRAIN_CAP}s) → $log"
t0=$(date +%s.%N)
# SIGTERM ends `medjax train` like Ctrl-C (the pending checkpoint finished, lock released).
timeout --signal=TERM --kill-after=30 "$TRAIN_CAP" \
  "$PYTHON" -m medjax.cli train --config "$EXPERIMENT" --workdir "$WORKDIR" > "$log" 2>&1
rc=$?
wall=$("$PYTHON" -c "import time; print(round(time.time() - $t0, 1))")
fields=$("$PYTHON" - "$WORKDIR" "$rc" "$wall" "$EXPERIMENT" "$TRAIN_CAP" <<'EOF'
import glob, json, os, sys
workdir, rc, wall, experiment, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
out = {"experiment": experiment, "exit_status": rc, "wall_s": wall, "capped": rc in (124, 137),
       "cap_s": float(cap)}
rows = []
try:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
except OSError:
  pass
train = [r for r in rows if r.get("split") == "train"]
if train:
  out["last_step"] = train[-1]["step"]
  out["last_loss"] = train[-1].get("loss")
  rates = [r["steps_per_s"] for r in train if r.get("steps_per_s")]
  if rates:
    out["steps_per_s_last"] = rates[-1]
    out["steps_per_s_median"] = sorted(rates)[len(rates) // 2]
summaries = sorted(glob.glob(os.path.join(workdir, "eval", "*", "summary.json")),
                   key=lambda p: int(os.path.basename(os.path.dirname(p))))
if summaries:
  with open(summaries[-1]) as f:
    summary = json.load(f)
  out["eval_step"] = summary.get("step")
  out["val"] = {k: summary.get("model", {}).get(k) for k in ("mae", "psnr", "ssim")}
  out["val_baseline"] = {k: summary.get("baseline", {}).get(k) for k in ("mae", "psnr", "ssim")}
print(json.dumps(out))
EOF
)
emit "train default experiment" "$fields"
echo "   $fields"

echo "accelerator.sh: done in $(( $(date +%s) - START )) s; figures in $FIGURES"
