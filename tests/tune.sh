#!/usr/bin/env bash
# Best against best (docs/study.md, "Tuned"): every arm at its own tuned settings, chosen on seeds 1-2 and reported
# on held-out seeds, paired by seed. The protocol, fixed before any run was looked at:
#   - stage 2 is the study's (recipe B: 800 updates of 8 x 256 pystdlib bytes, warm-up 80, cosine to lr / 10, weight
#     decay 0.1) under the project's recipe; its peak learning rate is tuned per arm over STAGE2_LRS
#   - NCA's stage 1 (regime b's data: 2-state rules, band 0.1-1.0, 4 x 512 tokens an update, stopped at the peak)
#     is tuned over S1_LRS x S1_ITERS, each cell scored by its stage-2 result at lr 1e-3 (the study's)
#   - choice: the lowest mean final validation loss over seeds 1-2; then the chosen settings on HELDOUT seeds, scratch
#     against NCA and against NCA's shuffled control at NCA's settings, each paired by seed (eval.py compare)
#
#   bash tests/tune.sh tune        # the tuning runs (seeds 1-2), then the choice -> OUT/chosen.env and its table
#   bash tests/tune.sh heldout     # the chosen settings on the held-out seeds, then the tables
#   bash tests/tune.sh --list tune # only print a phase's runs
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
S1_ITERS=${S1_ITERS:-100 300}
STAGE2_LRS=${STAGE2_LRS:-5e-4 1e-3 2e-3}
SHAPE=${SHAPE:-tiny}  # tiny: 2 layers, width 128 (the study's); w256: width 256; small: GPT-2 small's 12 x 768
CONTROL=${CONTROL-shuffled}  # the held-out phase's control arm ('' leaves it out)
if [ "$SHAPE" = small ]; then
  MODEL="--preset=small --n_layer=12 --n_head=12 --n_embd=768 --eval_iters=8"
elif [ "$SHAPE" = w256 ]; then
  MODEL="--preset=tiny --n_layer=2 --n_head=4 --n_embd=256 --eval_iters=8"
else
  MODEL="--preset=tiny --n_layer=2 --n_head=4 --n_embd=128 --eval_iters=8"
fi
S1="$MODEL --stage=nca --block_size=512 --batch_size=4 --n_states=2 --gzip_lower=0.1 --gzip_upper=1.0 \
    --stop_at_peak=true --eval_interval=100 --pad_vocab=64"
S2="$MODEL --stage=lm --dataset=pystdlib --block_size=256 --batch_size=8 --max_iters=800 --warmup_iters=80 \
    --lr_decay_iters=800 --weight_decay=0.1 --eval_interval=50"

stage2() {  # stage2 OUT_DIR FROM LR SEED: the run line of a stage-2 run (min_lr: a tenth of the peak, as recipe B)
  local min; min=$($PY -c "print(f'{$3 / 10:g}')")
  echo "$1|$2|$S2 --learning_rate=$3 --min_lr=$min --seed=$4"
}

runs() {  # runs PHASE: one line per run: out_dir|the stage-1 out_dir it starts from (or -)|flags
  local s lr it
  if [ "$1" = tune ]; then
    for s in $TUNE_SEEDS; do for lr in $S1_LRS; do for it in $S1_ITERS; do
      echo "$OUT/s1-nca-lr$lr-it$it-s$s|-|$S1 --learning_rate=$lr --max_iters=$it --seed=$s"
    done; done; done
    for s in $TUNE_SEEDS; do
      for lr in $STAGE2_LRS; do stage2 "$OUT/scratch-lr$lr-s$s" - "$lr" "$s"; done
      for lr in $S1_LRS; do for it in $S1_ITERS; do
        stage2 "$OUT/nca-lr$lr-it$it-s$s" "$OUT/s1-nca-lr$lr-it$it-s$s" 1e-3 "$s"
      done; done
    done
  else
    [ -f "$OUT/chosen.env" ] || { echo "no $OUT/chosen.env: run \`bash tests/tune.sh tune\` first" >&2; exit 2; }
    . "$OUT/chosen.env"
    for s in $HELDOUT; do for a in nca $CONTROL; do
      echo "$OUT/held-s1-$a-s$s|-|$S1 --learning_rate=$NCA_S1_LR --max_iters=$NCA_S1_ITERS --seed=$s \
--nca_shuffle=$([ $a = shuffled ] && echo true || echo false)"
    done; done
    for s in $HELDOUT; do
      stage2 "$OUT/held-scratch-s$s" - "$SCRATCH_LR" "$s"
      for a in nca $CONTROL; do stage2 "$OUT/held-$a-s$s" "$OUT/held-s1-$a-s$s" "$NCA_LR" "$s"; done
    done
  fi
}

. tests/run_one.sh  # one(): a run of the list, unless done; a stage 2 waits for its stage 1

choose() {  # the protocol's choice, from the tuning runs' logs -> OUT/chosen.env
  $PY - "$OUT" "$S1_LRS" "$S1_ITERS" "$STAGE2_LRS" "$TUNE_SEEDS" <<'EOF'
import json, os, sys
out, s1_lrs, s1_iters, lrs, seeds = sys.argv[1], *(a.split() for a in sys.argv[2:])
def final(d):
    rows = [json.loads(line) for line in open(os.path.join(d, 'log.jsonl'))]
    return [r['val_loss'] for r in rows if 'val_loss' in r][-1]
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

tables() {
  if [ "$1" = tune ]; then
    $PY eval.py compare --runs="scratch=$OUT/scratch-lr1e-3-s*,$(for lr in $S1_LRS; do for it in $S1_ITERS; do
      printf 'nca-%s-%s=%s,' "$lr" "$it" "$OUT/nca-lr$lr-it$it-s*"; done; done)" --baseline=scratch \
      --out="$OUT/compare-tune.json" || true
  else
    local control=''
    [ -n "$CONTROL" ] && control=",$CONTROL=$OUT/held-$CONTROL-s*"
    $PY eval.py compare --runs="scratch=$OUT/held-scratch-s*,nca=$OUT/held-nca-s*$control" \
      --baseline=scratch --out="$OUT/compare-heldout.json" --png="$OUT/compare-heldout.png" || true
  fi
}

flops() {  # the tuning and held-out runs' training FLOPs at SHAPE, and their time on one H100 at 40% of its bf16 peak
  $PY - "$SHAPE" "$S1_LRS" "$S1_ITERS" "$TUNE_SEEDS" "$STAGE2_LRS" "$HELDOUT" <<'EOF'
import sys
import torch
import nca_gpt
shape, s1_lrs, s1_iters, seeds, lrs, held = sys.argv[1], *(a.split() for a in sys.argv[2:])
L, H, C = (12, 12, 768) if shape == 'small' else (2, 4, 128)
def per_token(vocab, T):
    with torch.device('meta'):
        return nca_gpt.GPT(vocab, L, H, C, T).flops_per_token(T)
stage1 = lambda it: it * 4 * 512 * per_token(64, 512)            # 2-state NCA: 18 tokens, padded to 64
stage2 = 800 * 8 * 256 * per_token(320, 256)                     # pystdlib bytes: 257 tokens, padded to 320
tune = len(seeds) * (sum(stage1(int(it)) for it in s1_iters) * len(s1_lrs)
                     + stage2 * (len(lrs) + len(s1_lrs) * len(s1_iters)))
heldout = len(held) * (3 * stage2 + 2 * stage1(max(int(it) for it in s1_iters)))
for name, f in (('tuning', tune), ('held-out (the longest stage 1)', heldout), ('all', tune + heldout)):
    print(f"{name:<32} {f:.3e} FLOPs = {f / (0.4 * 989e12) / 60:.1f} min on one H100 at 40% of 989 TFLOP/s")
EOF
}

case "${1:-}" in
  --list) runs "${2:-tune}"; exit 0 ;;
  --flops) flops; exit 0 ;;
  tune|heldout) ;;
  *) echo "usage: bash tests/tune.sh tune|heldout|--list PHASE|--flops" >&2; exit 2 ;;
esac
[ -f data/pystdlib/meta.json ] || $PY prepare_data.py pystdlib --tokenizer=bytes
runs "$1" | xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
[ "$1" = tune ] && choose
tables "$1"
