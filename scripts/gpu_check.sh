#!/usr/bin/env bash
# Training-step benchmark and a short prequential eval on cuda and cpu, side by side.
# Run from the repository root; uses the current python, installs nothing. < 3 min on a GPU box.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "cuda is not available to torch; nothing to compare" >&2
  exit 1
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "gpu", torch.cuda.get_device_name(0))'

declare -A BENCH EVAL
for dev in cuda cpu; do
  BENCH[$dev]=$("$PY" scripts/bench_train.py --device "$dev" --batches 40 | tail -n 1)
  echo "bench $dev: ${BENCH[$dev]}"
  EVAL[$dev]=$("$PY" - "$dev" <<'PYEOF'
import json, sys, itertools
import torch
torch.set_num_threads(2)
from stream_rec.datasets import iter_synthetic
from stream_rec.evaluation import run_eval
dev = sys.argv[1]
events = list(itertools.islice(iter_synthetic(n_users=2000, n_items=3000, seed=1), 40000))
r = run_eval(events, sample_every=25, batch_size=1000, device=dev)
print(json.dumps({"hr@10": r["model"]["hr@10"], "events_per_s": r["model"]["events_per_s"],
                  "cooc_hr@10": r["baselines"]["cooccurrence"]["hr@10"]}))
PYEOF
)
  echo "eval  $dev: ${EVAL[$dev]}"
done

"$PY" - "${BENCH[cuda]}" "${BENCH[cpu]}" "${EVAL[cuda]}" "${EVAL[cpu]}" <<'PYEOF'
import json, sys
bc, bp, ec, ep = (json.loads(x) for x in sys.argv[1:5])
print(f"{'':28}{'cuda':>14}{'cpu':>14}")
print(f"{'train step events/s':28}{bc['events_per_s']:>14,.0f}{bp['events_per_s']:>14,.0f}")
print(f"{'eval model events/s':28}{ec['events_per_s']:>14,.0f}{ep['events_per_s']:>14,.0f}")
print(f"{'eval model HR@10':28}{ec['hr@10']:>14.4f}{ep['hr@10']:>14.4f}")
print(json.dumps({"bench": {"cuda": bc, "cpu": bp}, "eval": {"cuda": ec, "cpu": ep}}))
PYEOF
