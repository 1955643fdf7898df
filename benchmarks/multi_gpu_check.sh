#!/usr/bin/env bash
# The parallel suite on real GPUs with NCCL. Usage, from the repository root on a machine with
# 2 or 4 GPUs (dimshard importable, e.g. PYTHONPATH pointing at a folder holding a `dimshard` link):
#
#   NGPUS=4 bash benchmarks/multi_gpu_check.sh [work_dir]
#
# 1. benchmarks/multi_gpu_check.py: every layout (dp, tp, tp_sp, tp_batch, auto, tp x dp with
#    ZeRO-1, and sequence-split attention when its policy is given in EXTRA_CASES) against one
#    process, fp32 and bf16, with the collective-order check on; on 2 GPUs and on NGPUS.
# 2. train.py end to end on the demo's mini model: 20 steps under each layout with equal losses,
#    a checkpoint, a resume under the same plan (losses equal to the uninterrupted run), a merge,
#    and a resume of the merged checkpoint under another plan.
# Prints PASS/FAIL per stage and exits non-zero if any stage failed. CPU rehearsal of the same
# script: NGPUS=2 BACKEND=gloo bash benchmarks/multi_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-4}
BACKEND=${BACKEND:-nccl}
EXTRA_CASES=${EXTRA_CASES:-}
WORK=${1:-/tmp/dimshard_multi_gpu_check}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 DIMSHARD_DEBUG_COLLECTIVES=1
EXAMPLE=examples/llama3_128k
STEPS=${STEPS:-20}
SEQ=128
mkdir -p "$WORK"
status=0
stage() { echo "== $*"; }
verdict() { if [ "$1" -eq 0 ]; then echo "PASS $2"; else echo "FAIL $2"; status=1; fi; }
launch() { python3 -m torch.distributed.run --standalone --nproc_per_node "$@"; }

cases="dp,tp,tp_sp,tp_batch,auto,tp_x_dp_zero1,tp_sp_x_dp_zero1${EXTRA_CASES:+,$EXTRA_CASES}"
for n in $(printf '%s\n' 2 "$NGPUS" | sort -un); do
  stage "equivalence on $n ranks ($BACKEND)"
  launch "$n" benchmarks/multi_gpu_check.py --backend "$BACKEND" --cases "$cases" \
    --work_dir "$WORK/equivalence_$n" --json_out "$WORK/equivalence.jsonl"
  verdict $? "equivalence on $n ranks"
done

stage "train.py end to end ($STEPS steps per layout)"
python3 "$EXAMPLE/demo_data.py" --output_dir "$WORK/corpus" --max_chars 400000 --vocab_size 512 &&
python3 "$EXAMPLE/bookcorpus.py" --data_path_or_name "$WORK/corpus/corpus.jsonl" \
  --tokenizer_path_or_name "$WORK/corpus/tokenizer" --save_path "$WORK/data" --sequence_length $SEQ &&
python3 "$EXAMPLE/create_mini_model.py" --model_id "$EXAMPLE/configs/llama3_8b.json" --output_id "$WORK/model" \
  --num_hidden_layers 2 --hidden_size 128 --intermediate_size 256 --num_attention_heads 8 \
  --num_key_value_heads 4 --vocab_size 512 --tokenizer_path "$WORK/corpus/tokenizer"
verdict $? "mini model and data"

train() {  # train TAG NPROC [flags...]: one run with its own folders
  local tag=$1 nproc=$2; shift 2
  launch "$nproc" "$EXAMPLE/train.py" --model_id "$WORK/model" --dataset_path "$WORK/data" --name "$tag" \
    --compile_dir "$WORK/runs/$tag/compile" --checkpoint_dir "$WORK/runs/$tag/checkpoints" \
    --dump_dir "$WORK/runs/$tag/dump" --dtype fp32 --lr 2e-3 --lr_schedule constant --log_interval 1 "$@"
}
# Every layout trains on the same global batch of 4 sequences: micro-batch x data-parallel copies.
half=$((NGPUS / 2))
declare -A LAYOUTS=(
  [dp]="$NGPUS --plan_ngpus 1 --runtime_ngpus $NGPUS --policy dp --micro_batch_size $((4 / NGPUS))"
  [tp]="$NGPUS --plan_ngpus $NGPUS --runtime_ngpus $NGPUS --policy tp --micro_batch_size 4"
  [tp_sp]="$NGPUS --plan_ngpus $NGPUS --runtime_ngpus $NGPUS --policy tp_sp --micro_batch_size 4"
  [tp_x_dp]="$NGPUS --plan_ngpus $half --runtime_ngpus $NGPUS --policy tp_sp --micro_batch_size 2"
  [auto]="$NGPUS --plan_ngpus $NGPUS --runtime_ngpus $NGPUS --policy auto --hw_profile h200 --micro_batch_size 4"
)
for tag in "${!LAYOUTS[@]}"; do
  # shellcheck disable=SC2086
  train "layout_$tag" ${LAYOUTS[$tag]} --max_steps "$STEPS" --checkpoint_interval "$STEPS"
  verdict $? "train.py layout $tag"
done
# Interrupted at half the steps and resumed under the same plan; then merged and resumed under another plan.
# shellcheck disable=SC2086
train resumed ${LAYOUTS[tp]} --max_steps $((STEPS / 2)) --checkpoint_interval $((STEPS / 2)) &&
train resumed ${LAYOUTS[tp]} --max_steps "$STEPS" --checkpoint_interval "$STEPS" --resume_path auto
verdict $? "train.py stop and resume"
python3 tools/ckpt_merger.py --ckpt_dir "$WORK/runs/resumed/checkpoints/step_$((STEPS / 2))" \
  --output_fname "$WORK/merged.ckpt" --model_config "$WORK/model" &&
train other_plan ${LAYOUTS[tp_x_dp]} --max_steps "$STEPS" --resume_path "$WORK/merged.ckpt"
verdict $? "merge and resume under another plan"

stage "losses"
python3 - "$WORK" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path

work, steps = Path(sys.argv[1]), int(sys.argv[2])

def losses(tag):
    rows = [json.loads(l) for l in (work / "runs" / tag / "dump" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

ref = losses("layout_dp")
bad = 0
for run in sorted(p.name for p in (work / "runs").iterdir()):
    got = losses(run)
    common = sorted(set(got) & set(ref))
    worst = max((abs(got[s] - ref[s]) / abs(ref[s]) for s in common), default=float("nan"))
    ok = bool(common) and worst <= 1e-3 and (run != "resumed" or set(got) >= set(range(1, steps + 1)))
    bad += not ok
    print(f"{run:<16} steps {min(common, default=0)}-{max(common, default=0)}  worst rel loss diff {worst:.2e}  {'ok' if ok else 'FAIL'}")
sys.exit(1 if bad else 0)
EOF
verdict $? "equal losses across layouts, resume and other plan"
exit $status
