#!/usr/bin/env bash
# One point at a time against several at once through Ray: the same plan run into fresh folders, --workers 1 then
# --workers N, timed from the command's start to its end (Ray's start-up included); without GPUs also --workers 1
# with each point on the threads a parallel point gets (the cores / N), which tells the parallelism apart from the
# thread count. Prints a table: wall time, points per hour, the speed-up, each point's tokens/s, and the largest
# difference between the runs' training logs (relative to the loss). Used on the CPU as it is and by
# bench/gpu_sweep.sh on GPUs.
# Usage: bash bench/sweep_speed.sh [plan] [workers] [out]   (default: notebooks/plans/cpu_tiny_grid.yaml, 2,
#        outputs/sweep-speed). PY picks the Python (default: .venv/bin/python, else python3).
set -euo pipefail
PLAN=${1:-notebooks/plans/cpu_tiny_grid.yaml}
WORKERS=${2:-2}
OUT=${3:-outputs/sweep-speed}
PY=${PY:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
# Ray starts its workers at niceness 15; here they get the sequential run's 0, so that on a machine shared with other
# work both runs compete for the cores alike (on a machine of its own it changes nothing).
export RAY_worker_niceness=0
rm -rf "$OUT"
mkdir -p "$OUT"
{
  date -u +"%FT%TZ"
  nproc
  cat /proc/loadavg
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | tr '\n' ';' || true
  echo
} > "$OUT/machine.txt"
RUNS=("1" "$WORKERS")
nvidia-smi -L > /dev/null 2>&1 || RUNS=("1" "1-threads-$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 ))" "$WORKERS")
for run in "${RUNS[@]}"; do
  start=$(date +%s.%N)
  threads=${run#1-threads-}
  ( [[ $run == 1-threads-* ]] && export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
    "$PY" -m helpers.batch "$PLAN" --workers "${run%%-*}" --output-dir "$OUT/workers-$run" ) > "$OUT/workers-$run.log" \
    2>&1 || echo "the batch with --workers $run exited $?: see $OUT/workers-$run.log"
  echo "$start $(date +%s.%N)" > "$OUT/workers-$run.seconds"
done
"$PY" - "$OUT" "${RUNS[@]}" <<'PY'
import csv, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
stamp, cores, load, gpus = ((out / "machine.txt").read_text().splitlines() + [""] * 4)[:4]
runs = {w: next((out / f"workers-{w}").glob("*/summary.csv")) for w in names}
rows = {w: list(csv.DictReader(path.open())) for w, path in runs.items()}
seconds = {w: (lambda a, b: float(b) - float(a))(*(out / f"workers-{w}.seconds").read_text().split()) for w in runs}
print(f"{stamp}: {len(rows['1'])} points, {cores} cores (load average before: {load.split()[0]}), GPUs: {gpus or 'none'}")
print(f"| workers | wall time s | points per hour | speed-up | finished | tokens/s per point |\n|---|---|---|---|---|---|")
for w in runs:
    finished = sum(r["status"] == "finished" for r in rows[w])
    speeds = ", ".join(r["tokens_per_s"] or "-" for r in rows[w])
    print(f"| {w} | {seconds[w]:.0f} | {3600 * len(rows[w]) / seconds[w]:.1f} | {seconds['1'] / seconds[w]:.2f} | "
          f"{finished}/{len(rows[w])} | {speeds} |")
worst = 0.0
for row in rows["1"]:
    logs = [list(csv.DictReader((runs[w].parent / row["point"] / "train_log.csv").open())) for w in runs]
    for steps in zip(*logs):
        losses = [float(s["loss"]) for s in steps if s["loss"]]
        if losses:
            worst = max(worst, (max(losses) - min(losses)) / abs(losses[0]))
print(f"largest relative difference between the runs' per-step losses: {worst:.2e}")
PY
