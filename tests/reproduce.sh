#!/usr/bin/env bash
# The paper's comparison at laptop scale (docs/comparisons.md): stage 1 on NCA data (the paper's generator:
# 10 states, band 0.5-1.0), on its controls (the same NCA tokens shuffled within each sequence; Dyck; the
# authors' loss, START/END predicted), then stage 2 on the Python standard library as bytes, against scratch,
# under two stage-2 schedules, A and B (both under --recipe=project); then `eval.py compare`. Every run is one
# command line below: read them. The mechanism study, under both --recipe values: `bash tests/reproduce.sh study`
# (tests/study.sh; docs/study.md).
#
#   bash tests/reproduce.sh              # everything, one run after another (about 3 h on one CPU core)
#   bash tests/reproduce.sh --list       # only print the commands, in an order that respects dependencies
#   SEEDS="1 2" RECIPES=A OUT=out-repro bash tests/reproduce.sh
#   SWEEP=1 bash tests/reproduce.sh      # then the band sweep: bands 0.2-0.3, 0.3-0.4, 0.4-0.5 beside 0.5-1.0
#   RECIPES=C ARMS_ONLY="scratch nca shuffled" bash tests/reproduce.sh   # stage 2 three times B's length
#   EXTRA="--max_iters=4 --eval_interval=2" DATA_DIR=/tmp/data bash tests/reproduce.sh   # a smoke test
#
# EXTRA: flags appended to every nca_gpt.py command (tests/test_eval_files.py makes the runs tiny with it);
# DATA_DIR: where prepare_data.py writes pystdlib and stage 2 reads it (default: nca_gpt.py's, data/).
# A finished run (out_dir/done) is skipped, so a killed reproduction continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = study ] && exec bash tests/study.sh "${@:2}"
OUT=${OUT:-out-repro}
SEEDS=${SEEDS:-1 2 3}
RECIPES=${RECIPES:-A B}
PY=${PY:-python}
EXTRA=${EXTRA:-}
DATA_DIR=${DATA_DIR:-}
DATA_FLAG=${DATA_DIR:+ --data_dir=$DATA_DIR}   # empty by default: the commands stay as --list prints them
# the model of both stages: the tiny preset's shape (2 layers, width 128, 4 heads, context 256), 8 sequences a step
MODEL="--preset=tiny --n_layer=2 --n_head=4 --n_embd=128 --block_size=256 --batch_size=8 --eval_iters=8"
# stage 1: 100 updates (0.2M tokens), linear warm-up to 1e-3 and stopped there, at the peak (the paper's schedule)
# on the paper's NCA data: 12x12 torus, 10 states, band 0.5-1.0 (whatever the tiny preset's NCA data is)
S1="$MODEL --grid=12 --n_states=10 --patch=2 --gzip_lower=0.5 --gzip_upper=1.0 --max_iters=100 --learning_rate=1e-3 \
    --stop_at_peak=true --eval_interval=50"
# stage 2 on pystdlib bytes. A: the tiny preset's recipe (lr 3e-3 -> 3e-4, no weight decay), 4x stage 1.
# B: lower lr with weight decay, 8x stage 1.
declare -A S2=(
  [A]="$MODEL --max_iters=400 --warmup_iters=40 --lr_decay_iters=400 --learning_rate=3e-3 --min_lr=3e-4 --weight_decay=0 --eval_interval=50"
  [B]="$MODEL --max_iters=800 --warmup_iters=80 --lr_decay_iters=800 --learning_rate=1e-3 --min_lr=1e-4 --weight_decay=0.1 --eval_interval=50"
  [C]="$MODEL --max_iters=2400 --warmup_iters=240 --lr_decay_iters=2400 --learning_rate=1e-3 --min_lr=1e-4 --weight_decay=0.1 --eval_interval=100"
)  # C: B three times longer (24x stage 1), for whether a longer stage 2 closes the gap: RECIPES=C ARMS_ONLY="scratch nca shuffled"
# stage-1 arms (name:flags), stage-2 arms (name:stage-1 arm:transfer flags; scratch has no stage 1)
STAGE1=("nca:--stage=nca" "shuffled:--stage=nca --nca_shuffle=true" "authorsloss:--stage=nca --nca_loss=all"
        "dyck:--stage=dyck")
ARMS=("scratch::" "nca:nca:" "nca-attn:nca:--reinit=mlp" "shuffled:shuffled:" "authorsloss:authorsloss:" "dyck:dyck:")
TAG=""
if [ -n "${ARMS_ONLY:-}" ]; then  # only these stage-2 arms (and the stage-1 runs they start from)
  keep=(); for item in "${ARMS[@]}"; do [[ " $ARMS_ONLY " == *" ${item%%:*} "* ]] && keep+=("$item"); done; ARMS=("${keep[@]}")
  keep=(); for item in "${STAGE1[@]}"; do [[ " ${ARMS[*]} " == *":${item%%:*}:"* ]] && keep+=("$item"); done; STAGE1=("${keep[@]}")
  [[ " ${ARMS[*]} " == *" scratch::"* ]] || { echo "ARMS_ONLY=\"$ARMS_ONLY\" must name scratch (the baseline) and arms among: scratch nca nca-attn shuffled authorsloss dyck"; exit 2; }
fi
if [ "${SWEEP:-0}" = 1 ]; then
  TAG=-sweep
  STAGE1=("band0.2:--stage=nca --gzip_lower=0.2 --gzip_upper=0.3" "band0.3:--stage=nca --gzip_lower=0.3 --gzip_upper=0.4"
          "band0.4:--stage=nca --gzip_lower=0.4 --gzip_upper=0.5")
  ARMS=("band0.2:band0.2:" "band0.3:band0.3:" "band0.4:band0.4:")
fi

commands() {  # one line per run: its out_dir, then its command
  for s in $SEEDS; do
    for item in "${STAGE1[@]}"; do
      echo "$OUT/s1-${item%%:*}-s$s|$PY nca_gpt.py $S1 ${item#*:} --seed=$s --out_dir=$OUT/s1-${item%%:*}-s$s${EXTRA:+ $EXTRA}"
    done
  done
  for r in $RECIPES; do
    for s in $SEEDS; do
      for item in "${ARMS[@]}"; do
        IFS=: read -r name from flags <<< "$item"
        init=${from:+--init_from=$OUT/s1-$from-s$s $flags}
        echo "$OUT/$r-$name-s$s|$PY nca_gpt.py --stage=lm --dataset=pystdlib${DATA_FLAG} ${S2[$r]} --seed=$s $init --out_dir=$OUT/$r-$name-s$s${EXTRA:+ $EXTRA}"
      done
    done
  done
}

if [ "${1:-}" = --list ]; then
  commands
  exit 0
fi
[ -f "${DATA_DIR:-data}/pystdlib/meta.json" ] || $PY prepare_data.py pystdlib --tokenizer=bytes$DATA_FLAG
commands | while IFS='|' read -r dir cmd; do
  if [ -f "$dir/done" ]; then echo "done already: $dir"; continue; fi
  echo "+ $cmd"
  # a failed run stops the reproduction, said: the runs after it would start from nothing
  $cmd > /dev/null || { echo "reproduce.sh: this run failed (its error is above): $cmd" >&2; exit 1; }
  touch "$dir/done"
done
for r in $RECIPES; do
  arms=""
  if [ -n "$TAG" ]; then  # the sweep's arms beside the main comparison's scratch and NCA (band 0.5-1.0)
    arms="scratch=$OUT/$r-scratch-s*,nca=$OUT/$r-nca-s*"
  fi
  for item in "${ARMS[@]}"; do arms="$arms${arms:+,}${item%%:*}=$OUT/$r-${item%%:*}-s*"; done
  $PY eval.py compare --runs="$arms" --baseline=scratch --out="$OUT/compare-$r$TAG.json" --png="$OUT/compare-$r$TAG.png"
done
