#!/usr/bin/env bash
# Best against best at every size (docs/study.md, "Tuned"): every arm at its own tuned settings, chosen on seeds 1-2
# and reported on held-out seeds, paired by seed, at each model size. The protocol, fixed before any run was looked at:
#   - stage 2 is the study's (recipe B: 800 updates of 8 x 256 pystdlib bytes, warm-up 80, cosine to lr / 10, weight
#     decay 0.1) under the project's recipe, the same tokens at every size
#   - NCA's stage 1 (regime b's data: 2-state rules, band 0.1-1.0, 4 x 512 tokens an update, stopped at the peak)
#     is chosen at SHAPE over S1_LRS x S1_ITERS, each cell scored by its stage-2 result at lr 1e-3 (grid), and kept
#     at every size
#   - at each SIZES shape, scratch's and NCA's stage-2 peak lr are tuned over LRS_<shape>, a grid a factor 2 apart,
#     widened by one value while an arm's best sits at an edge (at most WIDEN times) (lrs)
#   - choice: the lowest mean final validation loss over seeds 1-2
#   - then each shape's tuned lrs on its held-out seeds (SIZES), scratch against NCA and against NCA's shuffled
#     control at NCA's settings, paired by seed (heldout); and, beside them, the lrs tuned at SHAPE carried to every
#     size untuned (untuned); the gap against non-embedding parameters, tuned and untuned (eval.py trend)
#
#   bash tests/tune.sh grid       # stage 1's cell at SHAPE (seeds 1-2) -> OUT/chosen.env
#   bash tests/tune.sh lrs        # each arm's stage-2 lr at each size (seeds 1-2) -> OUT/lrs-SHAPE.env
#   bash tests/tune.sh heldout    # the tuned lrs on each size's held-out seeds, then the tables
#   bash tests/tune.sh untuned    # SHAPE's lrs at every size, then the trend, tuned beside untuned
#   bash tests/tune.sh sizes      # lrs and heldout size by size (each size's results as they come), then untuned
#   bash tests/tune.sh all        # grid, then sizes: the whole study, one command
#   bash tests/tune.sh --list PHASE   # only print a phase's runs (as far as the choices so far allow)
#   bash tests/tune.sh --flops        # the study's training FLOPs and their time on one H100
#   bash tests/tune.sh --table        # each size's tuning so far, lr by lr and seed by seed (runs nothing)
#   bash tests/tune.sh --tables heldout|untuned   # that phase's tables from the runs done (runs nothing)
#   SHAPE=small SIZES="small:3 4" bash tests/tune.sh all   # the same study at GPT-2 small's shape, on a GPU
#
# A finished run (out_dir/done) is skipped and a stopped one resumes from its checkpoint, so a killed phase
# continues where it stopped; JOBS runs at a time; two harnesses given the same run run it once.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out-tune}
JOBS=${JOBS:-2}
PY=${PY:-python}
TUNE_SEEDS=${TUNE_SEEDS:-1 2}
S1_LRS=${S1_LRS:-3e-4 1e-3 3e-3}
S1_ITERS=${S1_ITERS:-100 300 1000}
SHAPE=${SHAPE:-tiny}  # where stage 1 is chosen and the untuned lrs come from
# each shape's held-out seeds: SHAPE:SEEDS, comma-separated; tiny is the study's 2 layers at width 128, wN width N,
# d4 four layers at width 128, small GPT-2 small's 12 x 768
SIZES=${SIZES:-tiny:3 4 5 6,d4:3 4 5 6,w256:3 4 5 6,w512:3 4}
WIDEN=${WIDEN:-2}
# the stage-2 lrs first tried at each shape: width 128's optimum in the middle; width 512 a step cooler, as it wants
LRS_tiny=${LRS_tiny:-5e-4 1e-3 2e-3}
LRS_d4=${LRS_d4:-5e-4 1e-3 2e-3}
LRS_w256=${LRS_w256:-5e-4 1e-3 2e-3}
LRS_w512=${LRS_w512:-2.5e-4 5e-4 1e-3}
LRS_small=${LRS_small:-1.5e-4 3e-4 6e-4}
CONTROL=${CONTROL-shuffled}  # the held-out phase's control arm ('' leaves it out)

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

s1() {  # s1 SHAPE OUT_DIR LR ITERS SEED SHUFFLE: the run line of a stage-1 run
  echo "$2|-|$(model "$1") --stage=nca --block_size=512 --batch_size=4 --n_states=2 --gzip_lower=0.1 \
--gzip_upper=1.0 --stop_at_peak=true --eval_interval=100 --pad_vocab=64 --learning_rate=$3 --max_iters=$4 \
--seed=$5 --nca_shuffle=$6"
}

stage2() {  # stage2 SHAPE OUT_DIR FROM LR SEED: the run line of a stage-2 run (min_lr: a tenth of the peak, recipe B)
  local min; min=$($PY -c "print(f'{$4 / 10:g}')")
  echo "$2|$3|$(model "$1") --stage=lm --dataset=pystdlib --block_size=256 --batch_size=8 --max_iters=800 \
--warmup_iters=80 --lr_decay_iters=800 --weight_decay=0.1 --eval_interval=50 --learning_rate=$4 --min_lr=$min --seed=$5"
}

chosen() {  # stage 1's cell, from OUT/chosen.env
  [ -f "$OUT/chosen.env" ] || { echo "no $OUT/chosen.env: run \`bash tests/tune.sh grid\` first" >&2; exit 2; }
  . "$OUT/chosen.env"
}

s1_dir() { echo "$OUT/s1-$1-$2-lr$NCA_S1_LR-it$NCA_S1_ITERS-s$3"; }  # s1_dir SHAPE ARM SEED: the chosen stage 1
s2_dir() { echo "$OUT/s2-$1-$2-lr$3-s$4"; }                          # s2_dir SHAPE ARM LR SEED

arm_runs() {  # arm_runs SHAPE ARM LR "SEEDS": ARM's stage 2 at LR (NCA's arms after their stage 1s)
  local s shuffle=false
  [ "$2" = shuffled ] && shuffle=true
  if [ "$2" != scratch ]; then
    for s in $4; do s1 "$1" "$(s1_dir "$1" "$2" "$s")" "$NCA_S1_LR" "$NCA_S1_ITERS" "$s" "$shuffle"; done
  fi
  for s in $4; do
    local from=-
    [ "$2" != scratch ] && from=$(s1_dir "$1" "$2" "$s")
    stage2 "$1" "$(s2_dir "$1" "$2" "$3" "$s")" "$from" "$3" "$s"
  done
}

grid_now() {  # grid_now SHAPE ARM: the lrs tried so far (LRS_<shape>, and each widening, in OUT/lrs-SHAPE.grid)
  local name="LRS_$1"
  [ -n "${!name:-}" ] || { echo "no LRS_$1: give its first stage-2 lrs, e.g. LRS_$1=\"5e-4 1e-3 2e-3\"" >&2; exit 2; }
  echo "${!name}"
  [ -f "$OUT/lrs-$1.grid" ] && sed -n "s/^$2 //p" "$OUT/lrs-$1.grid"
  return 0
}

tuned() {  # tuned SHAPE: SCRATCH_LR and NCA_LR chosen at SHAPE, from OUT/lrs-SHAPE.env
  [ -f "$OUT/lrs-$1.env" ] || { echo "no $OUT/lrs-$1.env: run \`bash tests/tune.sh lrs\` first" >&2; exit 2; }
  . "$OUT/lrs-$1.env"
}

shapes() { IFS=, read -r -a sizes <<< "$SIZES"; for x in "${sizes[@]}"; do echo "${x%%:*}"; done; }
seeds_of() {  # seeds_of SHAPE: its held-out seeds
  IFS=, read -r -a sizes <<< "$SIZES"
  for x in "${sizes[@]}"; do if [ "${x%%:*}" = "$1" ]; then echo "${x#*:}"; fi; done
}

runs() {  # runs PHASE: one line per run: out_dir|the stage-1 out_dir it starts from (or -)|flags
  local s lr it shape
  case "$1" in
    grid)
      for s in $TUNE_SEEDS; do for lr in $S1_LRS; do for it in $S1_ITERS; do
        s1 "$SHAPE" "$OUT/grid-s1-nca-lr$lr-it$it-s$s" "$lr" "$it" "$s" false
      done; done; done
      for s in $TUNE_SEEDS; do
        for lr in $(grid_now "$SHAPE" scratch); do stage2 "$SHAPE" "$(s2_dir "$SHAPE" scratch "$lr" "$s")" - "$lr" "$s"; done
        for lr in $S1_LRS; do for it in $S1_ITERS; do
          stage2 "$SHAPE" "$OUT/grid-nca-lr$lr-it$it-s$s" "$OUT/grid-s1-nca-lr$lr-it$it-s$s" 1e-3 "$s"
        done; done
      done ;;
    lrs)
      chosen
      for shape in $(shapes); do for arm in scratch nca; do for lr in $(grid_now "$shape" $arm); do
        arm_runs "$shape" $arm "$lr" "$TUNE_SEEDS"
      done; done; done ;;
    heldout)
      chosen
      for shape in $(shapes); do
        tuned "$shape"
        arm_runs "$shape" scratch "$SCRATCH_LR" "$(seeds_of "$shape")"
        for arm in nca $CONTROL; do arm_runs "$shape" $arm "$NCA_LR" "$(seeds_of "$shape")"; done
      done ;;
    untuned)
      chosen
      tuned "$SHAPE"
      for shape in $(shapes); do
        arm_runs "$shape" scratch "$SCRATCH_LR" "$(seeds_of "$shape")"
        arm_runs "$shape" nca "$NCA_LR" "$(seeds_of "$shape")"
      done ;;
    *) echo "no phase $1: grid, lrs, heldout or untuned" >&2; exit 2 ;;
  esac | awk -F'|' '!seen[$1]++'  # a run two arms list (a stage 1) once
}

. tests/run_one.sh  # one(): a run of the list, unless done; a stage 2 waits for its stage 1

final_loss='
import json, os
def final(d):
    rows = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]
def mean(dirs):
    return sum(final(d) for d in dirs) / len(dirs)
'

choose_cell() {  # the grid's choice of stage 1, from its runs' logs -> OUT/chosen.env
  $PY - "$OUT" "$S1_LRS" "$S1_ITERS" "$TUNE_SEEDS" "$(s2_dir "$SHAPE" scratch 1e-3 '')" <<EOF
$final_loss
import sys
out, s1_lrs, s1_iters, seeds, scratch = sys.argv[1], *(a.split() for a in sys.argv[2:5]), sys.argv[5]
base = mean([scratch + s for s in seeds])
nca = {(lr, it): mean([f"{out}/grid-nca-lr{lr}-it{it}-s{s}" for s in seeds]) for lr in s1_lrs for it in s1_iters}
print(f"final validation loss (nats per byte), mean over seeds {', '.join(seeds)}; scratch at 1e-3: {base:.4f}")
for (lr, it), v in nca.items():
    print(f"  NCA, stage 1 at lr {lr} for {it} updates (stage 2 at 1e-3): {v:.4f}  ({v - base:+.4f})")
lr, it = min(nca, key=nca.get)
print(f"chosen: NCA's stage 1 at lr {lr} for {it} updates")
with open(f"{out}/chosen.env.tmp", 'w') as f:
    f.write(f"NCA_S1_LR={lr}\nNCA_S1_ITERS={it}\n")
os.replace(f"{out}/chosen.env.tmp", f"{out}/chosen.env")
EOF
}

grid_table() {  # the grid's cells against scratch at 1e-3, and its heat map
  $PY eval.py grid --runs="scratch=$(s2_dir "$SHAPE" scratch 1e-3 '*'),nca=$OUT/grid-nca-lr*-it*-s*" \
    --out="$OUT/grid.json" --png="$OUT/grid.png" || true
}

widen() {  # widen SHAPE: each arm's best lr so far; one value more where it sits at an edge, else the choice
  # -> OUT/lrs-SHAPE.grid (the widenings), OUT/lrs-SHAPE.env (the choice, once no arm needs widening); prints
  # "widened" if it widened
  chosen
  local cells='' arm lr
  for arm in scratch nca; do for lr in $(grid_now "$1" $arm); do
    cells="$cells $arm=$lr=$(s2_dir "$1" $arm "$lr" '')"
  done; done
  $PY - "$OUT/lrs-$1" "$TUNE_SEEDS" "$WIDEN" $cells <<EOF
$final_loss
import sys
stem, seeds, most, cells = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), [a.split('=') for a in sys.argv[4:]]
def at(arm):
    return {float(lr): (lr, mean([prefix + s for s in seeds])) for a, lr, prefix in cells if a == arm}
def text(x):  # 2.5e-4, 1e-3: the grid's spelling
    m, e = f"{x:e}".split('e')
    return f"{float(m):g}e{int(e)}"
grid = open(stem + '.grid').read().splitlines() if os.path.exists(stem + '.grid') else []
chosen, added = {}, []
for arm in ('scratch', 'nca'):
    means = at(arm)
    lrs = sorted(means)
    for x in lrs:
        print(f"  {arm}, stage-2 lr {means[x][0]}: {means[x][1]:.4f}")
    best = min(lrs, key=lambda x: means[x][1])
    widened = sum(line.startswith(arm + ' ') for line in grid)
    edge = {lrs[0]: best / 2, lrs[-1]: best * 2}.get(best) if len(lrs) > 1 else None
    if edge is not None and widened < most:
        added.append(f"{arm} {text(edge)}")
        print(f"  {arm}: the best, {means[best][0]}, sits at the grid's edge: widened to {text(edge)}")
    else:
        chosen[arm] = means[best][0]
        note = ' (at an edge: the widenings are spent)' if edge is not None else ''
        print(f"  {arm}: chosen lr {means[best][0]}{note}")
if added:
    with open(stem + '.grid.tmp', 'w') as f:
        f.write(''.join(line + '\n' for line in grid + added))
    os.replace(stem + '.grid.tmp', stem + '.grid')
    print('widened')
else:
    with open(stem + '.env.tmp', 'w') as f:
        f.write(f"SCRATCH_LR={chosen['scratch']}\nNCA_LR={chosen['nca']}\n")
    os.replace(stem + '.env.tmp', stem + '.env')
EOF
}

views() {  # views WHICH SHAPE SCRATCH_LR NCA_LR: OUT/WHICH/SHAPE-ARM-sSEED, links to the runs a table reads
  local s arm lr
  mkdir -p "$OUT/$1"
  for s in $(seeds_of "$2"); do for arm in scratch nca $CONTROL; do
    lr=$4; [ $arm = scratch ] && lr=$3
    [ "$1" = untuned ] && [ "$arm" = "$CONTROL" ] && continue
    ln -sfn "../$(basename "$(s2_dir "$2" $arm "$lr" "$s")")" "$OUT/$1/$2-$arm-s$s"
  done; done
}

tables() {  # tables heldout|untuned: each size's compare table, and the trend over sizes
  local shape arms trend_runs='' which=$1
  chosen
  for shape in $(shapes); do
    tuned "$shape"
    views heldout "$shape" "$SCRATCH_LR" "$NCA_LR"
    trend_runs="$trend_runs,$OUT/$which/$shape-ARM-s*"
    if [ "$which" = untuned ]; then tuned "$SHAPE"; views untuned "$shape" "$SCRATCH_LR" "$NCA_LR"; continue; fi
    arms="scratch=$OUT/heldout/$shape-scratch-s*,nca=$OUT/heldout/$shape-nca-s*"
    [ -n "$CONTROL" ] && arms="$arms,$CONTROL=$OUT/heldout/$shape-$CONTROL-s*"
    $PY eval.py compare --runs="$arms" --baseline=scratch --out="$OUT/compare-heldout-$shape.json" || true
  done
  trend_runs=${trend_runs#,}
  [ "$which" = untuned ] && trend_runs="tuned=${trend_runs//untuned\//heldout/};untuned=$trend_runs"
  $PY eval.py trend --runs="$trend_runs" --out="$OUT/trend-$which.json" --png="$OUT/trend-$which.png" || true
}

flops() {  # the study's training FLOPs, phase by phase, and their time on one H100 at 40% of its bf16 peak
  local shape sizes_dims=''
  for shape in $(shapes); do sizes_dims="$sizes_dims$shape:$(dims "$shape"):$(seeds_of "$shape"):$(grid_now "$shape" nca),"; done
  $PY - "$SHAPE" "$(dims "$SHAPE")" "$S1_LRS" "$S1_ITERS" "$TUNE_SEEDS" "$sizes_dims" "$WIDEN" <<'EOF'
import sys
import torch
import nca_gpt
name, dims = sys.argv[1:3]
s1_lrs, s1_iters, seeds = [a.split() for a in sys.argv[3:6]]
sizes = [item.split(':') for item in sys.argv[6].split(',') if item]
widen = int(sys.argv[7])
def per_token(dims, vocab, T):
    L, H, C = map(int, dims.split())
    with torch.device('meta'):
        return nca_gpt.GPT(vocab, L, H, C, T).flops_per_token(T)
def stage1(dims, it):  # 2-state NCA: 18 tokens, padded to 64
    return it * 4 * 512 * per_token(dims, 64, 512)
def stage2(dims):  # pystdlib bytes: 257 tokens, padded to 320
    return 800 * 8 * 256 * per_token(dims, 320, 256)
longest = max(int(it) for it in s1_iters)  # stage 1 at its longest, where the choice is not made yet
grid = len(seeds) * (sum(stage1(dims, int(it)) for it in s1_iters) * len(s1_lrs)
                     + stage2(dims) * (3 + len(s1_lrs) * len(s1_iters)))
rows = [(f'grid at {name}', grid)]
for shape, d, held, lrs in sizes:
    n, k = len(held.split()), len(lrs.split())
    rows += [(f'lrs at {shape}: {k} + up to {widen} lrs an arm', len(seeds) * (2 * (k + widen) * stage2(d)
                                                                          + stage1(d, longest))),
             (f'heldout at {shape}', n * (3 * stage2(d) + 2 * stage1(d, longest))),
             (f'untuned at {shape}: at most', n * 2 * stage2(d) * (shape != name))]
for what, f in rows + [('all', sum(f for _, f in rows))]:
    print(f"{what:<40} {f:.3e} FLOPs = {f / (0.4 * 989e12) / 60:6.1f} min on one H100 at 40% of 989 TFLOP/s")
EOF
}

table() {  # the tuning so far, from the finished runs' logs: each size's arms, lr by lr, seed by seed
  local shape arm lr cells
  chosen
  for shape in $(shapes); do
    cells=''
    for arm in scratch nca; do for lr in $(grid_now "$shape" $arm); do
      cells="$cells $arm=$lr=$(s2_dir "$shape" $arm "$lr" '')"
    done; done
    $PY - "$shape" "$OUT/lrs-$shape.env" "$TUNE_SEEDS" $cells <<EOF
$final_loss
import sys
shape, env, seeds, cells = sys.argv[1], sys.argv[2], sys.argv[3].split(), [a.split('=') for a in sys.argv[4:]]
chosen = ', '.join(open(env).read().split()) if os.path.exists(env) else 'not yet'
print(f"== {shape}: final validation loss (nats per byte), seeds {' / '.join(seeds)}, their mean; chosen: {chosen}")
for arm, lr, prefix in sorted(cells, key=lambda c: (c[0] != 'scratch', float(c[1]))):
    done = [os.path.exists(prefix + s + '/done') for s in seeds]
    losses = [f"{final(prefix + s):.4f}" if d else '-' for s, d in zip(seeds, done)]
    mean_text = f"{mean([prefix + s for s in seeds]):.4f}" if all(done) else '-'
    print(f"  {arm:<8} lr {lr:<7} {' / '.join(losses)}   mean {mean_text}")
EOF
  done
}

go() {  # go PHASE: its runs, JOBS at a time (the stage-2 data made first, where a run is left to do)
  local todo
  todo=$(runs "$1" | while IFS='|' read -r dir _; do [ -f "$dir/done" ] || echo "$dir"; done)
  [ -z "$todo" ] || [ -f data/pystdlib/meta.json ] || $PY prepare_data.py pystdlib --tokenizer=bytes
  runs "$1" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
}

tune_lrs() {  # the lrs phase: run, widen where an arm's best is at an edge, run again, until every size has its choice
  local shape out more=1
  while [ $more = 1 ]; do
    go lrs
    more=0
    for shape in $(shapes); do
      echo "== $shape: final validation loss, mean over seeds $TUNE_SEEDS"
      out=$(widen "$shape")
      echo "$out"
      if grep -qx widened <<< "$out"; then more=1; fi
    done
  done
}

sizes() {  # lrs, then heldout, one size after the other (each size's results as soon as they are in); then untuned
  local shape all_sizes=$SIZES
  for shape in $(shapes); do
    SIZES="$shape:$(seeds_of "$shape")"
    tune_lrs; go heldout; tables heldout
    SIZES=$all_sizes
  done
  go untuned; tables untuned
}

case "${1:-}" in
  --list) runs "${2:-grid}"; exit 0 ;;
  --flops) flops; exit 0 ;;
  --table) table; exit 0 ;;
  --tables) tables "${2:-heldout}"; exit 0 ;;
  grid|lrs|heldout|untuned|sizes|all) ;;
  *) echo "usage: bash tests/tune.sh grid|lrs|heldout|untuned|sizes|all|--list PHASE|--flops|--table|--tables PHASE" >&2; exit 2 ;;
esac
case "$1" in
  grid) go grid; choose_cell; grid_table ;;
  lrs) tune_lrs ;;
  heldout|untuned) go "$1"; tables "$1" ;;
  sizes) sizes ;;
  all) go grid; choose_cell; grid_table; sizes ;;
esac
