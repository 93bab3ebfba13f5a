#!/usr/bin/env bash
# Best against best (docs/study.md, "Tuned"): every arm at its own tuned settings, chosen on seeds 1-2 and reported
# on held-out seeds, paired by seed; then the chosen settings over model sizes. The protocol, fixed before any run
# was looked at:
#   - stage 2 is the study's (recipe B: 800 updates of 8 x 256 pystdlib bytes, warm-up 80, cosine to lr / 10, weight
#     decay 0.1) under the project's recipe; its peak learning rate is tuned per arm over STAGE2_LRS
#   - NCA's stage 1 (regime b's data: 2-state rules, band 0.1-1.0, 4 x 512 tokens an update, stopped at the peak)
#     is tuned over S1_LRS x S1_ITERS, each cell scored by its stage-2 result at lr 1e-3 (the study's); NCA's
#     stage-2 lr is then tuned at the chosen cell
#   - choice: the lowest mean final validation loss over seeds 1-2; then the chosen settings on HELDOUT seeds, scratch
#     against NCA and against NCA's shuffled control at NCA's settings, each paired by seed (eval.py compare)
#   - size: the settings chosen at width 128 (not tuned again), scratch against NCA at each SIZES shape and its
#     seeds, the same stage-2 tokens at every size; the gap against non-embedding parameters (eval.py trend)
#
#   bash tests/tune.sh tune        # the tuning runs (seeds 1-2), then the choice -> OUT/chosen.env and its table
#   bash tests/tune.sh nca_lr      # tune's second half alone: NCA's stage-2 lr at the chosen stage 1
#   bash tests/tune.sh heldout     # the chosen settings on the held-out seeds, then the tables
#   bash tests/tune.sh size        # the chosen settings over SIZES, then the trend
#   bash tests/tune.sh all         # the four in turn: the whole study, one command
#   bash tests/tune.sh --list PHASE  # only print a phase's runs (grid: tune's first half)
#   SHAPE=small bash tests/tune.sh --flops   # the same study at GPT-2 small's shape: its runs, FLOPs and H100 hours
#
# A finished run (out_dir/done) is skipped, so a killed phase continues where it stopped; JOBS runs at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out-tune}
JOBS=${JOBS:-2}
PY=${PY:-python}
TUNE_SEEDS=${TUNE_SEEDS:-1 2}
HELDOUT=${HELDOUT:-3 4 5 6}
S1_LRS=${S1_LRS:-3e-4 1e-3 3e-3}
S1_ITERS=${S1_ITERS:-100 300 1000}
STAGE2_LRS=${STAGE2_LRS:-5e-4 1e-3 2e-3}
SHAPE=${SHAPE:-tiny}  # the shape of tune and heldout (one of SIZES' shapes, or small: GPT-2 small's 12 x 768)
CONTROL=${CONTROL-shuffled}  # the held-out phase's control arm ('' leaves it out)
# heldout and size also run NCA's stage 2 at this lr from the same stage 1s (arm ncaLR; '' or the chosen lr: none):
# does the lr chosen at width 128 carry over to the other sizes?
ALSO_NCA_LR=${ALSO_NCA_LR-1e-3}
# size: SHAPE:SEEDS, comma-separated; tiny is the study's 2 layers at width 128, wN width N, d4 four layers
SIZES=${SIZES:-tiny:3 4 5 6,w256:3 4 5 6,d4:3 4 5 6,w512:3 4}

dims() {  # dims SHAPE: its layers, heads and width
  case "$1" in
    tiny) echo 2 4 128 ;;
    w256) echo 2 4 256 ;;
    w512) echo 2 8 512 ;;
    d4) echo 4 4 128 ;;
    small) echo 12 12 768 ;;
    *) echo "unknown shape $1: tiny, w256, w512, d4 or small" >&2; exit 2 ;;
  esac
}

model() {  # model SHAPE: its flags
  local l h c preset=tiny
  read -r l h c <<< "$(dims "$1")"
  [ "$1" = small ] && preset=small
  echo "--preset=$preset --n_layer=$l --n_head=$h --n_embd=$c --eval_iters=8"
}

s1() {  # s1 SHAPE: stage 1's flags
  echo "$(model "$1") --stage=nca --block_size=512 --batch_size=4 --n_states=2 --gzip_lower=0.1 --gzip_upper=1.0 \
--stop_at_peak=true --eval_interval=100 --pad_vocab=64"
}

stage2() {  # stage2 SHAPE OUT_DIR FROM LR SEED: the run line of a stage-2 run (min_lr: a tenth of the peak, recipe B)
  local min; min=$($PY -c "print(f'{$4 / 10:g}')")
  echo "$2|$3|$(model "$1") --stage=lm --dataset=pystdlib --block_size=256 --batch_size=8 --max_iters=800 \
--warmup_iters=80 --lr_decay_iters=800 --weight_decay=0.1 --eval_interval=50 --learning_rate=$4 --min_lr=$min --seed=$5"
}

chosen() {  # the choice so far, from OUT/chosen.env
  [ -f "$OUT/chosen.env" ] || { echo "no $OUT/chosen.env: run \`bash tests/tune.sh tune\` first" >&2; exit 2; }
  . "$OUT/chosen.env"
}

held() {  # held SHAPE "SEEDS" "ARMS": the chosen settings at SHAPE, scratch and each of ARMS (nca, shuffled)
  local s a shuffle
  for s in $2; do for a in $3; do
    shuffle=false; [ "$a" = shuffled ] && shuffle=true
    echo "$OUT/held-$1-s1-$a-s$s|-|$(s1 "$1") --learning_rate=$NCA_S1_LR --max_iters=$NCA_S1_ITERS --seed=$s \
--nca_shuffle=$shuffle"
  done; done
  for s in $2; do
    stage2 "$1" "$OUT/held-$1-scratch-s$s" - "$SCRATCH_LR" "$s"
    for a in $3; do stage2 "$1" "$OUT/held-$1-$a-s$s" "$OUT/held-$1-s1-$a-s$s" "$NCA_LR" "$s"; done
    if [ -n "$ALSO_NCA_LR" ] && [ "$ALSO_NCA_LR" != "$NCA_LR" ]; then
      stage2 "$1" "$OUT/held-$1-nca$ALSO_NCA_LR-s$s" "$OUT/held-$1-s1-nca-s$s" "$ALSO_NCA_LR" "$s"
    fi
  done
}

nca_lr_dir() {  # nca_lr_dir LR SEED: NCA's stage 2 at the chosen stage 1 (at 1e-3: the grid's cell)
  if [ "$1" = 1e-3 ]; then echo "$OUT/nca-lr$NCA_S1_LR-it$NCA_S1_ITERS-s$2"
  else echo "$OUT/nca-s2lr$1-lr$NCA_S1_LR-it$NCA_S1_ITERS-s$2"; fi
}

runs() {  # runs PHASE: one line per run: out_dir|the stage-1 out_dir it starts from (or -)|flags
  local s lr it shape seeds
  case "$1" in
    grid)
      for s in $TUNE_SEEDS; do for lr in $S1_LRS; do for it in $S1_ITERS; do
        echo "$OUT/s1-nca-lr$lr-it$it-s$s|-|$(s1 "$SHAPE") --learning_rate=$lr --max_iters=$it --seed=$s"
      done; done; done
      for s in $TUNE_SEEDS; do
        for lr in $STAGE2_LRS; do stage2 "$SHAPE" "$OUT/scratch-lr$lr-s$s" - "$lr" "$s"; done
        for lr in $S1_LRS; do for it in $S1_ITERS; do
          stage2 "$SHAPE" "$OUT/nca-lr$lr-it$it-s$s" "$OUT/s1-nca-lr$lr-it$it-s$s" 1e-3 "$s"
        done; done
      done ;;
    nca_lr)  # the chosen stage-1 runs (done already after the grid) and NCA's stage 2 at each lr
      chosen
      for s in $TUNE_SEEDS; do
        echo "$OUT/s1-nca-lr$NCA_S1_LR-it$NCA_S1_ITERS-s$s|-|$(s1 "$SHAPE") --learning_rate=$NCA_S1_LR \
--max_iters=$NCA_S1_ITERS --seed=$s"
      done
      for s in $TUNE_SEEDS; do for lr in $STAGE2_LRS; do
        stage2 "$SHAPE" "$(nca_lr_dir "$lr" "$s")" "$OUT/s1-nca-lr$NCA_S1_LR-it$NCA_S1_ITERS-s$s" "$lr" "$s"
      done; done ;;
    heldout) chosen; held "$SHAPE" "$HELDOUT" "nca $CONTROL" ;;
    size)
      chosen
      IFS=, read -r -a sizes <<< "$SIZES"
      for shape in "${sizes[@]}"; do held "${shape%%:*}" "${shape#*:}" nca; done ;;
    *) echo "no phase $1: grid, nca_lr, heldout or size" >&2; exit 2 ;;
  esac
}

. tests/run_one.sh  # one(): a run of the list, unless done; a stage 2 waits for its stage 1

final_loss='
import json, os
def final(d):
    rows = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]
'

choose() {  # the protocol's choice of the grid, from its runs' logs -> OUT/chosen.env (NCA's stage-2 lr: 1e-3 so far)
  $PY - "$OUT" "$S1_LRS" "$S1_ITERS" "$STAGE2_LRS" "$TUNE_SEEDS" <<EOF
$final_loss
import sys
out, s1_lrs, s1_iters, lrs, seeds = sys.argv[1], *(a.split() for a in sys.argv[2:])
def mean(name):
    return sum(final(f"{out}/{name}-s{s}") for s in seeds) / len(seeds)
scratch = {lr: mean(f"scratch-lr{lr}") for lr in lrs}
nca = {(lr, it): mean(f"nca-lr{lr}-it{it}") for lr in s1_lrs for it in s1_iters}
print("final validation loss (nats per byte), mean over seeds " + ', '.join(seeds))
for lr, v in scratch.items():
    print(f"  scratch, stage-2 lr {lr}: {v:.4f}")
for (lr, it), v in nca.items():
    print(f"  NCA, stage 1 at lr {lr} for {it} updates (stage 2 at 1e-3): {v:.4f}  (minus scratch at 1e-3: "
          f"{v - scratch['1e-3']:+.4f})")
best_scratch = min(scratch, key=scratch.get)
best_nca = min(nca, key=nca.get)
print(f"chosen: scratch at lr {best_scratch}; NCA's stage 1 at lr {best_nca[0]} for {best_nca[1]} updates")
with open(f"{out}/chosen.env", 'w') as f:
    f.write(f"SCRATCH_LR={best_scratch}\nNCA_S1_LR={best_nca[0]}\nNCA_S1_ITERS={best_nca[1]}\nNCA_LR=1e-3\n")
EOF
}

choose_lr() {  # NCA's stage-2 lr at the chosen stage 1, from its runs' logs -> NCA_LR in OUT/chosen.env
  local cells='' lr
  chosen
  for lr in $STAGE2_LRS; do cells="$cells $lr=$(nca_lr_dir "$lr" '')"; done
  $PY - "$OUT/chosen.env" "$TUNE_SEEDS" $cells <<EOF
$final_loss
import sys
env, seeds, cells = sys.argv[1], sys.argv[2].split(), [a.split('=') for a in sys.argv[3:]]
means = {lr: sum(final(prefix + s) for s in seeds) / len(seeds) for lr, prefix in cells}
for lr, v in means.items():
    print(f"  NCA at the chosen stage 1, stage-2 lr {lr}: {v:.4f}")
best = min(means, key=means.get)
print(f"chosen: NCA's stage 2 at lr {best}")
lines = [line for line in open(env) if not line.startswith('NCA_LR=')]
with open(env + '.tmp', 'w') as f:
    f.writelines(lines + [f"NCA_LR={best}\n"])
os.replace(env + '.tmp', env)
EOF
}

tables() {
  local arms='' lr it shape
  case "$1" in
    grid)
      arms="scratch=$OUT/scratch-lr1e-3-s*"
      for lr in $S1_LRS; do for it in $S1_ITERS; do arms="$arms,nca-$lr-$it=$OUT/nca-lr$lr-it$it-s[0-9]"; done; done
      $PY eval.py compare --runs="$arms" --baseline=scratch --out="$OUT/compare-tune.json" || true
      $PY eval.py grid --runs="scratch=$OUT/scratch-lr1e-3-s*,nca=$OUT/nca-lr*-it*-s[0-9]" --out="$OUT/grid.json" \
        --png="$OUT/grid.png" || true ;;
    heldout)
      arms="scratch=$OUT/held-$SHAPE-scratch-s*,nca=$OUT/held-$SHAPE-nca-s*"
      [ -n "$CONTROL" ] && arms="$arms,$CONTROL=$OUT/held-$SHAPE-$CONTROL-s*"
      chosen
      if [ -n "$ALSO_NCA_LR" ] && [ "$ALSO_NCA_LR" != "$NCA_LR" ]; then
        arms="$arms,nca$ALSO_NCA_LR=$OUT/held-$SHAPE-nca$ALSO_NCA_LR-s*"
      fi
      $PY eval.py compare --runs="$arms" --baseline=scratch --out="$OUT/compare-heldout-$SHAPE.json" \
        --png="$OUT/compare-heldout-$SHAPE.png" || true ;;
    size)
      IFS=, read -r -a sizes <<< "$SIZES"
      for shape in "${sizes[@]}"; do arms="$arms,$OUT/held-${shape%%:*}-ARM-s*"; done
      $PY eval.py trend --runs="${arms#,}" --out="$OUT/trend.json" --png="$OUT/trend.png" || true
      chosen
      if [ -n "$ALSO_NCA_LR" ] && [ "$ALSO_NCA_LR" != "$NCA_LR" ]; then
        $PY eval.py trend --runs="${arms#,}" --arms="scratch,nca$ALSO_NCA_LR" --out="$OUT/trend-nca$ALSO_NCA_LR.json" \
          --png="$OUT/trend-nca$ALSO_NCA_LR.png" || true
      fi ;;
  esac
}

flops() {  # the study's training FLOPs (tune, heldout at SHAPE; size over SIZES), and their time on one H100 at 40%
  local shape sizes_dims=''
  IFS=, read -r -a sizes <<< "$SIZES"
  for shape in "${sizes[@]}"; do sizes_dims="$sizes_dims${shape%%:*}:$(dims "${shape%%:*}"):${shape#*:},"; done
  $PY - "$SHAPE" "$(dims "$SHAPE")" "$S1_LRS" "$S1_ITERS" "$TUNE_SEEDS" "$STAGE2_LRS" "$HELDOUT" "$sizes_dims" \
    "$ALSO_NCA_LR" <<'EOF'
import sys
import torch
import nca_gpt
name, dims = sys.argv[1:3]
s1_lrs, s1_iters, seeds, lrs, held = [a.split() for a in sys.argv[3:8]]
sizes = [item.split(':') for item in sys.argv[8].split(',') if item]
arms = 3 if sys.argv[9] else 2  # stage-2 runs a seed: scratch, NCA, and NCA at ALSO_NCA_LR
def per_token(dims, vocab, T):
    L, H, C = map(int, dims.split())
    with torch.device('meta'):
        return nca_gpt.GPT(vocab, L, H, C, T).flops_per_token(T)
def stage1(dims, it):  # 2-state NCA: 18 tokens, padded to 64
    return it * 4 * 512 * per_token(dims, 64, 512)
def stage2(dims):  # pystdlib bytes: 257 tokens, padded to 320
    return 800 * 8 * 256 * per_token(dims, 320, 256)
longest = max(int(it) for it in s1_iters)
grid = len(seeds) * (sum(stage1(dims, int(it)) for it in s1_iters) * len(s1_lrs)
                     + stage2(dims) * (len(lrs) + len(s1_lrs) * len(s1_iters)))
nca_lr = len(seeds) * stage2(dims) * (len(lrs) - 1)
heldout = len(held) * ((arms + 1) * stage2(dims) + 2 * stage1(dims, longest))
size = sum(len(s.split()) * (arms * stage2(d) + stage1(d, longest)) for _, d, s in sizes)
rows = [(f'tune at {name}: the grid', grid), (f"tune at {name}: NCA's stage-2 lr", nca_lr),
        (f'heldout at {name}', heldout), ('size over ' + ' '.join(n for n, _, _ in sizes), size)]
for what, f in rows + [('all', sum(f for _, f in rows))]:
    print(f"{what:<40} {f:.3e} FLOPs = {f / (0.4 * 989e12) / 60:6.1f} min on one H100 at 40% of 989 TFLOP/s")
print(f"(stage 1 at its longest, {longest} updates, where the choice is not made yet)")
EOF
}

go() {  # go PHASE: its runs, JOBS at a time
  runs "$1" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
}

case "${1:-}" in
  --list) runs "${2:-grid}"; exit 0 ;;
  --flops) flops; exit 0 ;;
  tune|nca_lr|heldout|size|all) ;;
  *) echo "usage: bash tests/tune.sh tune|nca_lr|heldout|size|all|--list PHASE|--flops" >&2; exit 2 ;;
esac
[ -f data/pystdlib/meta.json ] || $PY prepare_data.py pystdlib --tokenizer=bytes
case "$1" in
  tune) go grid; choose; tables grid; go nca_lr; choose_lr ;;
  nca_lr) go nca_lr; choose_lr ;;
  all) go grid; choose; tables grid; go nca_lr; choose_lr; go heldout; tables heldout; go size; tables size ;;
  *) go "$1"; tables "$1" ;;
esac
