#!/usr/bin/env bash
# The copy-order and idle-GPU probes on the lent GPU, in one call (~3 min), their files packed
# into one tarball (the device brings back at most 8 files):
#   bash bench/h200_probes.sh            -> $OUT/probes.tgz (or results/probes.tgz)
# - probe_copy_fifo.py: does a small compute-stream copy wait behind the copy stream's queue,
#   and does the grouped call's index upload, issued before or after its wait, run ahead of the
#   next layer's prefetch (docs/validation.md, ninth session);
# - probe_gpu_after_idle.py: a layer's GPU work after the SMs idled behind its copies;
# - probe_live_timeline.py --upload-order: OLMoE's first 6 layers at B=64 (and B=4), dedup, LRU,
#   LRU + prefetch with the new upload order and with the old, CUPTI timelines.
# Then the rows: SCENARIO=scenarios/validate_olmoe_copybound.yaml PROFILE=simulator/profiles/h200.json
# EXTRA=--live-timeline bash bench/h200_real_models.sh olmoe-1b-7b 256 2-9 offload-grouped
set -uo pipefail
dest=${OUT:-results}
work=$(mktemp -d)/probes
mkdir -p "$work" "$dest"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 40 python bench/probe_copy_fifo.py -o "$work/probe-copy-fifo.json"
timeout 60 python bench/probe_gpu_after_idle.py -o "$work/probe-gpu-after-idle.json"
timeout 100 python bench/probe_live_timeline.py --out "$work/plt64" --upload-order --layers 6 --batch 64 2>&1 | grep -v USDT
[ "${B4:-1}" = 1 ] && timeout 60 python bench/probe_live_timeline.py --out "$work/plt4" --upload-order --layers 6 \
    --batch 4 --steps 10 2>&1 | grep -v USDT
tar czf "$dest/probes.tgz" -C "$(dirname "$work")" probes
echo "wrote $dest/probes.tgz"
