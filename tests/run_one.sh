# Sourced by tests/study.sh and tests/tune.sh (from the repository's root): one() runs one line of their run
# lists, OUT_DIR|the stage-1 OUT_DIR it starts from (or -)|flags, unless OUT_DIR/done says it ran already.
one() {  # run one line of runs(), unless done or running elsewhere; a stage-2 run waits for its stage 1
  IFS='|' read -r dir from flags <<< "$1"
  [ -f "$dir/done" ] && return 0
  mkdir -p "$dir"
  # two harnesses at once (a phase and a hand-picked list) never run one run twice; the lock dies with its holder
  exec 9> "$dir/lock"
  flock -n 9 || { echo "running elsewhere: $dir"; return 0; }
  [ -f "$dir/done" ] && return 0
  if [ "$from" != - ]; then
    while [ ! -f "$from/done" ]; do [ -f "$from/failed" ] && { echo "skipped $dir: $from failed"; return 0; }; sleep 5; done
    flags="$flags --init_from=$from"
  fi
  rm -f "$dir/failed"
  # a run stopped part-way continues from its last checkpoint, with its own settings, as if it had never stopped
  [ -f "$dir/ckpt.pt" ] && flags="--init_from=resume"
  if OMP_NUM_THREADS=1 $PY nca_gpt.py $flags --out_dir="$dir" >> "$dir/stdout" 2>&1; then touch "$dir/done"; echo "done $dir"
  else touch "$dir/failed"; echo "FAILED $dir (see $dir/stdout)"; fi
}
export -f one; export PY
