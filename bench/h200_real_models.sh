#!/usr/bin/env bash
# The real-model validation on the lent H200, one model per call (each under the device's
# 10-minute limit). Calibration and validation run in the same call, pinned to the same cores:
# the host-bound terms differ between lent machines, and by up to 1.7x within one over minutes
# (docs/validation.md, "The host's two speeds").
#   bash bench/h200_real_models.sh MODEL [PROMPTS] [CPUS] [STYLES]
# MODEL: olmoe-1b-7b | deepseek-v2-lite | qwen3-30b-a3b | mixtral-8x7b
# PROMPTS: one or more, e.g. "256 4000" (OLMoE has 4,096 positions: prompt + steps must fit);
# a row that would not fit the GPU's free memory (OLMoE at B=64 and 4,000 tokens) is left out
# and listed (--skip-unfit), so one model build serves every prompt.
# STYLES: default "offload-grouped offload" (the grouped executor first: it is copy-bound where
# copies happen, so the projection holds there within a few percent; the per-expert loop is
# host-bound). "offload-graphs offload-grouped" adds the graphed executor (non-expert part
# replayed from piecewise CUDA graphs); its GPU tests passed on the H200 (2026-12-02), but one
# capture failed there over a static cache of 264 tokens (tests/test_graphs.py's length test),
# so not yet the default.
# BASE=1 also re-measures the base profile's copy, CPU-expert and host terms on the pinned
# cores (simmoe calibrate --cpus): the CPU-miss rows need the run's torch threads, and the
# pageable copies the run's cores. BASE=quick does it with `calibrate --quick` (copies up to
# 64 MiB, CPU experts at 1-256 tokens, 10 trials: 49 s on a GPU; an OLMoE expert is 12.6 MB,
# a CPU miss at B=64 at most 64 tokens). PROFILE=FILE starts from that profile instead of the shipped
# one (a profile an earlier call calibrated) and skips the engine calibration.
# DEADLINE=S (default 570): seconds from the start after which nothing new starts; each
# style's validation (one model build, every prompt) gets an equal share of the time left as
# its --max-seconds (BUILD_S, default 75, the build's part of it), so its rows that finished
# come back; a validation still running at the deadline is cut (timeout). STEPS=N overrides the
# scenario's decode steps. ROW_BUDGET=S stops a row's steps once they took S seconds (after
# the warm-up and 3 timed steps; OLMoE's 24 rows at prompt 256: ~127 s projected, ~82 s with 8).
# INSITU=1 (with PROFILE) has validate time the in situ terms on the model it builds for the
# rows (validate --in-situ: whole steps, the executor's pools, the router read, its CPU experts)
# and project with them: one build, no engine calibration (DeepSeek-V2-Lite's 119 s build once).
# TABLES=1 (with PROFILE and INSITU=1) first times the styles' engine tables on the first
# decoder layers (calibrate engine without --in-situ: no whole-model build; TABLES_S seconds,
# default 90) and merges them into the profile, so that a model with no table for a style
# (Qwen3-30B-A3B's offload-grouped) is calibrated and validated on one build of the whole model.
# SCENARIO=FILE replaces the model's scenarios/validate_*_model.yaml (a subset of its policies
# or batch sizes, e.g. the copy-bound rows alone with EXTRA=--live-timeline).
# EXTRA="--tiny --device cpu" checks the script on a CPU (decisions
# only; with PROFILE=simulator/profiles/h200.json so that nothing is calibrated).
# Times measured 2026-12-02 (OLMoE, pinned 2-9): engine calibration of two styles + in situ
# 90-125 s; 24 rows of one style 150-300 s (12 steps: ~210 s); the base calibration is untimed.
# Writes under results/h200/MODEL: the engine run, the merged profile, validate-STYLE (each
# with routing.npz: `simmoe validate DIR --reproject` projects them again later); with OUT set
# (the device's), $OUT/MODEL.tgz of all of it, refreshed after each validation (one file: the
# device brings back at most 8).
set -uo pipefail
model=${1:?model}
prompts=${2:-256}
cpus=${3:-2-9}
styles=${4:-offload-grouped offload}
deadline=${DEADLINE:-570}
t0=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - t0) )); }
root=results/h200
out=$root/$model
mkdir -p "$out"
scenario=${SCENARIO:-scenarios/validate_${model%%-*}_model.yaml}
if [ -n "${PROFILE:-}" ]; then
  cp "$PROFILE" "$out/h200.json"
  if [ "${TABLES:-0}" = 1 ]; then   # the styles' tables on the first layers only, no whole-model build
    style_flags=$(for s in $styles; do printf -- "--style %s " "$s"; done)
    timeout "$(left)" python -m simmoe calibrate engine --model "$model" $style_flags --cpus "$cpus" \
        --max-seconds "${TABLES_S:-90}" -o "$out/engine.json" ${EXTRA:-} \
      && python -m simmoe calibrate engine-merge "$out/engine.json" -p "$out/h200.json"
  fi
else
  if [ "${BASE:-0}" = 1 ] || [ "${BASE:-0}" = quick ]; then
    base_flags=$([ "$BASE" = quick ] && echo "--quick" || echo "-n 30")
    timeout "$(left)" python -m simmoe calibrate --cpus "$cpus" -m "$model" $base_flags -o "$out/h200.json" --name h200 \
      || cp simulator/profiles/h200.json "$out/h200.json"
  else
    cp simulator/profiles/h200.json "$out/h200.json"
  fi
  style_flags=$(for s in $styles; do printf -- "--style %s " "$s"; done)
  timeout "$(left)" python -m simmoe calibrate engine --model "$model" $style_flags --in-situ \
      --cpus "$cpus" --max-seconds 100 -o "$out/engine.json" \
    && python -m simmoe calibrate engine-merge "$out/engine.json" -p "$out/h200.json"
fi
n_styles=$(echo $styles | wc -w)
prompt_list=$(echo $prompts | tr ' ' ',')
for style in $styles; do
  sed -e "s/style: offload,/style: $style,/" ${STEPS:+-e "s/steps: [0-9]*,/steps: $STEPS,/"} "$scenario" \
      > "$out/scenario-$style.yaml"
  [ "$(left)" -gt 90 ] || { echo "deadline: $style not run"; n_styles=$((n_styles - 1)); continue; }
  # one model build per style, every prompt in it; the style's share of the time left
  # (--max-seconds counts from the command's start, the model's build included: 97-104 s for
  # OLMoE and DeepSeek-V2-Lite on the H200), less the longest row and the projections after
  # the rows (~40 s: a 256-prompt run cut at 119 s of rows lost every row to the deadline,
  # 2026-12-02). At the deadline timeout's SIGTERM stops the rows and the ones done are kept.
  share=$(( $(left) / n_styles - ${TAIL_S:-60} ))
  [ "$share" -gt 30 ] || share=30
  echo "=== $style prompts $prompt_list ($(left) s left, rows for at most $share s)"
  timeout "$(left)" python -m simmoe validate "$out/scenario-$style.yaml" --executor model --prompt "$prompt_list" \
      --cpus "$cpus" -p "$out/h200.json" -o "$out/validate-$style" --max-seconds "$share" --skip-unfit \
      ${ROW_BUDGET:+--row-budget "$ROW_BUDGET"} ${INSITU:+--in-situ} ${EXTRA:-}
  n_styles=$((n_styles - 1))
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/$model.tgz" -C "$root" "$model"; fi
done
