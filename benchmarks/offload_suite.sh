#!/usr/bin/env bash
# CPU-offload measurements on one H200, one process per configuration (peak host memory is per process):
# offload rates, a 4-layer Llama-3-8B-shaped model at 128K tokens without and with offload, and the
# true 32-layer Llama-3-8B at 128K with the optimizer offloaded. Logs and JSON lines go to $OUT
# (default ./offload_out); a table is printed last.
#
#     bash benchmarks/offload_suite.sh            # from the repository root
#     SEQ=262144 LAYERS=32 OFFLOAD=all bash benchmarks/offload_suite.sh one   # one configuration
set -u
OUT=${OUT:-./offload_out}
mkdir -p "$OUT" /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/dimshard  # the repository root is the dimshard package
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
JSON="$OUT/offload.jsonl"

run() {  # run <seconds> <name> <benchmark flags...>
  local limit=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S)): $*" | tee -a "$OUT/suite.log"
  timeout "$limit" python3 benchmarks/offload_mfu.py --json_out "$JSON" --compile_dir "/tmp/offload_$name" "$@" \
    2>&1 | tee -a "$OUT/suite.log" | tail -4
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/suite.log"
}

if [ "${1:-}" = "one" ]; then
  run 560 "seq${SEQ}_${OFFLOAD}" --num_layers "$LAYERS" --seq_len "$SEQ" --offload "$OFFLOAD" --recompute layer \
    --warmup 0 --steps 1
  exit 0
fi

python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/suite.log"
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$OUT/suite.log"
timeout 60 python3 -m dimshard.planner.cost.offload_profile --iters 5 2>&1 | tee "$OUT/offload_rates.json"
run 100 l4_none --num_layers 4 --seq_len 131072 --offload none --recompute layer --warmup 1 --steps 2
run 110 l4_all --num_layers 4 --seq_len 131072 --offload all --recompute layer --warmup 1 --steps 2
run "${L32_LIMIT:-300}" l32_optimizer --num_layers 32 --seq_len 131072 --offload optimizer --recompute layer \
  --warmup 1 --steps "${L32_STEPS:-1}"
# The longest sequence: the auto policy chooses recompute and how many layer inputs go to the host,
# within the GPU budget and a host budget that leaves the process and the OS ~12 GB of 128 GiB.
LEFT=$(( ${TOTAL_S:-530} - SECONDS ))
if [ "$LEFT" -gt 150 ]; then
  run "$LEFT" l32_long --num_layers 32 --seq_len "${LONG_SEQ:-196608}" --policy auto --recompute auto --offload auto \
    --memory_budget_gb 130 --host_memory_budget_gb 125 --warmup 0 --steps 1
else
  echo "=== l32_long skipped: ${LEFT}s left" | tee -a "$OUT/suite.log"
fi
echo "| layers | seq | offload | update on | step s | optimizer s | tokens/s | MFU | GPU peak GiB | host peak GiB | host held GiB (opt + act) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
grep -h '^| ' "$OUT/suite.log" | grep -v '^| layers'
