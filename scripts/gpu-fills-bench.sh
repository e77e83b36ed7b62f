#!/usr/bin/env bash
# The fill quality suite (`editor bench fills`) on one lent GPU, several models and sampler settings
# in one call, all on the same dumped documents (issue 19: a retrained adapter against the shipped
# one; issue 24: schedules that commit several tokens a step, with the quality they keep).
#
# Run after scripts/gpu-adapter-train.sh on the same warm machine (it reuses /tmp/site and the
# staged files), or carry .whl and the documents yourself:
#   DOCS=.carry/docs42.json VARIANTS="shipped|editor/bundled/default| new|/tmp/run8/adapter|" \
#     bash scripts/gpu-fills-bench.sh
# VARIANTS: space-separated name|model|extra options (options joined with commas).
# Writes $OUT/fills-bench.tar.gz (one JSON per variant) and $OUT/fills-bench.log.
set -uo pipefail

: "${OUT:?set OUT to the folder that comes back}"
DOCS=${DOCS:-/tmp/adapter-stage/docs42.json}
PER_VARIANT_S=${PER_VARIANT_S:-150}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
if [ ! -d /tmp/site ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/fills-bench
for variant in $VARIANTS; do
    IFS='|' read -r name model extra <<<"$variant"
    started=$(date +%s)
    # shellcheck disable=SC2086
    timeout "$PER_VARIANT_S" python3 -m editor bench fills --model "$model" --device cuda \
        --documents "$DOCS" --json "/tmp/fills-bench/fills-$name.json" ${extra//,/ } \
        >"/tmp/fills-bench/fills-$name.log" 2>&1
    echo "$name: rc $? in $(( $(date +%s) - started )) s" | tee -a "$OUT/fills-bench.log"
    python3 - "/tmp/fills-bench/fills-$name.json" <<'EOF' | tee -a "$OUT/fills-bench.log"
import json, sys
try:
    print(json.dumps(json.load(open(sys.argv[1]))["summary"]))
except Exception as error:
    print("no summary:", error)
EOF
done
tar -czf "$OUT/fills-bench.tar.gz" -C /tmp fills-bench
