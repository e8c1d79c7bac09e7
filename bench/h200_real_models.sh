#!/usr/bin/env bash
# The real-model validation on the lent H200, one model per call (each under the device's
# 10-minute limit). Calibration and validation run in the same call, pinned to the same cores:
# the host-bound terms differ between lent machines, and by up to 1.7x within one over minutes
# (docs/validation.md, "The host's two speeds").
#   bash bench/h200_real_models.sh MODEL [PROMPTS] [CPUS] [STYLES]
# MODEL: olmoe-1b-7b | deepseek-v2-lite | qwen3-30b-a3b | mixtral-8x7b
# STYLES: default "offload-grouped offload" (the grouped executor first: it is copy-bound where
# copies happen, so the projection holds there within ~1%; the per-expert loop is host-bound).
# "offload-graphs offload-grouped" adds the graphed executor (non-expert part replayed from
# piecewise CUDA graphs); its GPU tests passed on the H200 (2026-12-02), but one capture failed
# there over a static cache of 264 tokens (tests/test_graphs.py's length test), so not yet the default.
# BASE=1 also re-measures the base profile's copy, CPU-expert and host terms on the pinned
# cores (simmoe calibrate --cpus): the CPU-miss rows need the run's torch threads, and the
# pageable copies the run's cores. Times measured 2026-12-02 (OLMoE, pinned 2-9): engine
# calibration of both styles + in situ 72 s (45 s budget + in situ), 24 rows of one style
# 210-260 s; the base calibration of one model is not yet timed.
# Writes under ${OUT:-results/h200}/MODEL: the engine run, the merged profile, the validations.
set -euo pipefail
model=${1:?model}
prompts=${2:-256}
cpus=${3:-2-9}
styles=${4:-offload-grouped offload}
out=${OUT:-results/h200}/$model
mkdir -p "$out"
scenario=scenarios/validate_${model%%-*}_model.yaml
if [ "${BASE:-0}" = 1 ]; then
  python -m simmoe calibrate --cpus "$cpus" -m "$model" -n 30 -o "$out/h200.json" --name h200
else
  cp simulator/profiles/h200.json "$out/h200.json"
fi
style_flags=$(for s in $styles; do printf -- "--style %s " "$s"; done)
python -m simmoe calibrate engine --model "$model" $style_flags --in-situ \
    --cpus "$cpus" --max-seconds 60 -o "$out/engine.json"
python -m simmoe calibrate engine-merge "$out/engine.json" -p "$out/h200.json"
for style in $styles; do
  sed "s/style: offload,/style: $style,/" "$scenario" > "$out/scenario-$style.yaml"
  python -m simmoe validate "$out/scenario-$style.yaml" --executor model --prompt "$prompts" --cpus "$cpus" \
      -p "$out/h200.json" -o "$out/validate-$style"
done
