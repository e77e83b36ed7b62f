#!/usr/bin/env bash
# Issue 24, quantized weights on one H100 (or H200) in one device call of at most ~9 minutes:
# `editor bench engine` at Dream-7B's exact shapes (random weights, bf16, CUDA graphs on), blocks of
# 32, 4 tokens/step, 256 masked tokens in a 512-token canvas, batch 1, 8 and 16, once per weight
# setting: none (the baseline, same call), int8 (torchao weight-only) and fp8 (torchao float8
# weights + dynamic float8 activations). Each setting is its own process under its own time limit,
# so one that fails (torchao missing, a kernel the card lacks, a graph that will not capture) costs
# only its own slot; a failed setting is retried once without CUDA graphs at batch 1 and 16.
#
# Run from the repository root on the device machine:  OUT=... bash scripts/gpu-engine-bench.sh
# Writes $OUT/engine-<setting>.json (figures), $OUT/engine-<setting>.log, $OUT/env.txt,
# $OUT/fill-tiny-<setting>.json (the load path's smoke test) and $OUT/engine-none-rule-off.json
# (batch 1 with the sampler's no-repeat rule off, when time is left).
#
# The device image has torch but neither torchao nor some of editor's own dependencies. Carry them
# as wheels in .whl/ (name .whl in the call's `carry`); this script installs whatever .whl/ holds:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.18.0
# (plus whichever of editor's dependencies earlier calls carried). Budget: the three settings take
# ~1-2 minutes each on an H100 (model build + 3 batches x (warm-up + 1 timed run)). Worst case, every
# step at its limit: 2 x 45 (smoke fills) + 3 x 120 + one 55 s retry that starts before 420 s = 505 s;
# later retries and the closing rule-off run start only before RETRY_UNTIL_S.
set -uo pipefail

: "${OUT:?set OUT to the folder that comes back}"
PER_SETTING_S=${PER_SETTING_S:-120}  # 3 x 120 s, and retries only while the call has time left
RETRY_UNTIL_S=${RETRY_UNTIL_S:-420}  # no eager retry starts after this many seconds of the script
PYTHON=${PYTHON:-python3}
# A dry run of this script's logic on a CPU: MODEL=tiny DEVICE=cpu DTYPE=float32 TOKENS=8 CONTEXT=24
MODEL=${MODEL:-dream-7b} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} TOKENS=${TOKENS:-256} CONTEXT=${CONTEXT:-512}
export PYTHONUNBUFFERED=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-0}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "warning: wheels in .whl/ did not install" >&2
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

"$PYTHON" - >"$OUT/env.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import torchao
    print("torchao", torchao.__version__)
except Exception as error:  # reported, not fatal: the baseline still runs
    print("torchao missing:", error)
EOF
cat "$OUT/env.txt"

# Smoke test of the serving load path (read on the CPU, quantized block by block on the way to the
# GPU, then CUDA graphs) with the bundled model: a fill of examples/letter.txt per setting, ~10 s each.
for setting in int8 fp8; do
    timeout 45 "$PYTHON" -m editor fill examples/letter.txt --model tiny --device "$DEVICE" --quantize "$setting" \
        --seed 1 --json >"$OUT/fill-tiny-$setting.json" 2>"$OUT/fill-tiny-$setting.err" \
        && echo "fill with $setting weights: ok" || echo "fill with $setting weights: FAILED (see fill-tiny-$setting.err)"
done

COMMON=(bench engine --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --schedule blocks --block-length 32
        --tokens "$TOKENS" --context "$CONTEXT" --tokens-per-step 4 --naive-batches none --repeats 1)

for setting in none int8 fp8; do
    echo "== $setting ($(date -u +%H:%M:%S))"
    timeout "$PER_SETTING_S" "$PYTHON" -m editor "${COMMON[@]}" --batch 1,8,16 --quantize "$setting" \
        --json "$OUT/engine-$setting.json" 2>&1 | tee "$OUT/engine-$setting.log"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ] && [ "$SECONDS" -lt "$RETRY_UNTIL_S" ]; then
        echo "== $setting failed (exit $status); again without CUDA graphs, batch 1 and 16"
        timeout 55 "$PYTHON" -m editor "${COMMON[@]}" --batch 1,16 --quantize "$setting" --cuda-graphs 0 \
            --json "$OUT/engine-$setting-eager.json" 2>&1 | tee "$OUT/engine-$setting-eager.log"
    fi
done
# The no-repeat rule's cost on the GPU step (default no_repeat_ngram 3 in the runs above; the H200
# figures of results/engine-bench.md predate the rule): bf16, batch 1, the rule off.
if [ "$SECONDS" -lt "$RETRY_UNTIL_S" ]; then
    echo "== none, batch 1, no_repeat_ngram 0 ($(date -u +%H:%M:%S))"
    timeout 60 "$PYTHON" -m editor "${COMMON[@]}" --batch 1 --quantize none --no-repeat-ngram 0 \
        --json "$OUT/engine-none-rule-off.json" 2>&1 | tee "$OUT/engine-none-rule-off.log"
fi
echo "== done ($(date -u +%H:%M:%S))"
