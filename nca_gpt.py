"""
NCA pre-pre-training in one file (Lee, Han, Kumar, Agrawal, arXiv 2603.10055).

Read it top to bottom:
  1. the NCA data engine: random rule networks on a torus, the batched rollout, the 2x2 patch
     tokenizer and its inverse, the gzip complexity filter, the training batches; the Dyck control
  2. `--stage show`: look at the automata and at the statistics of the filter

Run:  python nca_gpt.py --stage show
      python nca_gpt.py --stage nca
Every config value below can be overridden as --key=value or --key value.
"""
import gzip
import json as jsonlib  # `json` is a config key (--json=PATH)
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config
stage = 'nca'           # show | nca | dyck
seed = 1337             # one seed gives the same rules, sequences and losses
device = ''             # '' picks cuda, then mps, then cpu
# NCA data: the defaults are the paper's (its public code)
grid = 12               # the torus is grid x grid cells
n_states = 10           # each cell holds one of n_states colours
patch = 2               # a patch x patch block of cells is one token: vocabulary n_states ** (patch * patch)
temperature = 1e-4      # softmax temperature of the update; 0 means exact argmax
identity_bias = 0.0     # added to the logit of a cell's current state (>0 makes rules lazier)
burn_in = 10            # steps simulated and dropped before the first frame
seq_len = 1024          # tokens per sequence (the model's context)
gzip_lower = 0.5        # keep a rule when gzip_lower < ratio < gzip_upper: (0.5, 1.0) for web text
gzip_upper = 1.0        #   and math, (0.3, 0.4) for code in the paper
gzip_frames = 10        # frames after burn-in that the filter compresses
num_rules = 16000       # training rules per epoch (--stage show: candidate rules to analyse)
num_val_rules = 2000    # held-out rules, never trained on
rule_resample = 1       # epochs between fresh rule sets; 0 = one set for the whole run (the authors' code)
# Dyck control
dyck_k = 64             # bracket types: vocabulary 2 * dyck_k
dyck_depth = 16         # maximum nesting depth
dyck_p_open = 0.5       # probability of opening when both moves are allowed
# --stage show
json = ''               # also write the statistics to this path
# -----------------------------------------------------------------------------

# =============================================================================
# 1. The NCA data engine
# =============================================================================
# Every random number is a pure function of (seed, what it is for, which sequence or rule), made by a
# counter-based hash rather than a stateful generator. So sequence i of epoch e is the same whatever the
# batch size, the number of GPUs, the device, or where a resumed run picks up.

MASK32 = 0xFFFFFFFF
RULES, SEQUENCES, ORDER, DYCK, GRID = 1, 2, 3, 4, 5  # streams: what the random numbers are for
SPLITS = {'train': 0, 'val': 1}


def mix32(x):
    """A bijective 32-bit integer hash (multipliers under 2**31, so int64 products never overflow)."""
    x = (((x >> 16) ^ x) * 0x45d9f3b) & MASK32
    x = (((x >> 16) ^ x) * 0x45d9f3b) & MASK32
    return (x >> 16) ^ x


def make_key(*ids):
    """Hash a tuple of ids (ints, or one int64 tensor of them) into one 32-bit key per element."""
    h = 0
    for i in ids:
        h = mix32(h ^ (i & MASK32))
    return h


def uniform(keys, n):
    """keys (N,) int64 -> (N, n) float32 uniforms strictly inside (0, 1), counter k of key j."""
    counters = mix32(torch.arange(n, device=keys.device) + 0x9E3779B)
    x = mix32(keys[:, None] ^ counters)
    return ((x >> 9).float() + 0.5) / 2 ** 23  # 23 bits: exact in float32, never 0 or 1


def categorical(probs, u):
    """Inverse-CDF sampling: probs (..., n), u (...) uniforms -> (...) indices."""
    return (probs.cumsum(-1) < u.unsqueeze(-1)).sum(-1).clamp_max(probs.size(-1) - 1)


# --- the rule network ---------------------------------------------------------
# The paper's rule (Flax): wrap-pad by 1, conv 3x3 n->4, conv 1x1 4->16, ReLU, conv 1x1 16->n logits.
# Flax draws kernels from lecun normal (truncated normal, variance 1/fan_in) and biases as zeros. The
# rules are never trained, so their 30 biases stay zero and are left out here: 614 - 30 = 584 weights.
HIDDEN1, HIDDEN2 = 4, 16


def rule_shapes(n):
    return [(HIDDEN1, n, 3, 3), (HIDDEN2, HIDDEN1), (n, HIDDEN2)]  # conv1, conv2, conv3 (out, in, ...)


def sample_rules(keys, n):
    """keys (R,) -> rules (R, P): each row the flattened weights of one rule."""
    shapes = rule_shapes(n)
    sizes = [math.prod(s) for s in shapes]
    u = uniform(keys, sum(sizes))
    # truncated normal on [-2, 2] by inverse CDF; Flax divides the std by the std of that truncation
    lo, hi = 0.5 * math.erfc(2 / math.sqrt(2)), 0.5 * math.erfc(-2 / math.sqrt(2))
    z = torch.special.ndtri(lo + u * (hi - lo))
    fan_in = torch.cat([torch.full((size,), math.prod(s[1:]), device=keys.device) for s, size in zip(shapes, sizes)])
    return z * (1.0 / fan_in).sqrt() / 0.87962566103423978


def unpack_rules(rules, n):
    """rules (R, P) -> conv1 (R, 4, n, 3, 3), conv2 (R, 16, 4), conv3 (R, n, 16)"""
    shapes = rule_shapes(n)
    parts = rules.split([math.prod(s) for s in shapes], dim=1)
    return [p.view(-1, *s) for p, s in zip(parts, shapes)]


def initial_grids(keys, n, size):
    """keys (R,) -> (R, size, size) long: per trajectory, colour logits ~ N(0, 1), then i.i.d. cells."""
    u = uniform(keys, n + size * size)
    probs = torch.softmax(torch.special.ndtri(u[:, :n]), dim=-1)             # (R, n)
    cells = categorical(probs[:, None, :], u[:, n:])                          # (R, size*size)
    return cells.view(-1, size, size)


def torus_neighbours(size, device):
    """(9, size*size): flat index of each cell's 3x3 neighbourhood on the torus, in conv kernel order."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    nbrs = [((y + dy) % size) * size + (x + dx) % size for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack(nbrs).view(9, -1).to(device)


@torch.no_grad()
def rollout(rules, grid0, n_steps, keys, temperature, identity_bias=0.0):
    """Advance R automata at once, each with its own rule: no Python loop over rules or cells.
    rules (R, P), grid0 (R, S, S) long, keys (R,) for the sampling noise -> (R, n_steps + 1, S, S):
    the initial grid, then the state after each step."""
    R, S, _ = grid0.shape
    n = (rules.size(1) - HIDDEN2 * HIDDEN1) // (9 * HIDDEN1 + HIDDEN2)
    w1, w2, w3 = unpack_rules(rules, n)
    # conv 3x3 then conv 1x1 with nothing between is one linear map, and its input is one-hot, so the
    # first two layers collapse into a lookup table: (neighbour k, that neighbour's state) -> 16 values.
    table = torch.einsum('rcsij,roc->rijso', w1, w2).reshape(R * 9 * n, HIDDEN2)
    nbrs = torus_neighbours(S, grid0.device)                                        # (9, S*S)
    first_row = (torch.arange(R, device=grid0.device) * 9 * n).view(R, 1, 1) \
        + (torch.arange(9, device=grid0.device) * n).view(1, 9, 1)                  # (R, 9, 1)
    if temperature > 0:
        u = uniform(keys, n_steps * S * S).view(R, n_steps, S * S)
    state = grid0.reshape(R, S * S)
    states = [state]
    for t in range(n_steps):
        rows = first_row + state[:, nbrs]                                           # (R, 9, S*S)
        hidden = F.embedding_bag(rows.transpose(1, 2).reshape(-1, 9), table, mode='sum')  # (R*S*S, 16)
        logits = torch.bmm(F.relu(hidden).view(R, S * S, HIDDEN2), w3.transpose(1, 2))    # (R, S*S, n)
        if identity_bias:
            logits = logits + identity_bias * F.one_hot(state, n)
        if temperature == 0:
            state = logits.argmax(-1)
        else:
            state = categorical(torch.softmax(logits / temperature, dim=-1), u[:, t])
        states.append(state)
    return torch.stack(states, 1).view(R, n_steps + 1, S, S)


# --- the patch tokenizer --------------------------------------------------------
def frame_tokens(frames, n, p):
    """frames (R, T, S, S) -> (R, T, (S/p)**2) patch tokens, row-major; cell k of a patch (row-major)
    is digit k of the token in base n."""
    R, T, S, _ = frames.shape
    cells = frames.reshape(R, T, S // p, p, S // p, p).permute(0, 1, 2, 4, 3, 5).reshape(R, T, -1, p * p)
    return (cells * n ** torch.arange(p * p, device=frames.device)).sum(-1)


def tokenize(frames, n, p):
    """frames (R, T, S, S) -> (R, T * ((S/p)**2 + 2)): each frame is START, its patches, END."""
    tokens = frame_tokens(frames, n, p)
    start = tokens.new_full((*tokens.shape[:2], 1), n ** (p * p))
    return torch.cat([start, tokens, start + 1], dim=2).flatten(1)


def detokenize(tokens, n, p, size):
    """The exact inverse of tokenize: (R, T * ((S/p)**2 + 2)) -> frames (R, T, S, S)."""
    frame_len = (size // p) ** 2 + 2
    if tokens.size(1) % frame_len:
        raise ValueError(f"{tokens.size(1)} tokens are not whole frames of {frame_len} tokens")
    tokens = tokens.view(tokens.size(0), -1, frame_len)
    if (tokens[..., 0] != n ** (p * p)).any() or (tokens[..., -1] != n ** (p * p) + 1).any():
        raise ValueError("every frame must be START, patches, END")
    digits = tokens[..., 1:-1, None] // n ** torch.arange(p * p, device=tokens.device) % n
    R, T = digits.shape[:2]
    return digits.view(R, T, size // p, size // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(R, T, size, size)


# --- the gzip complexity filter -------------------------------------------------
def gzip_ratio(tokens):
    """The paper's complexity measure: gzip level 9 size / raw size of the token ids as int32 bytes.
    (As uint16 the same rules score far higher: the paper's bands assume int32.)"""
    raw = np.ascontiguousarray(tokens, dtype='<i4').tobytes()
    return len(gzip.compress(raw, compresslevel=9, mtime=0)) / len(raw)


_gzip_pool = ThreadPoolExecutor(os.cpu_count())  # zlib releases the GIL, so threads use every core


def rule_complexity(rules, keys):
    """rules (R, P), keys (R,) -> (R,) gzip ratios of the patch tokens of gzip_frames frames after
    burn-in, from a random initial grid of the rule's own."""
    grid0 = initial_grids(make_key(keys, GRID), n_states, grid)
    frames = rollout(rules, grid0, burn_in + gzip_frames - 1, keys, temperature, identity_bias)[:, burn_in:]
    tokens = frame_tokens(frames, n_states, patch).flatten(1).cpu().numpy()
    return torch.tensor(list(_gzip_pool.map(gzip_ratio, tokens)), dtype=torch.float32)


def candidate_rules(split, rule_set, first, count):
    """Candidates first..first+count-1 of a rule set -> keys (count,), rules (count, P)."""
    keys = make_key(seed, SPLITS[split], RULES, rule_set, torch.arange(first, first + count, device=device))
    return keys, sample_rules(keys, n_states)


_rule_sets = {}


def get_rule_set(split, rule_set, count, chunk=2048):
    """Rejection sampling: the first `count` candidates of a rule set whose gzip ratio is in the band.
    -> rules (count, P) on the device. Cached: the training loop asks for the same set every batch."""
    cache_key = (split, rule_set, count, seed, device, grid, n_states, patch, temperature, identity_bias,
                 burn_in, gzip_lower, gzip_upper, gzip_frames)
    if cache_key not in _rule_sets:
        t0, kept, n_kept, tried = time.time(), [], 0, 0
        while n_kept < count:
            keys, rules = candidate_rules(split, rule_set, tried, chunk)
            ratio = rule_complexity(rules, keys).to(rules.device)
            kept.append(rules[(gzip_lower < ratio) & (ratio < gzip_upper)])
            n_kept, tried = n_kept + len(kept[-1]), tried + chunk
            if n_kept == 0 and tried >= 20 * chunk:
                sys.exit(f"nca_gpt.py: no rule of {tried} had a gzip ratio in ({gzip_lower}, {gzip_upper}); "
                         f"widen the band (python nca_gpt.py --stage show prints the distribution)")
        print(f"{split} rule set {rule_set}: {count} rules, {n_kept / tried:.0%} of {tried} candidates in "
              f"({gzip_lower}, {gzip_upper}), {time.time() - t0:.1f}s")
        if len(_rule_sets) >= 4:  # keep the current training and validation sets, drop older ones
            _rule_sets.pop(next(iter(_rule_sets)))
        _rule_sets[cache_key] = torch.cat(kept)[:count]
    return _rule_sets[cache_key]


# --- training batches -------------------------------------------------------------
def frame_len():
    return (grid // patch) ** 2 + 2  # START + patches + END: 38 at the defaults


def nca_sequences(rules, keys):
    """rules (B, P), keys (B,) -> (B, seq_len + 1) tokens: one rule and one initial grid per sequence."""
    n_frames = -(-(seq_len + 1) // frame_len())  # 27 frames at the defaults
    grid0 = initial_grids(make_key(keys, GRID), n_states, grid)
    frames = rollout(rules, grid0, burn_in + n_frames - 1, keys, temperature, identity_bias)[:, burn_in:]
    return tokenize(frames, n_states, patch)[:, :seq_len + 1]


def sequence_ids(index, batch_size):
    return torch.arange(index * batch_size, (index + 1) * batch_size, device=device)


@torch.no_grad()
def nca_batch(split, index, batch_size):
    """Batch `index` of a split -> X, Y (B, seq_len) long on the device, Y = -1 where there is no loss.
    Sequence i is the i-th of the split: epoch i // R uses rule set epoch // rule_resample in a fresh
    order, each rule once, with a fresh initial grid. Validation batches come from held-out rules."""
    count = num_rules if split == 'train' else num_val_rules
    i = sequence_ids(index, batch_size)
    epoch = i // count
    rules = torch.empty(batch_size, (9 * HIDDEN1 + HIDDEN2) * n_states + HIDDEN2 * HIDDEN1, device=device)
    for e in epoch.unique().tolist():  # a batch spans at most two epochs
        rule_set = get_rule_set(split, e // rule_resample if rule_resample else 0, count)
        order = uniform(make_key(seed, SPLITS[split], ORDER, torch.tensor([e], device=device)), count)[0].argsort()
        rules[epoch == e] = rule_set[order[i[epoch == e] % count]]
    seq = nca_sequences(rules, make_key(seed, SPLITS[split], SEQUENCES, i))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, :frame_len() - 1] = -1          # the first frame is context: the rule is inferred from it
    y[y >= n_states ** (patch * patch)] = -1  # START/END sit at fixed places: nothing to learn (the
    return x, y                               # authors' code meant to mask them but did not)


@torch.no_grad()
def dyck_batch(split, index, batch_size):
    """k-Dyck sequences (prefixes of balanced words): token t < k opens bracket type t, k + t closes it.
    -> X, Y (B, seq_len) long. Depth stays in [0, dyck_depth]; at depth 0 the next bracket must open,
    at full depth it must close, otherwise it opens with probability dyck_p_open."""
    B, L = batch_size, seq_len + 1
    u = uniform(make_key(seed, SPLITS[split], DYCK, sequence_ids(index, batch_size)), 2 * L).view(B, L, 2)
    stack = torch.zeros(B, dyck_depth, dtype=torch.long, device=device)  # open bracket types
    depth = torch.zeros(B, dtype=torch.long, device=device)
    seq = torch.empty(B, L, dtype=torch.long, device=device)
    b = torch.arange(B, device=device)
    for t in range(L):  # a loop over positions, batched over sequences: ~1 ms a step
        opens = ((u[:, t, 0] < dyck_p_open) | (depth == 0)) & (depth < dyck_depth)
        kind = (u[:, t, 1] * dyck_k).long()
        seq[:, t] = torch.where(opens, kind, dyck_k + stack[b, (depth - 1).clamp_min(0)])
        top = depth.clamp_max(dyck_depth - 1)
        stack[b, top] = torch.where(opens, kind, stack[b, top])
        depth += 2 * opens - 1
    return seq[:, :-1], seq[:, 1:]


# =============================================================================
# 2. --stage show: see the automata and the statistics of the filter
# =============================================================================
PALETTE = [196, 46, 21, 226, 201, 51, 255, 130, 240, 208]  # xterm-256 colours, one per state


def draw_frames(frames, color):
    """frames (T, S, S) -> lines of text: frames side by side, two characters per cell."""
    def cell(v):
        if color and v < len(PALETTE):
            return f"\x1b[48;5;{PALETTE[v]}m  \x1b[0m"
        return f"{v:x} " if v < 16 else f"{v:<2}"
    return ['   '.join(''.join(cell(v) for v in row) for row in rows) for rows in frames.transpose(0, 1).tolist()]


def zipf_stats(tokens):
    """Token frequency against rank; the slope of log frequency over log rank (Zipf: about -1)."""
    counts = np.sort(np.bincount(tokens.ravel()))[::-1]
    counts = counts[counts > 0]
    ranks = np.arange(1, len(counts) + 1)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0] if len(counts) > 1 else 0.0
    return counts / counts.sum(), float(slope)


def show():
    t0 = time.time()
    keys, rules = candidate_rules('train', 0, 0, num_rules)
    ratios = torch.cat([rule_complexity(rules[i:i + 2048], keys[i:i + 2048]) for i in range(0, num_rules, 2048)])
    filter_rate = num_rules / (time.time() - t0)
    in_band = (gzip_lower < ratios) & (ratios < gzip_upper)
    kept, kept_keys = rules[in_band.to(rules.device)], keys[in_band.to(rules.device)]

    color = sys.stdout.isatty() and os.environ.get('TERM', 'dumb') != 'dumb' and 'NO_COLOR' not in os.environ
    print(f"Four rules in the band ({gzip_lower}, {gzip_upper}), frames 0-3 after {burn_in} burn-in steps:")
    frames = rollout(kept[:4], initial_grids(make_key(kept_keys[:4], GRID), n_states, grid), burn_in + 3,
                     kept_keys[:4], temperature, identity_bias)[:, burn_in:]
    for r, (f, ratio) in enumerate(zip(frames.cpu(), ratios[in_band][:4].tolist())):
        print(f"\nrule {r}, gzip ratio {ratio:.3f}")
        print('\n'.join(draw_frames(f, color)))

    q = np.quantile(ratios.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9])
    bands = [(0.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 1.0)]
    shares = {f"{lo}-{hi}": float(((lo < ratios) & (ratios < hi)).float().mean()) for lo, hi in bands}
    print(f"\ngzip ratio of {num_rules} candidate rules: quantiles 10/25/50/75/90% = {' / '.join(f'{v:.3f}' for v in q)}")
    print("share per band: " + ', '.join(f"{k} {v:.1%}" for k, v in shares.items()))
    print(f"band ({gzip_lower}, {gzip_upper}) accepts {in_band.float().mean():.1%}; "
          f"filter speed {filter_rate:,.0f} candidate rules/s")

    t0, B = time.time(), min(256, len(kept))
    seq = nca_sequences(kept[:B], make_key(kept_keys[:B], SEQUENCES))
    gen_rate = seq.numel() / (time.time() - t0)
    patches = seq[seq < n_states ** (patch * patch)].cpu().numpy()
    freqs, slope = zipf_stats(patches)
    print(f"\ntoken frequency by rank over {B} sequences ({len(freqs)} distinct patch tokens), Zipf slope {slope:.2f}:")
    for rank in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]:
        if rank <= len(freqs):
            print(f"  rank {rank:>5}: {freqs[rank - 1]:8.4%} " + '#' * max(1, int(40 + 8 * math.log10(freqs[rank - 1]))))
    print(f"generation + tokenisation: {gen_rate:,.0f} tokens/s on {device}")

    if json:
        stats = dict(num_rules=num_rules, seed=seed, device=device, band=[gzip_lower, gzip_upper],
                     quantiles=dict(zip(['p10', 'p25', 'p50', 'p75', 'p90'], q.tolist())), band_shares=shares,
                     acceptance=float(in_band.float().mean()), zipf_slope=slope, token_freq_by_rank=freqs[:1000].tolist(),
                     filter_rules_per_s=filter_rate, tokens_per_s=gen_rate, gzip_ratios=ratios.tolist())
        atomic_write(json, lambda f: jsonlib.dump(stats, open(f, 'w')))
        print(f"wrote {json}")


# =============================================================================
# Command line
# =============================================================================
def atomic_write(path, write):
    """write(tmp_path) then rename: a file is either whole or absent, never half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


config_keys = [k for k, v in list(globals().items())
               if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str))]
CHOICES = {'stage': ['show', 'nca', 'dyck']}


def die(msg):
    sys.exit(f"nca_gpt.py: {msg}")


def configure(argv):
    """Apply --key=value / --key value overrides to the config above, checking names and types."""
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith('--'):
            die(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, val = arg[2:].partition('=')
        if not eq:
            if not args or args[0].startswith('--'):
                die(f"--{key} needs a value")
            val = args.pop(0)
        if key not in config_keys:
            die(f"unknown option --{key}; valid options: {', '.join('--' + k for k in config_keys)}")
        default = globals()[key]
        try:
            if isinstance(default, bool):
                if val.lower() not in ('true', 'false', '1', '0'):
                    raise ValueError
                value = val.lower() in ('true', '1')
            else:
                value = type(default)(val)
        except ValueError:
            die(f"--{key}={val} is not a valid {type(default).__name__}")
        if key in CHOICES and value not in CHOICES[key]:
            die(f"--{key}={val} is not one of: {', '.join(CHOICES[key])}")
        globals()[key] = value


def pick_device():
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def main(argv):
    global device
    configure(argv)
    device = device or pick_device()
    if stage == 'show':
        show()
    else:
        die(f"--stage {stage} is not built yet")


if __name__ == '__main__':
    main(sys.argv[1:])
