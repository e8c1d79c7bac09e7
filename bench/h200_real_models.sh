#!/usr/bin/env bash
# The real-model validation on the lent H200, one model per call (each under the device's
# 10-minute limit; times measured 2026-12-01: OLMoE calibrate 66 s, 24 rows 235 s).
#   bash bench/h200_real_models.sh MODEL [PROMPTS] [CPUS]
# MODEL: olmoe-1b-7b | deepseek-v2-lite | qwen3-30b-a3b | mixtral-8x7b
# Writes under ${OUT:-results/h200}: the engine run, the merged profile, the validation.
# Calibration and validation run pinned to the same cores (CPUS, default 2-9): a host-bound
# eager step moves by a quarter when its thread moves between cores (docs/validation.md).
set -euo pipefail
model=${1:?model}
prompts=${2:-256}
cpus=${3:-2-9}
out=${OUT:-results/h200}/$model
mkdir -p "$out"
scenario=scenarios/validate_${model%%-*}_model.yaml
python -m simmoe calibrate engine --model "$model" --style offload --style offload-grouped --in-situ \
    --cpus "$cpus" --max-seconds 90 -o "$out/engine.json"
cp simulator/profiles/h200.json "$out/h200.json"
python -m simmoe calibrate engine-merge "$out/engine.json" -p "$out/h200.json"
for style in offload offload-grouped; do
  sed "s/style: offload,/style: $style,/" "$scenario" > "$out/scenario-$style.yaml"
  python -m simmoe validate "$out/scenario-$style.yaml" --executor model --prompt "$prompts" --cpus "$cpus" \
      -p "$out/h200.json" -o "$out/validate-$style"
done
