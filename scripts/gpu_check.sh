#!/usr/bin/env bash
# Training throughput and ML-100K quality on cuda and cpu, side by side.
# Writes docs/results/gpu_check.json:
#   {"cuda": {"events_per_s": ...}, "cpu": {"events_per_s": ...}, "hr@10": {"cuda": ..., "cpu": ...}, ...}
# Run from the repository root with the project's python (PYTHON=...); installs nothing and needs
# no network, but ML-100K must already be in $STREAM_REC_DATA_DIR (default ./data: carry it over,
# or run `stream-rec eval` once where pip can download). About 3-5 min on a GPU box.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-docs/results/gpu_check.json}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "cuda is not available to torch; nothing to compare" >&2
  exit 1
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "gpu", torch.cuda.get_device_name(0))'
DATA=${STREAM_REC_DATA_DIR:-data}
if [ ! -s "$DATA/ml-100k.inter" ]; then
  echo "ML-100K not found at $DATA/ml-100k.inter (set STREAM_REC_DATA_DIR or copy ./data)" >&2
  exit 1
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# training: learn() end to end (fast path + preparation + step), the step alone, and on cuda
# kernels / syncs per chunk; --check trains one stream with every variant and compares states
"$PY" scripts/bench_train.py --device cuda --batches 200 --check | tee "$TMP/bench_cuda.txt"
"$PY" scripts/bench_train.py --device cpu --batches 60 | tee "$TMP/bench_cpu.txt"
for dev in cuda cpu; do
  "$PY" -m stream_rec eval --dataset ml-100k --device "$dev" --json | tee "$TMP/eval_$dev.txt"
done

"$PY" - "$TMP" "$OUT" <<'PYEOF'
import json, sys, time
from pathlib import Path

import torch

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
last = lambda name: json.loads((tmp / name).read_text().strip().splitlines()[-1])
bc, bp = last("bench_cuda.txt"), last("bench_cpu.txt")
ec, ep = last("eval_cuda.txt"), last("eval_cpu.txt")
run = lambda b: b["by_step"]["explicit"]["runs"][0]
result = {
    "cuda": {"events_per_s": bc["events_per_s"],
             "step_only_events_per_s": run(bc).get("step_only_events_per_s"),
             **{k: run(bc).get(k) for k in ("host_ms_per_chunk", "host_ops_per_chunk",
                                            "cuda_kernels_per_chunk", "cuda_syncs_per_chunk",
                                            "cuda_device_ms_per_chunk", "runner")}},
    "cpu": {"events_per_s": bp["events_per_s"],
            "step_only_events_per_s": run(bp).get("step_only_events_per_s"),
            "host_ms_per_chunk": run(bp).get("host_ms_per_chunk")},
    "hr@10": {"cuda": ec["model"]["hr@10"], "cpu": ep["model"]["hr@10"]},
    "ndcg@10": {"cuda": ec["model"]["ndcg@10"], "cpu": ep["model"]["ndcg@10"]},
    "check": bc.get("check"),
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "when": time.strftime("%Y-%m-%d %H:%M:%S"),
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"{'':28}{'cuda':>14}{'cpu':>14}")
print(f"{'learn() events/s':28}{result['cuda']['events_per_s']:>14,.0f}"
      f"{result['cpu']['events_per_s']:>14,.0f}")
so = [result[d]["step_only_events_per_s"] or 0.0 for d in ("cuda", "cpu")]
print(f"{'training step alone ev/s':28}{so[0]:>14,.0f}{so[1]:>14,.0f}")
print(f"{'ML-100K HR@10':28}{result['hr@10']['cuda']:>14.4f}{result['hr@10']['cpu']:>14.4f}")
print(f"wrote {out}")
print(json.dumps(result))
PYEOF
