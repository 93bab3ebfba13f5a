#!/usr/bin/env bash
# The data engine against the authors' JAX generator (github.com/danihyunlee/nca-pre-pretraining, checked at
# commit bdd1c71), side by side on this machine, at the paper's settings (12x12 torus, 10 states, temperature
# 1e-4, 2x2 patches, 10 burn-in steps; 1024-token sequences; the filter on 10 frames):
#   generation + tokenisation, tokens/s     (the project: nca_sequences in calls of 32, as training makes them;
#                                             the authors: generate_nca_dataset + NCA_Tokenizer.encode_task)
#   the gzip filter, candidate rules/s      (rule sampling and rollout included on both sides)
#   the two-sample KS statistic of the gzip ratios of 4096 random rules a side (same distribution?)
#
#   bash tests/bench_vs_authors.sh PATH_TO_AUTHORS_CLONE [--rounds=3] [--cpus=0] [--rules=4096]
#
# First use makes a venv with the authors' pinned versions (jax/jaxlib 0.6.2, flax 0.11.2, einops 0.8.1, CPU torch
# 2.13.0; their utils import matplotlib and joblib too) in $NCA_AUTHORS_VENV (default ${TMPDIR:-/tmp}/nca-authors-venv);
# later runs reuse it. The project's side runs with $PYTHON (default: python, e.g. the project's venv active).
# How: two long-lived workers, one per side, take turns (never both at once), round after round, each pinned to
# the same CPU (--cpus=; '' = unpinned, both then use every core); each side's best round counts. JAX compiles
# its scan again on each call: that compile time (JAX's own compile events) is taken out, and the first call of
# each side is a warm-up. Read the ratios: on a shared machine the absolute rates move. A few minutes on a CPU.
set -euo pipefail
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
clone='' rounds=3 cpus=0 rules=4096
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --rounds=*) rounds=${arg#*=} ;;
    --cpus=*) cpus=${arg#*=} ;;
    --rules=*) rules=${arg#*=} ;;
    -*) echo "bench_vs_authors.sh: unknown option $arg (--help)" >&2; exit 2 ;;
    *) [ -z "$clone" ] || { echo "bench_vs_authors.sh: one clone, not '$clone' and '$arg'" >&2; exit 2; }; clone=$arg ;;
  esac
done
[ -n "$clone" ] || { echo "bench_vs_authors.sh: give the path of a clone of the authors' repository (--help)" >&2; exit 2; }
for f in utils/nca.py utils/tokenizers.py; do
  [ -f "$clone/$f" ] || { echo "bench_vs_authors.sh: $clone/$f missing: not a clone of danihyunlee/nca-pre-pretraining" >&2; exit 2; }
done
[[ $rounds =~ ^[1-9][0-9]*$ && $rules =~ ^[1-9][0-9]*$ ]] || { echo "bench_vs_authors.sh: --rounds and --rules are counts" >&2; exit 2; }
clone=$(cd "$clone" && pwd)
command -v taskset >/dev/null || cpus=''  # util-linux; without it, unpinned
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch, numpy" 2>/dev/null || { echo "bench_vs_authors.sh: $PYTHON cannot import torch: activate the project's venv, or set PYTHON" >&2; exit 2; }
venv=${NCA_AUTHORS_VENV:-${TMPDIR:-/tmp}/nca-authors-venv}
if ! "$venv/bin/python" -c "import jax, flax, einops, matplotlib, joblib, torch" 2>/dev/null; then
  echo "making $venv with the authors' pinned versions (a minute or two)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "jax[cpu]==0.6.2" "jaxlib==0.6.2" "flax==0.11.2" "einops==0.8.1" matplotlib joblib "torch==2.13.0" >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The authors' side: one request a line on stdin, "gen N SEED" or "filter N SEED"; one JSON line back.
cat > "$work/authors.py" <<'PY'
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from utils.nca import compute_rule_gzip_batch, generate_nca_dataset
from utils.tokenizers import NCA_Tokenizer

tok, compiling = NCA_Tokenizer(patch=2, num_colors=10), [0.0]
COMPILE = ('/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration',
           '/jax/core/compile/backend_compile_duration')
jax.monitoring.register_event_duration_secs_listener(lambda e, s, **_: compiling.__setitem__(0, compiling[0] + s * (e in COMPILE)))
print(json.dumps(dict(version=f'jax {jax.__version__}')), flush=True)
for line in sys.stdin:
    what, n, seed = line.split()
    keys = jax.random.split(jax.random.PRNGKey(int(seed)), int(n))
    compiling[0], t0 = 0.0, time.perf_counter()
    if what == 'filter':  # their gzip ratio of each candidate rule: 10 burn-in steps, 10 frames
        ratios = np.asarray(compute_rule_gzip_batch(keys, tok, grid=12, d_state=10, temperature=1e-4, n_steps=10, dT=1,
                                                    start_step=10, mode='gzip'))
        got = len(ratios)
    else:  # 27 frames of 38 tokens, one rule a sequence, then their tokenizer
        sims = generate_nca_dataset(keys[0], num_sims=int(n), grid=12, d_state=10, temperature=1e-4, num_examples=27,
                                    dT=1, rule_seeds=keys, num_rules=int(n), start_step=10)
        seq, _ = tok.encode_task(np.asarray(sims))
        got, ratios = seq.shape[0] * min(seq.shape[1], 1024), None
    s = time.perf_counter() - t0
    print(json.dumps(dict(s=s - compiling[0], got=got, ratios=None if ratios is None else ratios.tolist())), flush=True)
PY

# The project's side: the same requests through nca_gpt.py's functions.
cat > "$work/project.py" <<'PY'
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import nca_gpt as m
m.device = 'cpu'
paper = dict(grid=12, n_states=10, patch=2, temperature=1e-4, burn_in=10, gzip_frames=10, block_size=1024, identity_bias=0.0)
if any(getattr(m, k) != v for k, v in paper.items()):
    sys.exit(f"nca_gpt.py's NCA defaults are not the paper's {paper}")
cfg = m.data_config('nca')
print(json.dumps(dict(version=f'torch {torch.__version__}, {torch.get_num_threads()} threads')), flush=True)
for line in sys.stdin:
    what, n, seed = line.split()
    n, seed, got, ratios = int(n), int(seed), 0, []
    t0 = time.perf_counter()
    for first in range(0, n, 2048 if what == 'filter' else 32):
        keys, rules = m.candidate_rules('train', seed, first, min(n - first, 2048 if what == 'filter' else 32), cfg)
        if what == 'filter':
            ratios.append(m.rule_complexity(rules, keys, cfg))
            got += len(rules)
        else:
            seq = m.nca_sequences(rules, m.make_key(keys, m.SEQUENCES), cfg)
            got += seq.shape[0] * min(seq.shape[1], 1024)
    s = time.perf_counter() - t0
    print(json.dumps(dict(s=s, got=got, ratios=torch.cat(ratios).tolist() if ratios else None)), flush=True)
PY

cat > "$work/drive.py" <<'PY'
import json, os, subprocess, sys
import numpy as np

work, clone, authors_py, rounds, cpus, n_rules = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
pin = ['taskset', '-c', cpus] if cpus else []
GEN = 1024  # sequences a generation request; the filter's requests are of n_rules candidates


def start(cmd, name):
    p = subprocess.Popen(pin + cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(f'{work}/{name}.err', 'w'),
                         text=True)
    line = p.stdout.readline()
    if not line:
        sys.exit(f"the {name} worker did not start:\n{open(f'{work}/{name}.err').read()[-1500:]}")
    return p, json.loads(line)['version']


def ask(p, name, what, n, seed):
    p.stdin.write(f'{what} {n} {seed}\n')
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        sys.exit(f"the {name} worker died on '{what} {n}':\n{open(f'{work}/{name}.err').read()[-1500:]}")
    return json.loads(line)


sides = dict(authors=start([authors_py, f'{work}/authors.py', clone], 'authors'),
             project=start([sys.executable, f'{work}/project.py'], 'project'))
best, ratios = {}, {}
for r in range(rounds + 1):  # round 0 warms up (JAX compiles every op once a shape) and gives the KS samples
    for what, n in (('gen', GEN), ('filter', n_rules)):
        for name, (p, _) in sides.items():
            a = ask(p, name, what, n, r)
            if what == 'filter' and r == 0:
                ratios[name] = np.array(a['ratios'])
            if r:
                best[name, what] = max(best.get((name, what), 0.0), a['got'] / a['s'])
for p, _ in sides.values():
    p.stdin.close()
    p.wait()


def ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(np.sort(a), x, 'right') / len(a) - np.searchsorted(np.sort(b), x, 'right') / len(b)).max())


def fmt(v):
    return f'{v / 1e6:.2f}M' if v >= 1e6 else f'{v / 1e3:.0f}k' if v >= 1e4 else f'{v:,.0f}'


print(f"project: {sides['project'][1]}; authors: {sides['authors'][1]}; {'cpu ' + cpus if cpus else 'unpinned'}, "
      f"best of {rounds} rounds after a warm-up")
print(f"{'':34}{'project':>10}{'authors':>10}{'ratio':>8}")
for what, unit in (('gen', 'generation + tokenisation, tokens/s'), ('filter', 'gzip filter, rules/s')):
    p, a = best['project', what], best['authors', what]
    print(f"{unit:34}{fmt(p):>10}{fmt(a):>10}{p / a:>7.1f}x")
a, b = ratios['project'], ratios['authors']
q = lambda v: ' / '.join(f'{x:.3f}' for x in np.quantile(v, [0.25, 0.5, 0.75]))
print(f"gzip ratios of {len(a)} and {len(b)} random rules: quartiles {q(a)} (project), {q(b)} (authors); "
      f"in 0.5-1.0: {((a > 0.5) & (a < 1)).mean():.1%} / {((b > 0.5) & (b < 1)).mean():.1%}")
d, ne = ks(a, b), len(a) * len(b) / (len(a) + len(b))
lam = (np.sqrt(ne) + 0.12 + 0.11 / np.sqrt(ne)) * d  # the asymptotic p-value (Numerical Recipes' probks)
p = min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * np.exp(-2 * k * k * lam * lam) for k in range(1, 101))))
print(f"two-sample KS statistic D = {d:.4f}, p = {p:.2f} (5% critical value {1.358 / np.sqrt(ne):.4f})")
PY

"$PYTHON" "$work/drive.py" "$work" "$clone" "$venv/bin/python" "$rounds" "$cpus" "$rules"
