#!/usr/bin/env bash
# The mechanism study (docs/study.md): does what NCA teaches transfer, under the project's recipe and the authors'?
# Stage 1 on NCA data and on its shuffled control, in two regimes; stage 2 = recipe B on pystdlib bytes; scratch
# under each recipe; item ablations; width 256; Dyck at regime b's tokens; regime b run long (1,000 updates).
# `bash tests/reproduce.sh study` runs it (or this file directly).
#
#   bash tests/study.sh            # everything not yet done, JOBS runs at a time (one thread each), then the tables
#   bash tests/study.sh --list     # only print the runs, in the order they are run (the most informative first)
#   bash tests/study.sh --tables   # only the tables, from the runs done so far
#   SEEDS="1 2" JOBS=1 OUT=out-study bash tests/study.sh
#
# A finished run (out_dir/done) is skipped, so a killed study continues where it stopped. A stage-2 run waits for
# the stage-1 run it starts from.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out-study}
SEEDS=${SEEDS:-1 2 3 4}
FEW=${FEW:-1 2}     # seeds of the ablations, width 256, the long stage 1 and the 64,000-row head
JOBS=${JOBS:-2}
PY=${PY:-python}
# the model of both stages: the tiny preset's shape (2 layers, width 128, 4 heads)
MODEL="--preset=tiny --n_layer=2 --n_head=4 --n_embd=128 --eval_iters=8"
# stage 1, regime a: the paper's NCA data (10 states, band 0.5-1.0), 100 updates of 8 x 256, warm-up to 1e-3, stop
# at the peak. Regime b: 2-state rules (band 0.1-1.0), 300 updates of 4 x 512, warm-up to 3e-3, stop at the peak: the
# shortest run measured that shows the rule inferred in context (docs/study.md). The authors' 64,000-row stage-1
# vocabulary is left out (--pad_vocab=64): on a CPU it would cost 6-1,000x the head; one cell at the end has it.
S1A="$MODEL --stage=nca --block_size=256 --batch_size=8 --n_states=10 --gzip_lower=0.5 --gzip_upper=1.0 --max_iters=100 \
     --learning_rate=1e-3 --stop_at_peak=true --eval_interval=50 --pad_vocab=64"
S1B="$MODEL --stage=nca --block_size=512 --batch_size=4 --n_states=2 --gzip_lower=0.1 --gzip_upper=1.0 --max_iters=300 \
     --learning_rate=3e-3 --stop_at_peak=true --eval_interval=100 --pad_vocab=64"
# the control data at regime b's tokens: Dyck (64 bracket types, depth 16) in the same 300 updates of 4 x 512. And
# regime b run long: the tiny preset's own stage 1 (1,000 updates, warm-up 50, cosine 3e-3 -> 3e-4; authors: -> 0).
S1D="$MODEL --stage=dyck --block_size=512 --batch_size=4 --max_iters=300 --learning_rate=3e-3 --stop_at_peak=true \
     --eval_interval=100 --pad_vocab=64"
S1L="$MODEL --stage=nca --block_size=512 --batch_size=4 --n_states=2 --gzip_lower=0.1 --gzip_upper=1.0 --max_iters=1000 \
     --eval_interval=250 --pad_vocab=64"
# stage 2: recipe B of tests/reproduce.sh (lr 1e-3 -> 1e-4, weight decay 0.1, 800 updates of 8 x 256 bytes)
S2="$MODEL --stage=lm --dataset=pystdlib --block_size=256 --batch_size=8 --max_iters=800 --warmup_iters=80 \
    --lr_decay_iters=800 --learning_rate=1e-3 --min_lr=1e-4 --weight_decay=0.1 --eval_interval=50"
# the item ablations: from the project's recipe, one of the authors' items (stage-1 flags | stage-2 flags)
declare -A ITEM1=([emb]="" [headbias]="--head_bias=true" [unscaled]="--scale_residual=false"
                  [optim]="--beta2=0.999 --dropout=0.1 --decay_all=true --warmup_zero=true --grad_clip=0")
declare -A ITEM2=([emb]="--emb_init=torch" [headbias]="" [unscaled]="--scale_residual=false"
                  [optim]="--beta2=0.999 --dropout=0.1 --decay_all=true --warmup_zero=true --clip_sum=true")
W256="--n_embd=256 --n_head=4"

runs() {  # one line per run: out_dir|the stage-1 out_dir it starts from (or -)|flags
  local s r a
  for s in $SEEDS; do for r in project authors; do for a in nca shuffled; do
    echo "$OUT/s1b-$a-$r-s$s|-|$S1B --recipe=$r --nca_shuffle=$([ $a = shuffled ] && echo true || echo false) --seed=$s"
  done; done; done
  for s in $SEEDS; do for r in project authors; do
    echo "$OUT/scratch-$r-s$s|-|$S2 --recipe=$r --seed=$s"
    for a in nca shuffled; do echo "$OUT/b-$a-$r-s$s|$OUT/s1b-$a-$r-s$s|$S2 --recipe=$r --seed=$s"; done
  done; done
  for s in $FEW; do for i in emb headbias unscaled optim; do
    [ -n "${ITEM1[$i]}" ] && echo "$OUT/s1b-nca-$i-s$s|-|$S1B ${ITEM1[$i]} --seed=$s"
    from=$OUT/s1b-nca-$( [ -n "${ITEM1[$i]}" ] && echo "$i" || echo project )-s$s
    [ -n "${ITEM2[$i]}" ] && echo "$OUT/abl-$i-scratch-s$s|-|$S2 ${ITEM2[$i]} --seed=$s"
    echo "$OUT/abl-$i-nca-s$s|$from|$S2 ${ITEM2[$i]} --seed=$s"
  done; done
  for s in $SEEDS; do for r in project authors; do for a in nca shuffled; do
    echo "$OUT/s1a-$a-$r-s$s|-|$S1A --recipe=$r --nca_shuffle=$([ $a = shuffled ] && echo true || echo false) --seed=$s"
  done; done; done
  for s in $SEEDS; do for r in project authors; do for a in nca shuffled; do
    echo "$OUT/a-$a-$r-s$s|$OUT/s1a-$a-$r-s$s|$S2 --recipe=$r --seed=$s"
  done; done; done
  for s in $FEW; do for r in project authors; do
    echo "$OUT/w256-s1b-nca-$r-s$s|-|$S1B $W256 --recipe=$r --seed=$s"
    echo "$OUT/w256-scratch-$r-s$s|-|$S2 $W256 --recipe=$r --seed=$s"
    echo "$OUT/w256-nca-$r-s$s|$OUT/w256-s1b-nca-$r-s$s|$S2 $W256 --recipe=$r --seed=$s"
  done; done
  for s in $SEEDS; do for r in project authors; do
    echo "$OUT/s1d-$r-s$s|-|$S1D --recipe=$r --seed=$s"
    echo "$OUT/dyck-$r-s$s|$OUT/s1d-$r-s$s|$S2 --recipe=$r --seed=$s"
  done; done
  for s in $FEW; do for r in project authors; do
    for a in nca shuffled; do
      echo "$OUT/s1l-$a-$r-s$s|-|$S1L --recipe=$r --nca_shuffle=$([ $a = shuffled ] && echo true || echo false) --seed=$s"
      echo "$OUT/long-$a-$r-s$s|$OUT/s1l-$a-$r-s$s|$S2 --recipe=$r --seed=$s"
    done
  done; done
  # the one item of the authors' recipe the cells above leave out: the 64,000-row stage-1 head (both stage 1s first,
  # so that two run at once)
  for s in $FEW; do echo "$OUT/s1b-nca-authors64k-s$s|-|$S1B --recipe=authors --pad_vocab=64000 --seed=$s"; done
  for s in $FEW; do echo "$OUT/b-nca-authors64k-s$s|$OUT/s1b-nca-authors64k-s$s|$S2 --recipe=authors --seed=$s"; done
}

. tests/run_one.sh  # one(): a run of the list, unless done; a stage 2 waits for its stage 1

tables() {
  local cells=() r
  for r in project authors; do
    cells+=("b-$r|scratch=$OUT/scratch-$r-s*,nca=$OUT/b-nca-$r-s*,shuffled=$OUT/b-shuffled-$r-s*")
    cells+=("a-$r|scratch=$OUT/scratch-$r-s*,nca=$OUT/a-nca-$r-s*,shuffled=$OUT/a-shuffled-$r-s*")
    cells+=("w256-$r|scratch=$OUT/w256-scratch-$r-s*,nca=$OUT/w256-nca-$r-s*")
    cells+=("dyck-$r|scratch=$OUT/scratch-$r-s*,nca=$OUT/b-nca-$r-s*,dyck=$OUT/dyck-$r-s*")
    cells+=("long-$r|scratch=$OUT/scratch-$r-s[12],nca=$OUT/long-nca-$r-s*,shuffled=$OUT/long-shuffled-$r-s*")
  done
  cells+=("head64k|scratch=$OUT/scratch-authors-s[12],nca=$OUT/b-nca-authors-s[12],nca-64k=$OUT/b-nca-authors64k-s*")
  cells+=("ablations|scratch=$OUT/scratch-project-s[12],nca=$OUT/b-nca-project-s[12],emb-scratch=$OUT/abl-emb-scratch-s*,emb-nca=$OUT/abl-emb-nca-s*,headbias-nca=$OUT/abl-headbias-nca-s*,unscaled-scratch=$OUT/abl-unscaled-scratch-s*,unscaled-nca=$OUT/abl-unscaled-nca-s*,optim-scratch=$OUT/abl-optim-scratch-s*,optim-nca=$OUT/abl-optim-nca-s*")
  cells+=("best|scratch-project=$OUT/scratch-project-s*,scratch-authors=$OUT/scratch-authors-s*,b-nca-project=$OUT/b-nca-project-s*,b-nca-authors=$OUT/b-nca-authors-s*,a-nca-project=$OUT/a-nca-project-s*,a-nca-authors=$OUT/a-nca-authors-s*")
  for cell in "${cells[@]}"; do
    echo "== $OUT: ${cell%%|*}"
    base=scratch; [ "${cell%%|*}" = best ] && base=scratch-project
    $PY eval.py compare --runs="${cell#*|}" --baseline=$base --out="$OUT/compare-${cell%%|*}.json" || true
  done
}

case "${1:-}" in
  --list) runs; exit 0 ;;
  --tables) tables; exit 0 ;;
esac
[ -f data/pystdlib/meta.json ] || $PY prepare_data.py pystdlib --tokenizer=bytes
runs | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
tables
