#!/usr/bin/env bash
# The live serving validation on the lent H200, one model per call (each within the device's
# 10-minute limit; sized for about 6-8 minutes: OLMoE builds in ~45 s, Qwen3 in ~120 s):
#   bash bench/h200_serving.sh MODEL [RATES] [CPUS] [more simmoe validate flags]
# MODEL: olmoe-1b-7b (scenarios/serving_olmoe_live.yaml, 4 policies) | qwen3-30b-a3b
# (scenarios/serving_qwen3_live.yaml, 3 policies); RATES default 0.5,1,2 requests/s; CPUS
# default 2-9 (pinned as bench/h200_real_models.sh is: a host-bound step moves when its
# thread moves between cores). Writes ${OUT:-results/h200}/serving-MODEL/validation.json and
# validation.png (live vs projected per-request latency per rate and policy), and the log.
# CPU check of the same commands (decisions only):
#   bash bench/h200_serving.sh olmoe-1b-7b 1,4 0-1 --tiny --device cpu
set -euo pipefail
model=${1:?model: olmoe-1b-7b or qwen3-30b-a3b}
rates=${2:-0.5,1,2}
cpus=${3:-2-9}
shift $(( $# < 3 ? $# : 3 ))
case "$model" in
  olmoe-1b-7b) scenario=scenarios/serving_olmoe_live.yaml ;;
  qwen3-30b-a3b) scenario=scenarios/serving_qwen3_live.yaml ;;
  *) echo "error: command line: MODEL: $model: use olmoe-1b-7b or qwen3-30b-a3b" >&2; exit 2 ;;
esac
root=${OUT:-results/h200}
mkdir -p "$root"
start=$(date +%s)
python -m simmoe validate "$scenario" --executor model --rates "$rates" --cpus "$cpus" -p h200 \
    -o "$root/serving-$model" "$@" 2>&1 | tee "$root/serving-$model.log"
echo "serving validation of $model: $(( $(date +%s) - start )) s" | tee -a "$root/serving-$model.log"
