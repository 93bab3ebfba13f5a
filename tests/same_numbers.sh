#!/usr/bin/env bash
# Runs a fixed set of short runs that touch every stage, both recipes, the controls, data preparation and the
# evaluations, into OUT; `python tests/same_numbers.py OUT_BEFORE OUT_AFTER` then says whether every number is
# the same bit for bit (logs, checkpoints with their optimiser states, data files, evaluation JSON, printed lines).
# For a change meant to keep behaviour: run it at the commit before (a `git worktree`) and after.
#   bash tests/same_numbers.sh /tmp/before            # from the checkout to measure; ~12 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
D="--data_dir=$OUT/data"
run() { local name=$1; shift; echo "+ $name: $*"; "$@" > "$OUT/$name.stdout" 2>&1 || { tail -5 "$OUT/$name.stdout"; exit 1; }; }
mkdir -p "$OUT/src"   # a GPT-2 corpus of its own: the standard library's email package, fixed for a machine
cp "$($PY -c 'import email, os; print(os.path.dirname(email.__file__))')"/*.py "$OUT/src/"
run data-bytes $PY prepare_data.py pystdlib --tokenizer=bytes $D
run data-gpt2 $PY prepare_data.py mine --source="$OUT/src" --val_fraction=0.2 $D
TINY="--preset=tiny --eval_interval=50"
run nca $PY nca_gpt.py --stage=nca $TINY --max_iters=150 --out_dir="$OUT/nca"
run shuffled $PY nca_gpt.py --stage=nca $TINY --max_iters=100 --nca_shuffle=true --out_dir="$OUT/shuffled"
run nca-paper-data $PY nca_gpt.py --stage=nca $TINY --max_iters=30 --n_states=10 --gzip_lower=0.5 --num_rules=300 \
    --num_val_rules=100 --eval_iters=2 --stop_at_peak=true --out_dir="$OUT/nca10"
run dyck $PY nca_gpt.py --stage=dyck $TINY --max_iters=60 --out_dir="$OUT/dyck"
LM="--stage=lm --dataset=pystdlib $D $TINY --max_iters=100"
run lm-nca $PY nca_gpt.py $LM --init_from="$OUT/nca" --out_dir="$OUT/lm-nca"
run lm-nca-reinit $PY nca_gpt.py $LM --max_iters=40 --init_from="$OUT/nca" --reinit=mlp:1 --freeze=attn:0 --out_dir="$OUT/lm-reinit"
run lm-scratch $PY nca_gpt.py $LM --out_dir="$OUT/lm-scratch"
run lm-gpt2 $PY nca_gpt.py --stage=lm --dataset=mine $D $TINY --max_iters=20 --n_embd=64 --out_dir="$OUT/lm-gpt2"
run lm-resume-a $PY nca_gpt.py $LM --max_iters=100 --eval_interval=25 --out_dir="$OUT/lm-resume"
cp "$OUT/lm-resume/log.jsonl" "$OUT/lm-resume/log-first.jsonl"
run lm-resume-b $PY nca_gpt.py $LM --max_iters=100 --eval_interval=25 --init_from=resume --out_dir="$OUT/lm-resume"
AUTH="--recipe=authors --num_rules=200 --num_val_rules=50 --eval_iters=2"
run nca-authors $PY nca_gpt.py --stage=nca $TINY $AUTH --max_iters=30 --out_dir="$OUT/nca-authors"
run lm-authors $PY nca_gpt.py $LM --recipe=authors --max_iters=60 --init_from="$OUT/nca-authors" --out_dir="$OUT/lm-authors"
run lm-authors-scratch $PY nca_gpt.py $LM --recipe=authors --max_iters=60 --out_dir="$OUT/lm-authors-scratch"
run ppl $PY eval.py ppl --ckpt="$OUT/lm-nca" --datasets=pystdlib $D --max_tokens=20000 --out="$OUT/eval-ppl.json"
run icl $PY eval.py icl --ckpt="$OUT/lm-nca" --batches=4 --out="$OUT/eval-icl.json"
run icl-start $PY eval.py icl --ckpt="$OUT/lm-nca" --batches=2 --at_start=true --out="$OUT/eval-icl-start.json"
run eval-nca $PY eval.py nca --num_rules=256 --out="$OUT/eval-nca.json"
run watch $PY eval.py watch --ckpt="$OUT/nca" --out="$OUT/eval-watch.json"
run compare $PY eval.py compare --runs="scratch=$OUT/lm-scratch,nca=$OUT/lm-nca,reinit=$OUT/lm-nca" \
    --out="$OUT/eval-compare.json"
echo "done: $OUT"
