#!/usr/bin/env bash
# GPU check, at most 5 minutes on one GPU: train tinyshakespeare for 120 s with cuDNN and bf16
# autocast, print characters/s and the validation loss, then the same run on the CPU path (shorter:
# its characters/s is the figure to compare) on the same machine.
#
#   bash benchmarks/gpu_check.sh          # from the repository root or anywhere
#
# What it needs, offline:
#   * a Python with a CUDA build of torch and charlstm's training dependencies (numpy, safetensors,
#     click, tqdm, tomli-w). If the machine's python3 lacks them, they are installed into
#     .venv-gpu from wheels carried in the working tree, never from the network:
#         pip download -d wheels torch --index-url https://download.pytorch.org/whl/cu124
#         pip download -d wheels numpy safetensors click tqdm tomli-w
#   * tinyshakespeare.txt in $CHARLSTM_DATA, shared/data, ../shared/data or data/.
#
# Settings (environment): GPU_SECONDS (120), CPU_SECONDS (40), DEVICE (cuda; `DEVICE=cpu` runs the
# whole script on the CPU path, as a dry run), WHEELS (wheels), PYTHON (python3), OUT (a temp folder).
set -euo pipefail

cd "$(dirname "$0")/.."
GPU_SECONDS=${GPU_SECONDS:-120}
CPU_SECONDS=${CPU_SECONDS:-40}
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-wheels}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/charlstm-gpu-check.XXXXXX")}
DEPS="torch numpy safetensors click tqdm tomli_w"

# -- 1) a Python that has torch (with CUDA when DEVICE=cuda) and the dependencies ----------------
usable() {
    "$1" -c "import importlib, sys
for m in '$DEPS'.split(): importlib.import_module(m)
import torch
sys.exit(0 if '$DEVICE' != 'cuda' or torch.cuda.is_available() else 1)" 2>/dev/null
}
if ! usable "$PY"; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check: $PY lacks torch (CUDA) or a dependency, and there is no $WHEELS/ folder" \
             "to install them from; see the top of $0" >&2
        exit 2
    fi
    echo "gpu_check: installing from $WHEELS/ into .venv-gpu (no network)"
    "$PY" -m venv --system-site-packages .venv-gpu
    PY=.venv-gpu/bin/python
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" torch numpy safetensors click \
        tqdm tomli-w
    usable "$PY" || { echo "gpu_check: torch from $WHEELS/ sees no CUDA GPU" >&2; exit 2; }
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# -- 2) the corpus ---------------------------------------------------------------------------------
if [ -z "${CHARLSTM_DATA:-}" ]; then
    for d in shared/data ../shared/data data; do
        if [ -f "$d/tinyshakespeare.txt" ]; then CHARLSTM_DATA=$(cd "$d" && pwd); break; fi
    done
fi
if [ ! -f "${CHARLSTM_DATA:-.}/tinyshakespeare.txt" ]; then
    echo "gpu_check: tinyshakespeare.txt not found; set CHARLSTM_DATA to its folder" >&2
    exit 2
fi
export CHARLSTM_DATA

"$PY" - "$DEVICE" <<'EOF'
import sys, torch
print(f"gpu_check: torch {torch.__version__}", end="")
if sys.argv[1] == "cuda":
    print(f", {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()} (enabled: {torch.backends.cudnn.enabled})", end="")
print(f", {torch.get_num_threads()} CPU threads")
EOF

# -- 3) the same run on both paths -----------------------------------------------------------------
# 2 × 512 LSTM, 64 streams of 256 characters. Weight drop is off: it rebuilds the recurrent weights
# every step, which takes cuDNN off its fused path (dropout between layers stays on).
FLAGS=(--dataset tinyshakespeare --batch-size 64 --seq-len 256 --embedding-size 128
       --hidden-size 512 --num-layers 2 --dropout 0.2 --embedding-dropout 0.1 --weight-drop 0
       --lr 2e-3 --schedule cosine --warmup-steps 50 --ema 0.999 --eval-interval 100
       --early-stopping 0 --sample-every 0 --no-progress --force)

summary() {  # characters/s over the training time (evaluations included) and the best validation loss
    "$PY" - "$1" "$2" <<'EOF'
import json, sys
from charlstm.runs import checkpoint as ck
from charlstm.runs.folder import checkpoint_path
label, run = sys.argv[1], sys.argv[2]
last = ck.read_checkpoint(checkpoint_path(run, "last")).meta
best = ck.read_checkpoint(checkpoint_path(run, "best")).meta["metrics"]
m = last["metrics"]
speed = m["chars"] / max(m["elapsed"], 1e-9)
print(f"gpu_check: {label}: {speed:,.0f} characters/s over {m['elapsed']:.0f} s ({last['step']} steps, "
      f"{m['device']}, {m['precision']}); best validation loss {best['val_loss']:.4f} nats/char "
      f"({best['val_loss'] / 0.6931471805599453:.3f} bits/char)")
print(json.dumps({"path": label, "chars_per_s": round(speed), "elapsed_s": m["elapsed"],
                  "steps": last["step"], "val_loss": best["val_loss"]}))
EOF
}

if [ "$DEVICE" = cuda ]; then
    timeout $((GPU_SECONDS + 120)) "$PY" -m charlstm train "${FLAGS[@]}" --out "$OUT/gpu" \
        --device cuda --precision bf16 --max-time "$GPU_SECONDS"
    summary "GPU (bf16 autocast, cuDNN)" "$OUT/gpu"
fi
timeout $((CPU_SECONDS + 180)) "$PY" -m charlstm train "${FLAGS[@]}" --out "$OUT/cpu" \
    --device cpu --precision auto --max-time "$CPU_SECONDS"
summary "CPU path, same run for ${CPU_SECONDS} s" "$OUT/cpu"
echo "gpu_check: run folders in $OUT"
