#!/usr/bin/env bash
# The GPU check, for one H200 (any CUDA GPU with bf16): under 5 minutes, then a short table.
#   1. benchmarks/bench_moe.py in bf16 at d_model 768, d_expert 3072, 16384 tokens, E in {8, 64}, k in {1, 2}:
#      ours vs dense vs transformers' Mixtral block (eager, grouped_mm, batched_mm) vs the study's loop layer
#   2. benchmarks/bench_train.py on CUDA (fp32, batch 128): ours in train.py's step and the bare step, vs BERT
#   3. the real pipeline at full scale: steps 1-3 with configs/{dataset,model,train}_params.yaml on the builtin
#      corpus (the hub is not needed), 300 training steps in bf16 autocast (train.mixed_precision auto = bf16)
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]        (PYTHON=... to pick the interpreter; default python;
#        PARTS="moe train pipeline" to run only some of the three, e.g. PARTS=pipeline to redo one)
# Needs the packages of requirements.txt; writes OUT_DIR (default gpu_check/) and prints the table last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-python}
PARTS=${PARTS:-moe train pipeline}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)" | tee "$OUT/device.txt"
START=$(date +%s)

if [[ " $PARTS " == *" moe "* ]]; then
echo "== 1/3 MoE layer, bf16, large shapes"
timeout 150 "$PY" benchmarks/bench_moe.py --device cuda --dtype bfloat16 --d-model 768 --d-expert 3072 \
    --tokens 16384 --experts 8 64 --top-k 1 2 --repeats 10 --warmup 3 --json "$OUT/bench_moe_gpu.json" \
    > "$OUT/bench_moe_gpu.log" 2>&1 || echo "bench_moe failed or timed out: see $OUT/bench_moe_gpu.log"
fi

if [[ " $PARTS " == *" train "* ]]; then
echo "== 2/3 training step, ours vs BertForMaskedLM, CUDA"
# 240 s: 8 cases (ours in the train.py and the bare step), and each memory probe is a fresh child process that
# starts CUDA (~15 s each on the H200 seen)
timeout 240 "$PY" benchmarks/bench_train.py --device cuda --batch-size 128 --repeats 20 --warmup 5 \
    --json "$OUT/bench_train_gpu.json" > "$OUT/bench_train_gpu.log" 2>&1 \
    || echo "bench_train failed or timed out: see $OUT/bench_train_gpu.log"
fi

if [[ " $PARTS " == *" pipeline "* ]]; then
echo "== 3/3 full-scale pipeline, 300 bf16 steps"
SETS=(--set dataset.load_params.source=builtin --set dataset.load_params.builtin.n_docs=140000
      --set dataset.data_params.tokenizer_name=null --set dataset.data_params.num_proc=8
      --set "dataset.data_params.processed_dir=$OUT/data/processed" --set "dataset.data_params.masked_dir=$OUT/data/masked"
      --set train.max_steps=300 --set train.eval_steps=300 --set train.save_steps=300 --set train.device=cuda
      --set train.mixed_precision=bf16 --set "train.save_path=$OUT/runs" --set "train.aim_repo=$OUT")
CONFIGS=(--config-dataset dataset_params.yaml --config-model model_params.yaml --config-train train_params.yaml)
{
    timeout 60 "$PY" data_processors/load_dataset.py --config-name dataset_params.yaml "${SETS[@]}" &&
    timeout 60 "$PY" data_processors/dataset.py --config-dataset dataset_params.yaml \
        --config-model model_params.yaml "${SETS[@]}" &&
    timeout 120 "$PY" train/train.py "${CONFIGS[@]}" "${SETS[@]}" --tag gpu_check --overwrite
} > "$OUT/pipeline.log" 2>&1 || echo "pipeline failed or timed out: see $OUT/pipeline.log"
fi

echo "== summary ($(( $(date +%s) - START )) s)"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None

moe = load("bench_moe_gpu.json")
if moe:
    impls = list(dict.fromkeys(c["impl"] for c in moe["cases"]))
    print("MoE layer fwd+bwd, bf16, d 768, d_expert 3072, 16384 tokens (ms, median)")
    print(f"{'E':>3} {'k':>2} " + " ".join(f"{i:>14}" for i in impls))
    for e, k in sorted({(c["n_experts"], c["top_k"]) for c in moe["cases"]}):
        cells = {c["impl"]: c.get("ms_median") for c in moe["cases"] if (c["n_experts"], c["top_k"]) == (e, k)}
        print(f"{e:>3} {k:>2} " + " ".join(f"{cells[i]:>14.2f}" if cells.get(i) else f"{'skipped':>14}" for i in impls))
train = load("bench_train_gpu.json")
if train:
    print("\ntraining step (bench_train, CUDA, batch 128)")
    for c in train["cases"]:
        if c.get("ms_median"):
            print(f"  {c['impl']:<11} E={c['n_experts']} k={c['top_k']} head={c['mlm_head']:<6} "
                  f"step={c.get('step', 'bare'):<8} {c['ms_median']:8.2f} ms  {c['tokens_per_s']:>10.0f} tokens/s")
manifest = out / "runs" / "gpu_check" / "manifest.json"
if manifest.is_file():
    m = json.loads(manifest.read_text())
    print(f"\nfull-scale pipeline: {m['total_steps']} steps in {m['seconds']} s on {m['device']} "
          f"({m['mixed_precision']}), {m['n_parameters']:,} parameters, final eval {m['final_eval']}")
EOF
