#!/usr/bin/env bash
# The demo model v2 on a CPU, resumable across working sessions (docs/results/demo_v2_training.md).
#
#   bash analysis/demo/train_v2_cpu.sh            # start or continue; run it in the background from the repo root
#
# Work folder: $DEMO_V2_DIR (default ~/demo_v2), outside the work tree: the full checkpoints (bit-for-bit resume),
# the compact one and every phase's model folder. The distilled text encoder and a copy of the compact checkpoint
# are kept in assets/demo_v2_training/ (copy $DEMO_V2_DIR/checkpoint.safetensors there before a commit), so a lost
# machine resumes phase B from the last committed checkpoint.
# One thread: on a 2-core machine with other jobs, two OpenMP threads run several times slower (bench_training.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
D=${DEMO_V2_DIR:-$HOME/demo_v2}
KEEP=assets/demo_v2_training
ENCODER=$KEEP/encoder
COMPACT=$D/checkpoint.safetensors
COMMON=(--data v2 --coco-share 0.3 --offset-noise 0.1 --batch-size 32 --device cpu --checkpoint-every 250)
PHASE_B_STEPS=24000
mkdir -p "$D"
[ -f "$COMPACT" ] || [ ! -f "$KEEP/checkpoint.safetensors" ] || cp "$KEEP/checkpoint.safetensors" "$COMPACT"

# The distilled text encoder (15 min on one thread), unless kept.
[ -f "$ENCODER/text_encoder/model.safetensors" ] ||
    python -m analysis.demo.text_encoder --out "$ENCODER" --steps 1000 --data v2
if [ ! -f "$COMPACT" ] || [ -d "$D/phaseB-work" ]; then
    # Phase A: the bundled v1 UNet learns to read the new encoder on generic data only, so that its 8 photos fade.
    [ -f "$D/phaseA/training.json" ] ||
        python -m analysis.demo.train --init-from assets/demo_model --text-encoder "$ENCODER" "${COMMON[@]}" \
            --photo-share 0 --steps 500 --lr 3e-4 --warmup 50 --ema-decay 0.995 --resume \
            --out "$D/phaseA" --work-dir "$D/phaseA-work"
fi
# Phase B: the v2 data, 24 photos at a total share of 0.1 with LAION-like duplication 4/2/1, in 30-minute chunks,
# each of which leaves a model folder to probe.
START=(--text-encoder "$ENCODER")
[ -d "$D/phaseA" ] && START+=(--init-from "$D/phaseA")
while true; do
    python -m analysis.demo.train "${START[@]}" "${COMMON[@]}" --photo-share 0.1 \
        --photo-weights 4 4 4 4 2 2 2 2 2 2 2 2 1 1 1 1 1 1 1 1 1 1 1 1 \
        --steps $PHASE_B_STEPS --lr 3e-4 --warmup 200 --ema-decay 0.999 --resume --max-minutes 30 \
        --compact "$COMPACT" --out "$D/phaseB" --work-dir "$D/phaseB-work"
    python -c "import json, sys; sys.exit(json.load(open('$D/phaseB/training.json'))['steps'] < $PHASE_B_STEPS)" && break
done
