#!/usr/bin/env bash
# The checks only a GPU can make, as one script for a session that has one (about 10 minutes on an H100):
# the CUDA path runs (bf16, compile, fused AdamW), data-engine speed, training tokens/s and MFU against the
# plainest loop, sampling speed. Prints every figure; writes nothing outside a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python tests/bench_nca.py --batch_sizes=32,256,1024 --filter_rules=8192
python tests/bench_train.py --presets=tiny,small --iters=30 2>&1 | grep -v -E '^(config|step|stage|train rule|val rule|done|[0-9]+ updates)'
python tests/bench_eval.py --shape=small --batch=64 --new=200
out=$(mktemp -d)
python nca_gpt.py --stage nca --preset=small --max_iters=200 --eval_interval=100 --log_interval=50 --out_dir="$out/nca"
python nca_gpt.py --stage nca --preset=small --max_iters=300 --eval_interval=100 --log_interval=50 --out_dir="$out/nca" --init_from=resume
rm -rf "$out"
