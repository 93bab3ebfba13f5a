"""
NCA pre-pre-training in one file (Lee, Han, Kumar, Agrawal, "Training Language Models via Neural
Cellular Automata", arXiv 2603.10055). A GPT learns to predict the frames of random neural cellular
automata, where every sequence has a hidden rule to infer in context; its transformer blocks then
start a language model.

Read it top to bottom. The method, in parts that take their settings as arguments:
  1. the NCA data (NCAConfig): draw a rule, roll it out, tokenise, filter by gzip, batch;
     then the Dyck control (DyckConfig)
  2. the GPT (Llama-style)
  3. the transfer: keep the blocks, re-initialise the embedding and the head
  Appendix A-C, which a reader of the method may skip: the rollout made fast (a lookup table
     with rollout_plain's states), the random numbers as hashes, a band too narrow to fill.
Then the script, as nanoGPT's train.py: the config, the stage-1 sources (SOURCES), the language
batches, one training loop for every stage (nca | dyck -> lm -> sft), and its machinery.
Not here: evaluation, plots, Hugging Face folders and the NCA data's statistics (eval.py),
downloads (prepare_data.py).

    python nca_gpt.py --stage nca                  # then --stage lm --init_from=out-nca (README)
    torchrun --nproc_per_node=8 nca_gpt.py --stage nca --preset=paper
"""
import dataclasses
import functools
import gzip
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ==== 1. The NCA data ========================================================
# The data path, as nca_batch runs it (each step a function below, in this order):
#   rules  = rule_set(cfg, split, which)[order]        random rules, kept if in the gzip band
#   frames = trajectories(rules, keys, n_frames, cfg)  roll each out from a random grid
#   seq    = tokenize(frames, n_states, patch)         2x2 patches, each frame START ... END
#   x, y   = seq[:, :-1], seq[:, 1:]                   y = -1 on the first frame: context only
@dataclasses.dataclass(frozen=True)
class NCAConfig:
    """Everything an NCA batch depends on. The defaults are the paper's, from its public code;
    each field is a command-line option too (--n_states=3)."""
    grid: int = 12               # the torus is grid x grid cells
    n_states: int = 10           # each cell holds one of n_states colours
    rule_hidden1: int = 4        # the rule network: 3x3 conv n_states -> rule_hidden1,
    rule_hidden2: int = 16       #   then 1x1 -> rule_hidden2, ReLU, 1x1 -> n_states
    patch: int = 2               # a patch x patch block of cells is one token:
                                 #   n_states ** (patch * patch) of them
    temperature: float = 1e-4    # softmax temperature of the update; 0 means exact argmax
    identity_bias: float = 0.0   # added to the logit of a cell's current state (> 0: lazier rules)
    burn_in: int = 10            # steps simulated and dropped before the first frame
    gzip_lower: float = 0.5      # keep a rule when gzip_lower < ratio < gzip_upper: (0.5, 1.0)
    gzip_upper: float = 1.0      #   for web text and math, (0.3, 0.4) for code in the paper
    gzip_frames: int = 10        # frames after burn-in that the filter compresses
    num_rules: int = 16000       # training rules per epoch (eval.py nca: candidates to analyse)
    num_val_rules: int = 2000    # held-out rules, never trained on
    rule_resample: int = 1       # epochs between fresh rule sets; 0 = one set for the whole run
                                 #   (the authors' code)
    nca_loss: str = 'patches'    # patches: START/END out of the loss | all: predicted too
                                 #   (the authors' code)
    nca_shuffle: bool = False    # control: permute each sequence's patch tokens
                                 #   (the same tokens, no dynamics)
    seed: int = 1337             # the run's: one seed gives the same rules and sequences
    block_size: int = 1024       # the run's context: a sequence is this long
    device: str = 'cpu'


# --- draw a rule ----------------------------------------------------------------
# A rule is a tiny conv-MLP with random, never-trained weights. It reads a cell's 3x3
# neighbourhood of one-hot states on the torus and gives logits for the cell's next state, drawn
# at a low temperature. Every cell updates at every step (Growing NCA updates a random half; here
# there is no fire rate). Its random numbers are hashes (appendix B): rule i of a rule set is the
# same whatever the batch, the device or the number of GPUs.

def rule_shapes(cfg):
    """The rule network's three kernels (out, in, ...); the paper's biases start at 0 and stay
    there."""
    n, h1, h2 = cfg.n_states, cfg.rule_hidden1, cfg.rule_hidden2
    return [(h1, n, 3, 3), (h2, h1), (n, h2)]


def rule_nonlinearity(h):
    """Between the rule network's two 1x1 convs: both rollouts (plain and appendix A's) use it."""
    return h.relu_()


def candidate_rules(split, which, first, count, cfg=NCAConfig()):
    """Candidates first .. first + count - 1 of rule set `which` -> keys (count,), rules
    (count, P). cfg defaults to the paper's data, here and in rule_complexity and nca_sequences."""
    index = torch.arange(first, first + count, device=cfg.device)
    keys = make_key(cfg.seed, SPLITS[split], RULES, which, index)
    return keys, sample_rules(keys, cfg)


def sample_rules(keys, cfg):
    """keys (R,) -> rules (R, P), each row the flattened weights of one rule (P = 584 for 10
    states). The kernels are Flax's lecun normal: a normal truncated at 2 std, variance
    1 / fan-in."""
    if len(keys) > 256:  # in pieces that stay in cache: 3x faster for 2,048 rules
        pieces = [sample_rules(keys[i:i + 256], cfg) for i in range(0, len(keys), 256)]
        return torch.cat(pieces)
    shapes = rule_shapes(cfg)
    sizes = [math.prod(s) for s in shapes]
    u = uniform(keys, sum(sizes))
    # the truncated normal by its inverse CDF
    lo = 0.5 * math.erfc(2 / math.sqrt(2))
    hi = 0.5 * math.erfc(-2 / math.sqrt(2))
    z = torch.special.ndtri(lo + u * (hi - lo))
    fan_in = [torch.full((size,), math.prod(s[1:]), device=keys.device)
              for s, size in zip(shapes, sizes)]
    # Flax divides the std by the std of a normal truncated at 2 (0.8796...)
    return z * (1.0 / torch.cat(fan_in)).sqrt() / 0.87962566103423978


def unpack_rules(rules, cfg):
    """rules (R, P) -> the kernels conv1 (R, h1, n, 3, 3), conv2 (R, h2, h1), conv3 (R, n, h2)
    (h1, h2: rule_hidden1, rule_hidden2; 4 and 16 in the paper): views, not copies."""
    shapes = rule_shapes(cfg)
    parts = rules.split([math.prod(s) for s in shapes], dim=1)
    return [p.view(-1, *s) for p, s in zip(parts, shapes)]


# --- roll it out ------------------------------------------------------------------
def initial_grids(keys, n, size):
    """keys (R,) -> (R, size, size) long: per grid, colour logits ~ N(0, 1), then i.i.d. cells."""
    u = uniform(keys, n + size * size)
    probs = torch.softmax(torch.special.ndtri(u[:, :n]), dim=-1)                  # (R, n)
    cdf = probs.cumsum(-1)  # categorical() for size*size draws from each grid's one distribution
    cells = torch.searchsorted(cdf, u[:, n:] * cdf[:, -1:]).clamp_max(n - 1)      # (R, size*size)
    return cells.view(-1, size, size)


def per_rule_conv(x, kernel):
    """x (R, in, H, W), kernel (R, out, in, k, k) -> (R, out, H - k + 1, W - k + 1):
    rule r's kernel on grid r."""
    R = x.size(0)
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernel.flatten(0, 1), groups=R)
    return y.view(R, kernel.size(1), *y.shape[2:])


def draw_next(logits, state, u, temperature, identity_bias):
    """logits (R, n, C) of each cell's next state, state (R, C) -> (R, C): the tempered draw,
    softmax(logits / T) sampled by inverse CDF with the uniforms u (R, C); T = 0 is the argmax
    (the first of tied states)."""
    if identity_bias:
        current = F.one_hot(state.long(), logits.size(1)).transpose(1, 2)  # (R, n, C)
        logits = logits + identity_bias * current
    if temperature == 0:
        return logits.max(1).indices
    # unnormalised (categorical scales u by the total) and in place; the clamp keeps exp out of the
    # slow subnormal range (e^-80 ~ 1e-35: as good as 0 next to the top state's 1)
    logits = logits.sub_(logits.amax(1, keepdim=True)).div_(temperature)
    weights = logits.clamp_min_(-80).exp_()
    return categorical(weights, u, dim=1)


def nca_step(state, kernels, u, temperature, identity_bias):
    """One step of R automata, each under its own rule, written as the network it is.
    state (R, S, S) long, kernels from unpack_rules, u (R, S*S) uniforms
    -> the next state (R, S, S)."""
    conv1, conv2, conv3 = kernels
    R, S, _ = state.shape
    x = F.one_hot(state, conv3.size(1)).permute(0, 3, 1, 2).float()   # (R, n, S, S) one-hot states
    x = F.pad(x, (1, 1, 1, 1), mode='circular')                     # (R, n, S+2, S+2): the torus
    h = per_rule_conv(x, conv1)                                      # (R, h1, S, S) 3x3 conv
    h = rule_nonlinearity(per_rule_conv(h, conv2[..., None, None]))  # (R, h2, S, S) 1x1, ReLU
    logits = per_rule_conv(h, conv3[..., None, None])                # (R, n, S, S) 1x1 conv
    next_state = draw_next(logits.flatten(2), state.view(R, -1), u, temperature, identity_bias)
    return next_state.view(R, S, S)


@torch.no_grad()
def rollout_plain(kernels, grid0, n_steps, keys, temperature, identity_bias=0.0):
    """grid0 (R, S, S) long, keys (R,) for the sampling noise -> (R, n_steps + 1, S, S), the
    initial grid then the state after each step. Step t draws cell c with counter t * S*S + c of
    its key."""
    R, S, _ = grid0.shape
    if temperature:
        us = uniform(keys, n_steps * S * S).view(R, n_steps, S * S)
    states = [grid0]
    for t in range(n_steps):
        u = us[:, t] if temperature else None
        states.append(nca_step(states[-1], kernels, u, temperature, identity_bias))
    return torch.stack(states, 1)


rollout = rollout_plain  # appendix A swaps in the lookup table: the same states, 2-3x faster


def trajectories(rules, keys, n_frames, cfg):
    """rules (R, P), keys (R,) -> (R, n_frames, S, S): the frames after burn-in, from each key's
    own random grid. The grid and the sampling noise have streams of their own (a rule's key
    already made its weights)."""
    grid0 = initial_grids(make_key(keys, GRID), cfg.n_states, cfg.grid)
    kernels = unpack_rules(rules, cfg)
    n_steps = cfg.burn_in + n_frames - 1
    noise = make_key(keys, NOISE)
    frames = rollout(kernels, grid0, n_steps, noise, cfg.temperature, cfg.identity_bias)
    return frames[:, cfg.burn_in:]


# --- tokenise: 2x2 patches, each frame between START and END ----------------------
def frame_markers(n, p):
    """START and END: the two ids after the n ** (p * p) patch tokens. A frame is START, its
    patches, END."""
    start = n ** (p * p)
    return start, start + 1


def frame_tokens(frames, n, p):
    """frames (R, T, S, S) -> (R, T, (S/p)**2) patch tokens, row-major; cell k of a patch
    (row-major) is digit k of the token in base n."""
    tokens = 0
    for k in range(p * p):  # cell k of every patch at once: a strided view, (R, T, S/p, S/p)
        tokens = tokens + frames[..., k // p::p, k % p::p] * n ** k
    return tokens.flatten(2)


def tokenize(frames, n, p):
    """frames (R, T, S, S) -> (R, T * ((S/p)**2 + 2)): each frame is START, its patches, END."""
    tokens = frame_tokens(frames, n, p)
    start, end = frame_markers(n, p)
    starts = tokens.new_full((*tokens.shape[:2], 1), start)
    ends = tokens.new_full((*tokens.shape[:2], 1), end)
    return torch.cat([starts, tokens, ends], dim=2).flatten(1)


def frame_len(cfg):
    return (cfg.grid // cfg.patch) ** 2 + 2  # START + patches + END: 38 at the defaults


def nca_problems(cfg, stage):
    """The command line's checks of the NCA settings: [(bad, one-line message)]."""
    n, p, frame = cfg.n_states, cfg.patch, frame_len(cfg)
    return [
        (n < 2, f"--n_states={n}: a cell needs at least 2 states to change"),
        (cfg.grid % p, f"--grid={cfg.grid} is not a multiple of --patch={p}: a frame is "
                       f"(grid / patch)^2 patches (e.g. --grid={cfg.grid - cfg.grid % p or p})"),
        (n ** (p * p) > 2 ** 16, f"--n_states={n} with --patch={p} gives {n}^{p * p} patch tokens, "
                                 f"over 2^16: 2x2 patches take up to 16 states (10: 10^4 tokens), "
                                 f"3x3 up to 3, 4x4 only 2"),
        (stage == 'nca' and cfg.block_size < 2 * frame - 1,
         f"--block_size={cfg.block_size} is shorter than two frames of {frame} tokens (the first "
         f"is context only): give at least {2 * frame - 1}"),
        (cfg.gzip_lower >= cfg.gzip_upper,
         f"the band --gzip_lower={cfg.gzip_lower} --gzip_upper={cfg.gzip_upper} is empty: the "
         f"lower bound must be below the upper")]


def nca_vocab(cfg):
    """What an NCA run's token ids mean: the patch tokens, then START and END."""
    _, end = frame_markers(cfg.n_states, cfg.patch)
    return dict(kind='nca', size=end + 1, n_states=cfg.n_states, patch=cfg.patch, grid=cfg.grid)


# --- filter by gzip: the complexity knob ----------------------------------------------
_gzip_pool = ThreadPoolExecutor(os.cpu_count())  # zlib releases the GIL, so threads use every core


def gzip_ratio(tokens):
    """The paper's complexity measure: gzip level 9 size / raw size of the token ids as int32 bytes.
    (As uint16 the same rules score far higher: the paper's bands assume int32.)"""
    raw = np.ascontiguousarray(tokens, dtype='<i4').tobytes()
    return len(gzip.compress(raw, compresslevel=9, mtime=0)) / len(raw)


def rule_complexity(rules, keys, cfg=NCAConfig()):
    """rules (R, P), keys (R,) -> (R,) gzip ratios of the patch tokens of the first gzip_frames
    frames. On a CPU 128 rules at a time: zlib's threads compress a part while the next one rolls
    out."""
    chunk = 128 if rules.device.type == 'cpu' else max(len(rules), 1)
    ratios = []
    for i in range(0, len(rules), chunk):
        frames = trajectories(rules[i:i + chunk], keys[i:i + chunk], cfg.gzip_frames, cfg)
        tokens = frame_tokens(frames, cfg.n_states, cfg.patch).flatten(1).cpu().numpy()
        ratios.append(_gzip_pool.map(gzip_ratio, tokens))  # submitted now, collected below
    return torch.tensor([r for part in ratios for r in part], dtype=torch.float32)


@functools.lru_cache(maxsize=4)  # the loop asks for the same set every batch: made once
def rule_set(cfg, split, which, chunk=2048):
    """Rejection sampling: the first num_rules (val: num_val_rules) candidates of rule set
    `which` whose gzip ratio is in the band -> rules (count, P) on the device."""
    count = cfg.num_rules if split == 'train' else cfg.num_val_rules
    t0 = time.time()
    kept, ratios = [], []
    while sum(map(len, kept)) < count:
        keys, rules = candidate_rules(split, which, chunk * len(kept), chunk, cfg)
        ratio = rule_complexity(rules, keys, cfg).to(rules.device)
        kept.append(rules[(cfg.gzip_lower < ratio) & (ratio < cfg.gzip_upper)])
        ratios.append(ratio.cpu())
        give_up_if_rare(cfg, count, kept, ratios, time.time() - t0)  # appendix C
    n_kept, tried = sum(map(len, kept)), chunk * len(kept)
    print(f"{split} rule set {which}: {count} rules, {n_kept / tried:.0%} of {tried} "
          f"candidates in ({cfg.gzip_lower}, {cfg.gzip_upper}), {time.time() - t0:.1f}s")
    return torch.cat(kept)[:count]


# --- batch: one rule a sequence, the first frame context only --------------------------
def sequence_ids(index, batch_size, device):
    """Batch `index` holds sequences index * batch_size .. of its split: (B,)."""
    return torch.arange(index * batch_size, (index + 1) * batch_size, device=device)


def rules_of_sequences(cfg, split, i):
    """Sequence ids i (B,) -> their rules (B, P). Epoch e = i // count (count: the split's rules)
    takes rule set e // rule_resample (0: one set for the whole run, the authors' code) in an
    order hashed from (seed, split, e): each rule once an epoch, with a fresh grid each time."""
    count = cfg.num_rules if split == 'train' else cfg.num_val_rules
    epoch = i // count
    rules = []
    for e in epoch.unique().tolist():  # a batch spans at most two epochs, in order
        which = 0
        if cfg.rule_resample:
            which = e // cfg.rule_resample
        rules_e = rule_set(cfg, split, which)
        order_key = make_key(cfg.seed, SPLITS[split], ORDER, torch.tensor([e], device=cfg.device))
        order = uniform(order_key, count)[0].argsort()
        rules.append(rules_e[order[i[epoch == e] % count]])
    return torch.cat(rules)


def nca_sequences(rules, keys, cfg=NCAConfig()):
    """rules (B, P), keys (B,) -> (B, block_size + 1) tokens: one rule and one initial grid per
    sequence."""
    n_frames = -(-(cfg.block_size + 1) // frame_len(cfg))  # 27 frames at the defaults
    frames = trajectories(rules, keys, n_frames, cfg)
    return tokenize(frames, cfg.n_states, cfg.patch)[:, :cfg.block_size + 1]


@torch.no_grad()
def nca_batch(cfg, split, index, batch_size):
    """Batch `index` of a split -> X, Y (B, block_size) long on the device, Y = -1 where there is
    no loss. Sequence i of a split is always the same: its rule (held-out rules for 'val') and
    its initial grid."""
    i = sequence_ids(index, batch_size, cfg.device)           # (B,) the sequences of this batch
    rules = rules_of_sequences(cfg, split, i)                  # (B, P): each rule once an epoch
    keys = make_key(cfg.seed, SPLITS[split], SEQUENCES, i)    # (B,) each one's grid and noise
    seq = nca_sequences(rules, keys, cfg)                      # (B, block_size + 1)
    start, _ = frame_markers(cfg.n_states, cfg.patch)
    if cfg.nca_shuffle:  # the control: the same patch tokens in a random order; START/END stay
        is_patch = seq[0] < start                              # the same places in every sequence
        order = uniform(make_key(keys, SHUFFLE), int(is_patch.sum())).argsort(-1)
        seq[:, is_patch] = seq[:, is_patch].gather(1, order)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, :frame_len(cfg) - 1] = -1  # the first frame is context: the rule is inferred from it
    if cfg.nca_loss == 'patches':   # START/END sit at fixed places: nothing to learn
        y[y >= start] = -1          #   (the authors' code meant to mask them but did not: 'all')
    return x, y


# --- the Dyck control: nested brackets, the other stage-1 data of the paper ---------------
@dataclasses.dataclass(frozen=True)
class DyckConfig:
    dyck_k: int = 64             # bracket types: vocabulary 2 * dyck_k
    dyck_depth: int = 16         # maximum nesting depth
    dyck_p_open: float = 0.5     # probability of opening when both moves are allowed
    seed: int = 1337
    block_size: int = 1024
    device: str = 'cpu'


@torch.no_grad()
def dyck_batch(cfg, split, index, batch_size):
    """k-Dyck sequences (prefixes of balanced words, depth at most dyck_depth): token t < k opens
    bracket type t, k + t closes it; where both moves are allowed, a bracket opens with probability
    dyck_p_open. -> X, Y (B, block_size)."""
    B, L, k, depth_max, dev = batch_size, cfg.block_size + 1, cfg.dyck_k, cfg.dyck_depth, cfg.device
    key = make_key(cfg.seed, SPLITS[split], DYCK, sequence_ids(index, batch_size, dev))
    u = uniform(key, 2 * L).view(B, L, 2)
    stack = torch.zeros(B, depth_max, dtype=torch.long, device=dev)  # open bracket types
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    seq = torch.empty(B, L, dtype=torch.long, device=dev)
    b = torch.arange(B, device=dev)
    for t in range(L):  # a loop over positions, batched over sequences: ~1 ms a step
        opens = ((u[:, t, 0] < cfg.dyck_p_open) | (depth == 0)) & (depth < depth_max)
        kind = (u[:, t, 1] * k).long()
        seq[:, t] = torch.where(opens, kind, k + stack[b, (depth - 1).clamp_min(0)])
        top = depth.clamp_max(depth_max - 1)
        stack[b, top] = torch.where(opens, kind, stack[b, top])
        depth += 2 * opens - 1
    return seq[:, :-1], seq[:, 1:]


def dyck_vocab(cfg):
    return dict(kind='dyck', size=2 * cfg.dyck_k)


def dyck_problems(cfg, stage):
    return [(cfg.dyck_p_open > 1, "--dyck_p_open must be at most 1")]


# ==== 2. The GPT: Llama-style (pre-norm RMSNorm, rotary positions, SwiGLU, untied head) ====
def rotary(T, head_dim, device, theta=1e4):
    """cos, sin (T, head_dim / 2) of the rotary position embedding."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(T, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x (B, nh, T, hs): rotate the pairs (x1, x2) made of its two halves (HF Llama's
    convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin, kv=None, pos=0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # each (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # sampling: keys and values of positions < pos are cached in kv, (B, nh, T_max, hs) x 2
        if kv is not None:
            kv[0][:, :, pos:pos + T] = k
            kv[1][:, :, pos:pos + T] = v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
        # causal over the whole sequence, or one new token attending to every cached one (prefill
        # starts at 0)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):  # SwiGLU, hidden 4 x width as in the paper
    def __init__(self, n_embd):
        super().__init__()
        self.gate_up = nn.Linear(n_embd, 2 * 4 * n_embd, bias=False)
        self.down = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.norm1 = nn.RMSNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.norm2 = nn.RMSNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, cos, sin, kv=None, pos=0):
        x = x + self.attn(self.norm1(x), cos, sin, kv, pos)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size, dropout=0.0,
                 head_bias=False, emb_init='normal', scale_residual=True):
        super().__init__()
        self.n_layer = n_layer
        self.n_head = n_head
        self.block_size = block_size
        self.scale_residual = scale_residual
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.RMSNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=head_bias)
        # the authors' recipe, where it applies
        self.torch_init = authors_torch_init(self, emb_init)
        self.apply(self.init_weights)

    def init_weights(self, module):
        """GPT-2's: N(0, 0.02), the projections into the residual stream scaled by
        1/sqrt(2 n_layer)."""
        if module in self.torch_init:
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            residual = any(module in (b.attn.proj, b.mlp.down) for b in self.blocks)
            if self.scale_residual and residual:
                std = 0.02 / math.sqrt(2 * self.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            torch.nn.init.ones_(module.weight)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) -> logits (B, T, V); with targets (B, T), -1 = no loss: also the mean loss.
        For sampling, cache (from new_cache) holds the keys and values of positions < pos."""
        head_dim = self.wte.embedding_dim // self.n_head
        cos, sin = (t[pos:] for t in rotary(pos + idx.size(1), head_dim, idx.device))
        x = self.wte(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i] if cache else None, pos)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        flat_logits = logits.float().view(-1, logits.size(-1))
        loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch_size, max_len, dtype, device):
        """Empty key/value buffers for sampling: per layer (k, v), each (B, nh, max_len, hs)."""
        shape = (batch_size, self.n_head, max_len, self.wte.embedding_dim // self.n_head)
        cache = []
        for _ in self.blocks:
            k = torch.empty(shape, dtype=dtype, device=device)
            v = torch.empty(shape, dtype=dtype, device=device)
            cache.append((k, v))
        return cache

    def flops_per_token(self, T):
        """Training FLOPs per token: 6 per weight plus attention's 12 * L * C * T (PaLM appendix
        B)."""
        N = sum(p.numel() for p in self.parameters()) - self.wte.weight.numel()
        return 6 * N + 12 * self.n_layer * self.wte.embedding_dim * T


def authors_torch_init(model, emb_init):
    """The modules the authors' code leaves at torch's own initialisation: stage 2's new embedding
    N(0, 1) and head U(+-1/sqrt(d)) (emb_init='torch'), and their stage-1 head with a bias (made
    outside HF's init)."""
    modules = []
    if emb_init == 'torch':
        modules += [model.wte, model.head]
    elif model.head.bias is not None:
        modules.append(model.head)
    return modules


# ==== 3. Transfer: keep the blocks, re-initialise the embedding and the head ====
def parts(spec, model):
    """'attn:0-11,mlp,norm,emb,head' -> the modules it names (a layer range applies to attn, mlp,
    norm)."""
    found = []
    for item in filter(None, spec.split(',')):
        name, _, layers = item.partition(':')
        blocks = model.blocks
        if layers:
            lo, _, hi = layers.partition('-')
            blocks = model.blocks[int(lo):int(hi or lo) + 1]
        if name == 'emb':
            found.append(model.wte)
        elif name == 'head':
            found.append(model.head)
        elif name == 'norm':
            found += [m for b in blocks for m in (b.norm1, b.norm2)]
            if not layers:
                found.append(model.norm)
        elif name in ('attn', 'mlp'):
            found += [getattr(b, name) for b in blocks]
        else:
            die(f"cannot read {item!r} in {spec!r}: parts are attn, mlp, norm (with an optional "
                f":first-last layer range), emb, head")
    return found


def transfer(model, source, same_vocab, keep=False, reinit='', freeze=''):
    """Load a checkpoint of another stage into a model of this stage's vocabulary. keep: the
    embedding and head too (the same vocabulary: lm -> sft, or the paper's "C4, no re-init"
    control); reinit, freeze: parts (as `parts` reads them) to re-initialise or keep fixed."""
    if keep and not same_vocab:
        die("keeping the embedding and head needs the same vocabulary in both stages: sft and "
            "--keep_embeddings start from an lm checkpoint")
    theirs = source.get('model_args', {})
    ours = dict(n_layer=model.n_layer, n_head=model.n_head, n_embd=model.wte.embedding_dim)
    for k, mine in ours.items():
        if k in theirs and theirs[k] != mine:
            die(f"the checkpoint's blocks do not fit this model: the checkpoint has "
                f"--{k}={theirs[k]}, this run --{k}={mine}: give --{k}={theirs[k]}")
    state = {k: v for k, v in source['model'].items()
             if keep or not k.startswith(('wte.', 'head.'))}
    target = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state.items() if k in target and v.shape != target[k].shape]
    missing = sorted(set(k for k in target if not k.startswith(('wte.', 'head.'))) - set(state))
    unexpected = sorted(set(state) - set(target))
    if mismatched or missing or unexpected:
        found = mismatched + missing[:5] + [f"{k} not in this model" for k in unexpected[:5]]
        die(f"the checkpoint's blocks do not fit this model ({'; '.join(found)}): give the same "
            f"--n_layer/--n_head/--n_embd as the checkpoint's")
    model.load_state_dict(state, strict=False)  # wte and head keep their fresh initialisation
    for module in parts(reinit, model):         # the paper's ablations: re-initialise more
        module.apply(model.init_weights)
    for module in parts(freeze, model):
        module.requires_grad_(False)


# ==== Appendix A. The NCA data made fast: the rollout as a lookup table ===========
# The 3x3 conv and the first 1x1 conv have nothing between them, so they are one linear map; and
# its input is one-hot, so the map is a lookup table: (neighbour k, that neighbour's state) -> 16
# (rule_hidden2) values, summed over the 9 neighbours. One index_select and one embedding_bag a
# step advance all R rules at once (docs/speed.md: 2.2-2.7x the plain rollout on a CPU).
# Contract: the same arguments and the same states as rollout_plain (tests/test_method.py holds
# them equal on thousands of rules).

@functools.lru_cache(maxsize=8)
def torus_neighbours(size, device):
    """(9, size*size): the flat index of each cell's 3x3 neighbourhood on the torus, in conv
    kernel order."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    nbrs = [((y + dy) % size) * size + (x + dx) % size for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack(nbrs).view(9, -1).to(device)


@torch.no_grad()
def rollout_table(kernels, grid0, n_steps, keys, temperature, identity_bias=0.0):
    """rollout_plain's states, computed with the lookup table. The same arguments and result."""
    conv1, conv2, conv3 = kernels
    R, S, _ = grid0.shape
    C, n, hidden, dev = S * S, conv3.size(1), conv2.size(1), grid0.device
    table = torch.einsum('rcsij,roc->rijso', conv1, conv2)  # (R, 9 neighbours, n states, hidden)
    table = table.reshape(R * 9 * n, hidden)
    # cell c's 9 rows: r*9n + k*n + (the state of its neighbour k), read by one index_select
    # of the (R, 9, C) grid of states + r*9n + k*n
    rule_and_neighbour = torch.arange(R, device=dev).view(R, 1, 1) * 9
    rule_and_neighbour = rule_and_neighbour + torch.arange(9, device=dev).view(1, 9, 1)
    first_row = rule_and_neighbour.int() * n                                  # (R, 9, 1)
    take = (torch.arange(R, device=dev) * 9 * C).view(R, 1, 1) + torch.arange(9, device=dev) * C
    take = (take + torus_neighbours(S, dev).t()).flatten()                    # (R*C*9,)
    bags = torch.arange(0, R * C * 9, 9, device=dev, dtype=torch.int32)       # 9 rows a cell
    if temperature:
        us = uniform(keys, n_steps * C).view(R, n_steps, C)
    states = torch.empty(R, n_steps + 1, C, dtype=torch.int32, device=dev)
    states[:, 0] = grid0.reshape(R, C)
    for t in range(n_steps):
        state = states[:, t]
        rows = (state.view(R, 1, C) + first_row).view(-1).index_select(0, take)
        h = F.embedding_bag(rows, table, bags, mode='sum')
        h = rule_nonlinearity(h).view(R, C, hidden)
        # (R, n, C): the states on the middle axis, so that ops over them run along rows of cells
        # (3-6x faster)
        logits = torch.bmm(conv3, h.transpose(1, 2))
        u = us[:, t] if temperature else None
        states[:, t + 1] = draw_next(logits, state, u, temperature, identity_bias)
    return states.long().view(R, n_steps + 1, S, S)


rollout = rollout_table  # the swap (see rollout_plain): training runs the lookup table


# ==== Appendix B. The NCA data made reproducible: random numbers by hashing ========
# Every random number of the data is a pure function of (seed, what it is for, which rule or
# sequence), by a counter-based hash, not a stateful generator: sequence i is the same whatever
# the batch size, the number of GPUs, the device, or where a run resumed. make_key names a
# stream; uniform and randint draw from it. Contract: no two purposes share a stream
# (tests/test_nca.py), and the data of a seed are the same on every machine.
MASK32 = 0xFFFFFFFF
RULES, SEQUENCES, ORDER, DYCK, GRID, LM, SFT, NOISE, SHUFFLE, REPEAT = range(1, 11)  # the purposes
SPLITS = {'train': 0, 'val': 1}


def mix32(x):
    """A bijective 32-bit integer hash (multipliers under 2**31, so int64 products never
    overflow). After the first operation a tensor is hashed in place: big int64 temporaries would
    cost more than the arithmetic."""
    x = x ^ (x >> 16)
    for _ in range(2):
        x *= 0x45d9f3b
        x &= MASK32
        x ^= x >> 16
    return x


def make_key(*ids):
    """Hash a tuple of ids (ints, or one int64 tensor of them) into one 32-bit key per element."""
    h = 0
    for i in ids:
        h = mix32(h ^ (i & MASK32))
    return h


def hash_bits(keys, n):
    """keys (N,) int64 -> (N, n) int64 of 32 random bits: counter k of key j."""
    return mix32(keys[:, None] ^ mix32(torch.arange(n, device=keys.device) + 0x9E3779B))


def uniform(keys, n):
    """keys (N,) -> (N, n) float32 uniforms strictly inside (0, 1)."""
    # 23 bits: exact in float32, never 0 or 1
    return ((hash_bits(keys, n) >> 9).float() + 0.5) / 2 ** 23


def randint(keys, n, high):
    """keys (N,) -> (N, n) int64 in [0, high), from 62 random bits (uniform enough for any
    corpus)."""
    bits = hash_bits(keys, 2 * n).view(-1, n, 2)
    return ((bits[..., 0] << 30) ^ bits[..., 1]) % high


def categorical(probs, u, dim=-1):
    """Inverse-CDF sampling along dim: probs (..., n, ...), not necessarily normalised, and u
    uniforms of the other dims -> indices: the first whose cumulative weight reaches u * total,
    i.e. how many fall short of it. u is scaled by the total, so that rounding in the cumulative
    sum never picks an index of probability 0."""
    cdf = probs.cumsum(dim)
    return (cdf < u.unsqueeze(dim) * cdf.narrow(dim, -1, 1)).sum(dim)


# ==== Appendix C. A band too narrow to fill stops early, saying why ================
MAX_CANDIDATES_PER_RULE = 100  # a band keeping under 1% of the candidates stops early, saying so


def give_up_if_rare(cfg, count, kept, ratios, seconds):
    """rule_set's check after each chunk of candidates (kept: the in-band rules of each chunk,
    ratios: every candidate's gzip ratio). Stop a band that keeps nothing after 20 chunks, or whose
    pass rate (measured after 4) would need more than MAX_CANDIDATES_PER_RULE candidates a rule:
    say the rate, the time it would take, the ratios' spread."""
    n_kept, tried = sum(map(len, kept)), sum(map(len, ratios))
    if n_kept >= count or len(ratios) < 4:
        return
    if n_kept == 0:
        if len(ratios) >= 20:
            no_rule_in_band(cfg, torch.cat(ratios))
        return
    rate = n_kept / tried
    if rate >= 1 / MAX_CANDIDATES_PER_RULE:
        return
    minutes = (count - n_kept) / rate * seconds / tried / 60
    stop_for_band(cfg, f"keeps {rate:.2%} of the candidates ({n_kept} of {tried}): {count} rules "
                  f"would take about {count / rate:,.0f} candidates, {minutes:,.1f} more minutes",
                  torch.cat(ratios))


def no_rule_in_band(cfg, ratios):
    stop_for_band(cfg, "kept no rule", ratios)


def stop_for_band(cfg, verdict, ratios):
    """ratios: the gzip ratios of every candidate tried."""
    quantiles = ' / '.join(f'{v:.3f}' for v in np.quantile(ratios.cpu().numpy(), [0.1, 0.5, 0.9]))
    die(f"the band ({cfg.gzip_lower}, {cfg.gzip_upper}) {verdict}; the gzip ratios of the "
        f"{len(ratios)} candidates tried have the quantiles 10/50/90% {quantiles}: choose "
        f"--gzip_lower and --gzip_upper around them")


# ==== 4. The script: train any stage ==========================================
# config: module-level values, each overridable as --key=value or --key value; the stage-1
# sources' settings (NCAConfig's, DyckConfig's fields) join them below. Resolved once (configure,
# in the appendix): defaults < preset < recipe < command line.
stage = 'nca'           # a stage-1 source of SOURCES (nca | dyck) | lm | sft
preset = ''             # tiny | small | paper ('' = small on a GPU, tiny otherwise):
                        #   PRESETS, in the appendix
out_dir = ''            # where checkpoints and log.jsonl go ('' = out-{stage})
init_from = 'scratch'   # scratch | resume (out_dir/ckpt.pt) | a checkpoint or HF Llama folder
                        #   to transfer from
seed = 1337             # one seed gives the same rules, sequences and losses
# data: lm and sft read what prepare_data.py wrote
dataset = 'openwebtext' # folder under data_dir
data_dir = 'data'
band = ''               # 'auto': the NCA's gzip band from the gzip ratio of --dataset
                        #   (docs/comparisons.md)
# model (Llama-style: RMSNorm, RoPE, SwiGLU, untied head)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024       # context length; NCA and Dyck sequences are this long
dropout = 0.0           # attention dropout (the paper: 0.1)
# the recipe: project | authors (RECIPES, in the appendix, sets the items below as the authors'
# code has them)
recipe = 'project'
emb_init = 'normal'     # fresh embedding and head: normal N(0, 0.02) | torch: torch's defaults
                        #   (the authors' stage 2)
head_bias = False       # the head has a bias, at torch's init U(+-1/sqrt(n_embd))
                        #   (the authors' stage 1)
scale_residual = True   # residual projections at N(0, 0.02 / sqrt(2 n_layer)) (GPT-2); False: 0.02
pad_vocab = 64          # embedding and head rows: the vocabulary rounded up to a multiple
                        #   (the authors: 64000, 1)
# transfer (init_from a checkpoint): blocks and final norm are kept, embedding and head
# re-initialised
reinit = ''             # also re-initialise parts: e.g. 'attn', 'mlp:0-11', 'attn:12-23,norm'
freeze = ''             # parts to keep fixed, same syntax; 'emb' and 'head' too
keep_embeddings = False # keep embedding and head when the vocabulary is the same
                        #   (the C4 "no re-init" control)
# optimisation (AdamW; the NCA stage's Adam is AdamW with weight_decay 0)
batch_size = 16         # sequences per micro-step per process
gradient_accumulation_steps = 2  # micro-steps per update, over all processes
                                 #   (32 sequences per update)
max_iters = 5000        # updates
max_tokens = 0          # if > 0, train on this many tokens instead (the C4 baseline's budget)
epochs = 0.0            # if > 0, train this many passes over the data instead
                        #   (sft: 10 for GSM8K)
learning_rate = 1e-4    # peak
min_lr = 0.0            # floor of the cosine
warmup_iters = 5000     # linear warm-up
lr_decay_iters = 50000  # cosine to min_lr by here (0: max_iters)
stop_at_peak = False    # the paper's stage 1: warm up over the whole run and stop at the peak lr
                        #   (no decay)
weight_decay = 0.0
decay_all = False       # weight decay on every parameter, norms too (the authors' AdamW);
                        #   False: matrices only
beta1 = 0.9
beta2 = 0.999           # torch's Adam default, as the paper's code
                        #   (nanoGPT: 0.95, which the small presets use)
grad_clip = 1.0         # 0 disables
clip_sum = False        # clip the SUM of the micro-steps' gradients, not their mean
                        #   (the authors' stage 2)
warmup_zero = False     # the warm-up starts at lr 0 (the authors' LambdaLR);
                        #   False: at lr / (warmup_iters + 1)
# I/O
eval_interval = 250     # evaluate and checkpoint every this many steps
eval_iters = 20         # batches per evaluation
log_interval = 10       # print a line every this many steps
# system
device = ''             # '' picks cuda, then mps, then cpu
dtype = ''              # float32 | bfloat16 | float16; '' = bfloat16 on CUDA, float32 elsewhere
compile = False         # torch.compile the model (the small and paper presets turn it on for a GPU)



# The stage-1 sources: each is its config (a dataclass whose fields are options too), its batch
# function (cfg, split, index, batch_size) -> X, Y, its vocabulary (cfg) -> dict(kind, size), and
# for the command line its checks: (cfg, stage) -> [(bad, message)], and each option's least value.
# A new source is its function and one entry here (docs/training.md shows one); the checks, the
# presets' 'stage1' values and the transfer read this table.
SOURCES = {
    'nca': dict(config=NCAConfig, batch=nca_batch, vocab=nca_vocab, check=nca_problems,
                at_least=dict(grid=1, patch=1, n_states=1, rule_hidden1=1, rule_hidden2=1,
                              gzip_frames=1, num_rules=1, num_val_rules=1, burn_in=0,
                              temperature=0, rule_resample=0)),
    'dyck': dict(config=DyckConfig, batch=dyck_batch, vocab=dyck_vocab, check=dyck_problems,
                 at_least=dict(dyck_k=1, dyck_depth=1, dyck_p_open=0)),
}
# Each source's fields join the config above at their defaults (n_states, grid, dyck_k, ...), so
# that --n_states=3 sets them; the fields the config above has already (seed, block_size, device)
# are the run's own. data_config then builds a source's config from these values.
for _source in SOURCES.values():
    for _field in dataclasses.fields(_source['config']):
        globals().setdefault(_field.name, _field.default)
config_keys = [k for k, v in globals().items()  # lower case: the constants above are not options
               if k.islower() and not k.startswith('_') and isinstance(v, (bool, int, float, str))]


def data_config(name):
    """A stage-1 source's config, from this run's values."""
    config = SOURCES[name]['config']
    return config(**{f.name: globals()[f.name] for f in dataclasses.fields(config)})


# --- the batches of a stage: a source's, or language from what prepare_data.py wrote --
EOT = 50256  # GPT-2's <|endoftext|>; tiktoken's r50k_base has the same ids as gpt2
vocab = None  # set by train(): what the token ids of this run mean (stage_vocab)
_sft_cache = {}  # sft_examples': (path, vocabulary kind) -> examples


@functools.lru_cache(maxsize=8)  # read once: lm_batch asks every batch
def dataset_meta(folder, name):
    path = os.path.join(folder, name, 'meta.json')
    if not os.path.exists(path):
        die(f"no dataset {name!r} in {folder}/: run `python prepare_data.py {name}` first")
    return json.load(open(path))


def data_file(split):
    """The path of a split of --dataset, checked: sft reads prompt/answer pairs, lm token ids
    (meta.json counts them)."""
    if stage == 'sft':
        path = os.path.join(data_dir, dataset, f'sft_{split}.jsonl')
        if not os.path.exists(path):
            die(f"no {path}: --stage sft trains on the pairs of `prepare_data.py gsm8k` (or bbl): "
                f"give --dataset=gsm8k")
        return path
    path = os.path.join(data_dir, dataset, f'{split}.bin')
    n = dataset_meta(data_dir, dataset).get(f'{split}_tokens')
    if n is None:
        die(f"{dataset} is a benchmark, not a corpus: --stage lm trains on one that "
            f"prepare_data.py tokenises")
    if not os.path.exists(path) or os.path.getsize(path) != 2 * n:
        die(f"{path} is missing or not {n} uint16 tokens as meta.json says: "
            f"run `python prepare_data.py {dataset}`")
    if n <= block_size + 1:
        die(f"{path} holds {n} tokens, too few for --block_size={block_size}")
    return path


def lm_batch(split, index, batch_size):
    """Random windows of the token file: X, Y (B, block_size). Window starts are hashes of the
    batch index."""
    # opened each batch: a long-lived memmap leaks
    data = np.memmap(data_file(split), dtype=np.uint16, mode='r')
    key = make_key(seed, SPLITS[split], LM, torch.tensor([index]))
    starts = randint(key, batch_size, len(data) - block_size - 1)[0]
    windows = np.stack([data[s:s + block_size + 1] for s in starts.tolist()])
    xy = torch.from_numpy(windows.astype(np.int64))
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


def sft_examples(split):
    """prompt/answer pairs -> list of (tokens, prompt length); the answer ends with end-of-text."""
    path, kind = data_file(split), (vocab or stage_vocab())['kind']
    if (path, kind) not in _sft_cache:
        encode, _, eot = text_codec(kind)
        rows = [json.loads(line) for line in open(path) if line.strip()]
        prompts = [encode(r['prompt']) for r in rows]
        examples = [(p + encode(r['answer']) + [eot], len(p)) for p, r in zip(prompts, rows)]
        _sft_cache[path, kind] = examples
    return _sft_cache[path, kind]


def sft_batch(split, index, batch_size):
    """Fine-tuning batches: X, Y (B, block_size), loss on the answer only. Each epoch visits every
    example once, in an order hashed from (seed, epoch)."""
    examples = sft_examples(split)
    # padding: after the answer, never a target
    x = torch.zeros((batch_size, block_size), dtype=torch.long)
    y = torch.full((batch_size, block_size), -1, dtype=torch.long)
    orders = {}  # epoch -> its order of the examples
    for b, i in enumerate(sequence_ids(index, batch_size, device).tolist()):
        epoch = i // len(examples)
        if epoch not in orders:
            key = make_key(seed, SPLITS[split], SFT, torch.tensor([epoch]))
            orders[epoch] = uniform(key, len(examples))[0].argsort()
        tokens, n_prompt = examples[orders[epoch][i % len(examples)]]
        tokens = torch.tensor(tokens[:block_size + 1])
        x[b, :len(tokens) - 1] = tokens[:-1]
        y[b, n_prompt - 1:len(tokens) - 1] = tokens[n_prompt:]  # targets of answer tokens only
    return x.to(device), y.to(device)


def gpt2_encoding():
    import tiktoken
    # GPT-2's ranks; needs one file, cached (TIKTOKEN_CACHE_DIR)
    return tiktoken.get_encoding('r50k_base')


def text_codec(kind):
    """A language vocabulary ('gpt2' or 'bytes') -> encode (str -> ids), decode (ids -> str),
    end-of-text id."""
    if kind == 'bytes':  # UTF-8 bytes; 256 ends a document
        def decode(ids):
            return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')
        return (lambda text: list(text.encode('utf-8'))), decode, 256
    enc = gpt2_encoding()
    return enc.encode_ordinary, enc.decode, EOT


def get_batch(split, index):
    if stage in SOURCES:
        return SOURCES[stage]['batch'](data_config(stage), split, index, batch_size)
    return {'lm': lm_batch, 'sft': sft_batch}[stage](split, index, batch_size)


def stage_vocab():
    """What the token ids of this stage mean; the embedding and head are sized (and padded) from
    it."""
    if stage in SOURCES:
        return SOURCES[stage]['vocab'](data_config(stage))
    if stage == 'lm':  # what prepare_data.py wrote: GPT-2 tokens or bytes
        meta = dataset_meta(data_dir, dataset)
        return dict(kind=meta.get('tokenizer', 'gpt2'), size=meta.get('vocab_size', 50257))
    # from scratch; from a checkpoint, fine-tuning keeps the checkpoint's vocabulary
    if stage == 'sft':
        return dict(kind='gpt2', size=50257)
    die(f"no vocabulary for --stage={stage}: the stages are {', '.join(CHOICES['stage'])}")


# --- where the authors' recipe changes the method ------------------------------
# --recipe=authors (RECIPES, in the appendix) trains as the authors' code does. Most of its items
# are plain values (no clipping in stage 1, AdamW's decay, beta2, dropout, the vocabulary's
# padding, fp16); the six flags below change how the method computes, in five places, and
# this is every place they act:
#   emb_init='torch', head_bias  -> authors_torch_init: torch's own init for the fresh embedding
#                                   and head
#   scale_residual=False         -> GPT.init_weights: 0.02 for the residual projections too
#   warmup_zero                  -> get_lr: the warm-up starts at 0
#   decay_all                    -> optimizer_groups: weight decay on the norms too
#   clip_sum                     -> micro_step_loss: the micro-steps' losses summed, not averaged
# and in the data, nca_loss='all' (START/END predicted) and rule_resample=0 (one rule set) in
# nca_batch.

def get_lr(it):
    """Linear warm-up, then cosine down to min_lr by lr_decay_iters."""
    if it < warmup_iters:
        if warmup_zero:  # the authors' LambdaLR: lr * it / warmup, 0 at the first update
            return learning_rate * (it / warmup_iters)
        return learning_rate * ((it + 1) / (warmup_iters + 1))
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def optimizer_groups(model):
    """AdamW's parameter groups: weight decay on the matrices, not on the norms (decay_all: on
    every one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2 or decay_all]
    other = [p for p in params if p.dim() < 2 and not decay_all]
    return [{'params': decayed, 'weight_decay': weight_decay},
            {'params': other, 'weight_decay': 0.0}]


def micro_step_loss(loss, micro_steps, world):
    """What a micro-step backpropagates: the update's gradient is the mean over all
    gradient_accumulation_steps micro-steps (micro_steps a process, DDP averaging the processes),
    or (clip_sum, the authors' stage 2) their sum, so that clipping sees a norm
    gradient_accumulation_steps times larger: x world undoes DDP's mean. Under Adam only
    clipping and eps see the difference."""
    if clip_sum:
        return loss * world
    return loss / micro_steps


# --- evaluation ------------------------------------------------------------------
def tokens_per_iter():
    return batch_size * gradient_accumulation_steps * block_size


def token_losses(logits, y):
    logits = logits.float().transpose(1, 2)  # (B, V, T)
    return F.cross_entropy(logits, y, ignore_index=-1, reduction='none')  # (B, T)


def repeated_tokens(index, batch_size, length):
    """The induction test: random tokens (no end-of-text) repeated once
    -> X, Y (B, 2 * length - 1)."""
    key = make_key(seed, SPLITS['val'], REPEAT, sequence_ids(index, batch_size, device))
    r = randint(key, length, vocab['size'] - 1)
    seq = torch.cat([r, r], dim=1)
    return seq[:, :-1], seq[:, 1:]


def in_context_scores(position_loss, repeat_loss):
    """The in-context probe on language, from the mean loss at each position of held-out text (T,)
    and of repeated_tokens (2L - 1,). icl: the last tenth of the context minus positions 5-15%
    (Olsson et al. 2022: token 500 minus token 50 of 512); induction: the second copy minus the
    first. Negative: learned from the context."""
    T = len(position_loss)
    L = (len(repeat_loss) + 1) // 2
    icl = position_loss[-T // 10:].mean() - position_loss[T // 20:3 * T // 20].mean()
    induction = repeat_loss[L:].mean() - repeat_loss[:L - 1].mean()
    return dict(icl=icl.item(), induction=induction.item())


@torch.no_grad()
def evaluate(model, ctx):
    """Mean validation loss; for NCA also the loss by frame position and next-frame accuracy, the
    in-context signal: later frames should be easier once the rule is inferred; for language the
    in-context probe."""
    model.eval()
    losses = []
    frame_sum = frame_count = by_position = repeat = 0
    correct = copied = total = 0
    nca = data_config('nca')
    start, _ = frame_markers(nca.n_states, nca.patch)
    L = frame_len(nca)
    for k in range(eval_iters):
        x, y = get_batch('val', k)
        with ctx:
            logits, loss = model(x, y)
        losses.append(loss.item())
        if stage == 'lm':
            rx, ry = repeated_tokens(k, batch_size, block_size // 2)
            with ctx:
                by_position = by_position + token_losses(logits, y).mean(0) / eval_iters
                repeat = repeat + token_losses(model(rx)[0], ry).mean(0) / eval_iters
        if stage == 'nca':
            mask = (y != -1) & (y < start)  # the patch tokens of frames 1, 2, ...
            frame = (torch.arange(y.size(1), device=y.device) + 1) // L  # (T,) each target's frame
            losses_at = (token_losses(logits, y) * mask).sum(0)  # (T,)
            frame_sum = frame_sum + sum_by_frame(frame, losses_at)
            frame_count = frame_count + sum_by_frame(frame, mask.sum(0).float())
            correct += ((logits.argmax(-1) == y) & mask).sum().item()
            # the copy baseline: each patch predicted as the token at its place one frame earlier
            same = (x[:, :x.size(1) - L + 1] == y[:, L - 1:]) & mask[:, L - 1:]
            copied += same.sum().item()
            total += mask.sum().item()
    model.train()
    se = np.std(losses) / math.sqrt(max(len(losses) - 1, 1))
    out = dict(val_loss=float(np.mean(losses)), val_loss_se=float(se))
    if stage == 'nca':
        whole = (block_size + 1) // L  # frames 1 .. whole - 1 fit whole in a sequence
        frame_loss = (frame_sum / frame_count)[1:whole]  # frames 1, 2, ...
        out['frame_loss'] = [round(v, 4) for v in frame_loss.tolist()]
        out['next_frame_acc'] = correct / total
        out['copy_frame_acc'] = copied / total
    if stage == 'lm':
        out.update(in_context_scores(by_position, repeat))
    return out


def sum_by_frame(frame, values):
    """values (T,) at positions whose frame is frame (T,) -> (number of frames,) sums."""
    return torch.zeros(frame[-1] + 1, device=values.device).index_add(0, frame, values)


# --- the loop ----------------------------------------------------------------------
def train():
    global dtype
    ddp, rank, world = init_distributed()
    master = rank == 0
    micro_steps = gradient_accumulation_steps // world  # per process: together, one update
    device_type = 'cuda' if device.startswith('cuda') else device
    dtype = dtype or default_dtype(device_type)
    ptdtype = getattr(torch, dtype)  # float32 | bfloat16 | float16
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    torch.manual_seed(seed + rank)  # model init (overwritten on resume) and dropout
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # the model: from scratch, resumed, or the blocks of another stage's checkpoint
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    model, model_args, checkpoint = init_model(ckpt_path, master)
    iter_num, best_val_loss = 0, float('inf')
    if checkpoint:
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    progress.update(step=iter_num, saved=iter_num if checkpoint else None)
    check_memory(model, ptdtype.itemsize, master)
    model.to(device)
    # AdamW (fused on CUDA), and fp16's loss scaler (off otherwise)
    optimizer = torch.optim.AdamW(optimizer_groups(model), lr=learning_rate, betas=(beta1, beta2),
                                  fused=device_type == 'cuda')
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    if checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
        restore_rng(checkpoint, rank, device_type)
    raw_model = model
    if compile:
        model = torch.compile(model)
    if ddp:
        local = [int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=local)
    if master:
        print_run(raw_model, world, iter_num)
        log = open_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
        write_run_file(model_args, checkpoint)

    def save(it):
        rng = gather_rng(ddp, world, device_type)
        if master:
            config = {k: globals()[k] for k in config_keys}
            ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                        model_args=model_args, iter_num=it, best_val_loss=best_val_loss,
                        config=config, stage=stage, vocab=vocab, rng=rng)
            write_or_stop(ckpt_path, lambda tmp: torch.save(ckpt, tmp))
        progress['saved'] = it

    # the loop: evaluate and checkpoint every eval_interval steps, else one update
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter()
    peak_flops = peak_flops_per_s(device)
    t_start, t_last, tokens_seen, start_iter = time.time(), time.time(), 0, iter_num
    while True:
        progress['step'] = iter_num
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # a resumed step was evaluated before the run stopped
        resumed_here = init_from == 'resume' and iter_num == start_iter
        if iter_num % eval_interval == 0 and not resumed_here or iter_num == max_iters:
            stats = evaluate(model, ctx)
            check_finite(stats['val_loss'], iter_num, 'validation', ckpt_path)
            best_val_loss = min(best_val_loss, stats['val_loss'])
            if master:
                print_evaluation(iter_num, stats)
                log_write(log, dict(step=iter_num, tokens=iter_num * tokens_per_iter(), **stats))
            save(iter_num)
        if iter_num >= max_iters:
            break
        # one update: micro_steps forward and backward passes, then one clipped AdamW step
        loss_sum = torch.zeros((), device=device)
        for micro in range(micro_steps):
            x, y = get_batch('train', iter_num * gradient_accumulation_steps + micro * world + rank)
            if ddp:  # average gradients across processes on the last micro-step only
                model.require_backward_grad_sync = micro == micro_steps - 1
            with ctx:
                _, loss = model(x, y)
            scaler.scale(micro_step_loss(loss, micro_steps, world)).backward()
            loss_sum += loss.detach()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter()
        if iter_num % log_interval == 0:
            if ddp:
                torch.distributed.all_reduce(loss_sum)
            # the update's mean loss; item() waits for the GPU, so only here
            lossf = loss_sum.item() / gradient_accumulation_steps
            check_finite(lossf, iter_num, 'training', ckpt_path)
            dt, t_last = (time.time() - t_last) / log_interval, time.time()
            eta = (max_iters - iter_num) * (time.time() - t_start) / (iter_num - start_iter)
            if master:
                print_step(log, iter_num, lossf, lr, dt, eta, flops_per_iter, peak_flops, t_start)
    if master:
        minutes = (time.time() - t_start) / 60
        print(f"done: {iter_num} steps, {tokens_seen / 1e6:,.1f}M tokens in {minutes:.1f} min; "
              f"val loss {stats['val_loss']:.4f}, best {best_val_loss:.4f}; checkpoint {ckpt_path}")
    if ddp:
        torch.distributed.destroy_process_group()


def init_distributed():
    """torchrun sets RANK: one process per GPU (or several on a CPU, with gloo) -> ddp, rank,
    world."""
    global device
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device == 'cuda':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    backend = 'gloo'
    if device.startswith('cuda'):
        backend = 'nccl'
    torch.distributed.init_process_group(backend=backend)
    if gradient_accumulation_steps % world:
        die(f"--gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple "
            f"of the {world} processes")
    return True, rank, world


def init_model(ckpt_path, master):
    """The model of this run -> model, model_args, the checkpoint it resumes (or None). Sets
    `vocab`, what the token ids mean: a resumed run and fine-tuning keep their model's."""
    global vocab
    checkpoint, source = None, None
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint['stage'] != stage:
            die(f"{ckpt_path} is a checkpoint of --stage {checkpoint['stage']}: resume it with "
                f"that stage")
        vocab = checkpoint['vocab']
        model = GPT(**checkpoint['model_args'])
        model.load_state_dict(checkpoint['model'])
        for module in parts(freeze, model):  # --freeze, the checkpoint's: still frozen
            module.requires_grad_(False)
        return model, checkpoint['model_args'], checkpoint
    if init_from != 'scratch':
        source = load_checkpoint(init_from)
        check_source_vocab(source, stage, keep_embeddings)
    vocab = source['vocab'] if source and stage == 'sft' else stage_vocab()
    # a multiple of 64: faster matmuls; the rows past the vocabulary are never used
    padded_vocab = -(-vocab['size'] // pad_vocab) * pad_vocab
    model_args = dict(vocab_size=padded_vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      block_size=block_size, dropout=dropout, head_bias=head_bias,
                      emb_init=emb_init, scale_residual=scale_residual)
    model = GPT(**model_args)
    if source:
        keep = keep_embeddings or stage == 'sft'  # fine-tuning continues the whole model
        transfer(model, source, same_vocab=source['vocab'] == vocab, keep=keep, reinit=reinit,
                 freeze=freeze)
        if master:
            print_transfer(source, keep)
    return model, model_args, None


def gather_rng(ddp, world, device_type):
    """The dropout streams, for the checkpoint: each process's, so that a resume continues all."""
    cuda_rng = None
    if device_type == 'cuda':
        cuda_rng = torch.cuda.get_rng_state()
    rng = [(torch.get_rng_state(), cuda_rng)]
    if ddp:
        mine, rng = rng[0], [None] * world
        torch.distributed.all_gather_object(rng, mine)
    return rng


def restore_rng(checkpoint, rank, device_type):
    """The dropout streams where the checkpoint left them (one per process that wrote it)."""
    cpu_rng, cuda_rng = checkpoint['rng'][rank % len(checkpoint['rng'])]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(cuda_rng)


def check_finite(value, it, what, ckpt_path):
    if not math.isfinite(value):
        die(f"the {what} loss is {value} at step {it}: stopping. The last good checkpoint is "
            f"{ckpt_path} (if any); try a lower --learning_rate or --dtype=float32")


# ==== Appendix: presets and recipes ===========================================
# Presets set many values at once: for every stage ('all'), for every stage-1 source ('stage1'),
# and for one stage.
# OpenWebText (the authors' code: lr 2e-4, 24k steps)
PAPER_LM = dict(batch_size=16, gradient_accumulation_steps=32, learning_rate=5e-4,
                weight_decay=1e-4, min_lr=0.0, max_iters=17200, warmup_iters=1720,
                lr_decay_iters=17200)
FINETUNE = dict(batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-5, epochs=10.0,
                warmup_iters=0, lr_decay_iters=0)
PRESETS = {
    # any CPU, a few minutes, every stage. Not the paper's NCA data: 2 states show in-context
    # learning in minutes
    'tiny': {
        'all': dict(n_layer=2, n_head=4, n_embd=128, block_size=256, batch_size=8,
                    gradient_accumulation_steps=1, learning_rate=3e-3, min_lr=3e-4, beta2=0.95,
                    max_iters=300, warmup_iters=30, lr_decay_iters=300, eval_interval=100,
                    eval_iters=4, log_interval=20, num_rules=2000, num_val_rules=200),
        'nca': dict(n_states=2, gzip_lower=0.1, block_size=512, batch_size=4, max_iters=1000,
                    warmup_iters=50, lr_decay_iters=1000, eval_interval=250, eval_iters=8,
                    log_interval=50),
        'sft': dict(learning_rate=2e-4, min_lr=2e-5, epochs=1.0)},
    # one GPU: GPT-2 small's depth and width (113M parameters without embedding and head) on the
    # paper's 164M NCA tokens
    'small': {
        'all': dict(n_layer=12, n_head=12, n_embd=768, beta2=0.95, compile=True, eval_interval=500),
        'stage1': dict(batch_size=32, gradient_accumulation_steps=1, learning_rate=3e-4,
                       stop_at_peak=True),
        'lm': dict(batch_size=32, gradient_accumulation_steps=4, learning_rate=6e-4,
                   weight_decay=1e-4, max_iters=5000, warmup_iters=500, lr_decay_iters=5000,
                   min_lr=6e-5),
        'sft': FINETUNE},
    # the paper: 1.6B parameters; NCA: Adam 1e-4, 32 x 1024 tokens, 5,000 updates, stop at the end
    # of warm-up
    'paper': {
        'all': dict(n_layer=24, n_head=32, n_embd=2048, recipe='authors', compile=True,
                    eval_interval=500),
        'stage1': dict(stop_at_peak=True),
        'lm': PAPER_LM,
        'sft': FINETUNE},
}
# Recipes, applied after the preset: --recipe=authors trains as the authors' code (commit bdd1c71)
# does, stage by stage: utils/models.py (HF's Llama init, N(0, 0.02), no residual scaling; the
# stage-1 head nn.Linear(d, 64000) with a bias; stage 2's new nn.Embedding / nn.Linear at torch's
# defaults), src/nca_ppt.py (Adam, no clipping), src/openwebtext_pt.py (AdamW on every parameter,
# the summed micro-step losses clipped at 1.0, fp16), utils/util.py (warm-up from 0, cosine to 0),
# models.py's attention_dropout=0.1. The command line still wins.
AUTHORS_STAGE1 = dict(head_bias=True, pad_vocab=64000, grad_clip=0.0, weight_decay=0.0,
                      nca_loss='all', rule_resample=0)
AUTHORS_STAGE2 = dict(emb_init='torch', pad_vocab=1, clip_sum=True, grad_clip=1.0,
                      weight_decay=1e-4, dtype='float16')
AUTHORS_ALL = dict(beta2=0.999, dropout=0.1, scale_residual=False, decay_all=True,
                   warmup_zero=True, min_lr=0.0)
RECIPES = {
    'project': {},
    'authors': {'all': AUTHORS_ALL, 'stage1': AUTHORS_STAGE1,
                'lm': AUTHORS_STAGE2, 'sft': AUTHORS_STAGE2},
}
CHOICES = {'stage': [*SOURCES, 'lm', 'sft'], 'preset': ['', 'tiny', 'small', 'paper'],
           'recipe': list(RECIPES), 'dtype': ['', 'float32', 'bfloat16', 'float16'],
           'nca_loss': ['patches', 'all'], 'band': ['', 'auto'], 'emb_init': ['normal', 'torch']}


# ==== Appendix: the command line ================================================
SCRIPT = 'nca_gpt.py'  # what this script's errors start with (die); eval.py sets its own
command_line = []      # main(): this run's arguments, for the command that resumes it
progress = {}          # train(): the step reached and the last checkpoint's, for the messages
                       #   on Ctrl-C


def configure(argv):
    """Resolve the config once, in the README's order: the values above < the preset (its 'all',
    then the stage's) < the recipe < the command line; then the run's length. A length given
    (--max_iters, --max_tokens, --epochs) keeps the preset's warm-up and decay as shares of it.
    A resume takes its checkpoint's config as if given (resume_overrides). Sets the module's
    values -> notes to print."""
    overrides, rest = parse_args(argv, {k: globals()[k] for k in config_keys}, CHOICES)
    if rest:
        die(f"unexpected argument {rest[0]!r}: options look like --key=value")
    if overrides.get('init_from') == 'resume':  # the run's settings are its checkpoint's
        overrides = resume_overrides(overrides)
    lengths = [k for k in ('max_iters', 'max_tokens', 'epochs') if k in overrides]
    if len(lengths) > 1:
        die(f"--{lengths[0]} and --{lengths[1]} both set the run's length: give one")
    this_stage = overrides.get('stage', stage)
    name = overrides.get('preset', preset) or ('small' if devices()[0] == 'cuda' else 'tiny')
    values = layers(PRESETS[name], this_stage)
    values['recipe'] = overrides.get('recipe', values.get('recipe', recipe))
    values.update(layers(RECIPES[values['recipe']], this_stage))
    if not (overrides.get('device') or devices()[0]).startswith('cuda'):
        values['compile'] = False  # compiling pays on a GPU only (--compile=true still asks for it)
        values.pop('dtype', None)  # and a recipe's fp16 is a GPU's: a CPU trains in float32
    notes = preset_notes(name, values, overrides)
    globals().update(values, preset=name)
    shares = {k: globals()[k] / max(max_iters, 1)
              for k in ('warmup_iters', 'lr_decay_iters') if k not in overrides}
    if lengths:
        globals()['epochs'] = 0.0  # a length given beats the preset's epochs
    globals().update(overrides)
    check_ranges()
    set_length(shares)
    if not out_dir:
        globals()['out_dir'] = f'out-{stage}'
    return notes


def layers(table, this_stage):
    """A preset's or recipe's values for a stage: its 'all', then 'stage1' for a stage-1
    source, then the stage's own."""
    names = ['all', this_stage]
    if this_stage in SOURCES:
        names.insert(1, 'stage1')
    values = {}
    for name in names:
        values.update(table.get(name, {}))
    return values


def preset_notes(name, values, overrides):
    """What the first line of a run says about its preset."""
    notes = []
    if not overrides.get('preset', preset):
        note = f"no --preset given: {name}"
        if name == 'tiny':
            note += " (no GPU here: a few minutes on a CPU; --preset=small or paper for real runs)"
        notes.append(note)
    preset_data = any(k in values and k not in overrides for k in ('n_states', 'gzip_lower'))
    if preset_data and 'band' not in overrides:
        now = {**globals(), **values, **overrides}
        notes.append(f"the {name} preset's NCA data is NOT the paper's: {now['n_states']} states, "
                     f"gzip band ({now['gzip_lower']}, {now['gzip_upper']}), so that a CPU shows "
                     f"in-context learning in minutes (the paper's: --n_states=10 "
                     f"--gzip_lower=0.5)")
    return '; '.join(notes)


def set_length(shares):
    """The run's updates (given, or from a token budget, or passes over the data), then its
    schedule: warm-up and decay as `shares` of it where they were not given."""
    global max_iters, warmup_iters, lr_decay_iters
    if max_tokens:
        max_iters = -(-max_tokens // tokens_per_iter())
    elif epochs:  # an epoch: every training rule once (nca), every example once (sft)
        n_examples = num_rules if stage == 'nca' else count_examples(data_file('train'))
        sequences_per_iter = batch_size * gradient_accumulation_steps
        max_iters = math.ceil(epochs * n_examples / sequences_per_iter)
    if 'warmup_iters' in shares:
        warmup_iters = round(shares['warmup_iters'] * max_iters)
    if 'lr_decay_iters' in shares:
        lr_decay_iters = round(shares['lr_decay_iters'] * max_iters)
    lr_decay_iters = lr_decay_iters or max_iters
    if stop_at_peak and init_from != 'resume':  # a resume keeps its checkpoint's schedule
        warmup_iters = lr_decay_iters = max_iters


def count_examples(path):
    return sum(1 for line in open(path) if line.strip())  # sft_examples' rows


# each option's least value (the sources' are in SOURCES): what the run's length is worked out from
AT_LEAST = dict(eval_interval=1, eval_iters=1, log_interval=1, batch_size=1,
                gradient_accumulation_steps=1, n_layer=1, n_head=1, n_embd=1, block_size=1,
                pad_vocab=1, max_iters=0, max_tokens=0, epochs=0, learning_rate=0, min_lr=0,
                warmup_iters=0, lr_decay_iters=0, weight_decay=0, grad_clip=0, dropout=0)


def check_ranges():
    """Every option above its least value, and --epochs' stage."""
    least = dict(AT_LEAST)
    for source in SOURCES.values():
        least.update(source['at_least'])
    for k, lo in sorted(least.items(), key=lambda kv: -kv[1]):  # the "at least 1" first
        if globals()[k] < lo:
            bound = f"at least {lo}" if lo else "0 or more"
            die(f"--{k}={globals()[k]} must be {bound}")
    if epochs and stage not in ('nca', 'sft'):
        die("--epochs applies to the nca and sft stages: give --max_iters or --max_tokens")


def check_config():
    """Every bad value is a one-line error here, before any work starts."""
    check_ranges()
    check_device(device)
    heads = ', '.join(str(h) for h in range(1, n_embd // 2 + 1) if n_embd % (2 * h) == 0)
    problems = [
        (n_embd % n_head or n_embd // n_head % 2,
         f"--n_embd={n_embd} is not --n_head={n_head} heads of an even width (rotary positions "
         f"turn pairs): --n_head can be {heads}"),
        (dropout >= 1, "--dropout must be below 1")]
    for name, source in SOURCES.items():
        problems += source['check'](data_config(name), stage)
    for bad, message in problems:
        if bad:
            die(message)
    if stage in ('lm', 'sft'):
        data_file('train')
        data_file('val')


def check_device(name, script='nca_gpt.py'):
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and name.startswith('cuda:'):  # init_distributed maps 'cuda' to LOCAL_RANK's GPU
        die(f"--device={name} under torchrun would put all {world} processes on one GPU: give "
            f"--device=cuda (each takes its LOCAL_RANK's), CUDA_VISIBLE_DEVICES to choose GPUs",
            script)
    if name not in devices():
        die(f"--device={name} is not available on this machine (it has {', '.join(devices())}): "
            f"leave --device out to use {devices()[0]}", script)


def devices():
    """What --device can name on this machine, the best first."""
    cuda = []
    if torch.cuda.is_available():
        cuda = [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    return ['cuda'] * bool(cuda) + ['mps'] * torch.backends.mps.is_available() + ['cpu'] + cuda


def default_dtype(device_type):
    if device_type == 'cuda' and torch.cuda.is_bf16_supported():
        return 'bfloat16'
    return 'float32'


def auto_band():
    """--band=auto: the band of --dataset's gzip ratio as prepare_data.py measured it: the ratio
    rounded to 0.1 is its lower end, 0.5 or more takes the paper's (0.5, 1.0) (docs/comparisons.md:
    that fits the paper's web text and code)."""
    global gzip_lower, gzip_upper
    if n_states != 10:
        die("--band=auto chooses among the paper's bands, which are those of 10-state rules: "
            "add --n_states=10")
    measured = dataset_meta(data_dir, dataset).get('gzip_ratio') or {}
    if measured.get('tokens') != 'gpt2':  # the filter's convention: int32 GPT-2 ids
        die(f"--band=auto: data/{dataset}/meta.json has no gzip ratio of GPT-2 tokens: prepare it "
            f"again (online once, for GPT-2's tokenizer), or give --gzip_lower and --gzip_upper")
    gzip_lower = min(0.5, round(measured['median'], 1))
    gzip_upper = 1.0
    if gzip_lower < 0.5:
        gzip_upper = round(gzip_lower + 0.1, 1)
    print(f"--band=auto: {dataset}'s gzip ratio is {measured['median']:.3f}, so rules in "
          f"({gzip_lower}, {gzip_upper})")


def die(msg, script=None):
    sys.exit(f"{script or SCRIPT}: {msg}")


def parse_args(argv, config, choices=None, script='nca_gpt.py'):
    """--key=value or --key value -> (overrides, positional args), checked against the names,
    types and choices of `config` (a dict of defaults). Shared by the three scripts."""
    choices = choices or {}
    overrides, rest, args = {}, [], list(argv)
    bools = {'true': True, '1': True, 'false': False, '0': False}
    while args:
        arg = args.pop(0)
        if not arg.startswith('--'):
            rest.append(arg)
            continue
        key, eq, val = arg[2:].partition('=')
        if not eq:
            if not args or args[0].startswith('--'):
                die(f"--{key} needs a value", script)
            val = args.pop(0)
        if key not in config:
            valid = ', '.join('--' + k for k in config)
            die(f"unknown option --{key}; valid options: {valid}", script)
        default = config[key]
        try:
            if isinstance(default, bool):
                value = bools[val.lower()]
            else:
                value = type(default)(val)
        except (KeyError, ValueError):
            die(f"--{key}={val} is not a valid {type(default).__name__}", script)
        if key in choices and value not in choices[key]:
            allowed = ', '.join(c or repr(c) for c in choices[key])
            die(f"--{key}={val} is not one of: {allowed}", script)
        overrides[key] = value
    return overrides, rest


# --- resume: the run's settings come from its checkpoint ---------------------------------------
# A resume continues one run: what it may change is how long it runs, how often it evaluates and
# prints, the machine it runs on and where its files are; the data, the model and the optimisation
# are the checkpoint's (a value given for them must be the checkpoint's).
MAY_CHANGE_ON_RESUME = ('max_iters', 'max_tokens', 'epochs', 'eval_interval', 'eval_iters',
                        'log_interval', 'device', 'dtype', 'compile', 'out_dir', 'init_from',
                        'data_dir')
# of those, what this command and machine decide as a fresh run does; the others go on at the
# checkpoint's values unless given (dtype and compile only on the same kind of device: a GPU's
# float16 or compile is not a CPU's)
FRESH_ON_RESUME = ('device', 'out_dir', 'init_from')
LENGTHS = ('max_iters', 'max_tokens', 'epochs')  # the run's length, one of them given (configure)
# values that a run's start resolves (the preset by the device, the decay's end by the length):
# given again on resume they are no contradiction, and the checkpoint's value stands
AS_RESOLVED = {'preset': '', 'lr_decay_iters': 0}


def resume_overrides(overrides):
    """--init_from=resume: the checkpoint's config as if given on the command line, so that it wins
    over the defaults, the preset and the recipe; the command line's own values go on top, and
    those outside MAY_CHANGE_ON_RESUME must equal the checkpoint's."""
    folder = overrides.get('out_dir') or f"out-{overrides.get('stage', stage)}"
    path = os.path.join(folder, 'ckpt.pt')
    saved = checked_config(load_checkpoint(path, mmap=True), path)  # mmap: the weights not read
    overrides = {k: v for k, v in overrides.items() if (k, v) not in AS_RESOLVED.items()}
    for k, v in overrides.items():
        if k not in MAY_CHANGE_ON_RESUME and v != saved[k]:
            die(f"--{k}={v} contradicts {path}, trained with --{k}={saved[k]}: a resume goes on "
                f"with the run's settings (leave --{k} out), or start a fresh run with another "
                f"--out_dir")
    # the run's length: the one given, else the checkpoint's in the form it had (a token budget,
    # passes over the data, or updates)
    length = [k for k in LENGTHS if k in overrides]
    length = length or [next((k for k in ('max_tokens', 'epochs') if saved[k]), 'max_iters')]
    kind = (overrides.get('device') or devices()[0]).split(':')[0]
    fresh = FRESH_ON_RESUME + ('dtype', 'compile') * (saved['device'].split(':')[0] != kind)
    kept = {k: v for k, v in saved.items()
            if k not in fresh and (k not in LENGTHS or k in length)}
    return {**kept, **overrides}


def checked_config(checkpoint, path):
    """A checkpoint's config, if it names the settings this code has, exactly: one written by other
    code (another version of this script) may describe data or a model that this code builds
    differently, so it is refused rather than guessed at."""
    config = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict):
        die(f"{path} holds no config: it was written by other code; start a fresh run with "
            f"another --out_dir, or resume it with that code")
    odd = [f"{what} ({', '.join(sorted(keys))})" for what, keys in
           (('has settings this code does not know', set(config) - set(config_keys)),
            ('lacks settings this code needs', set(config_keys) - set(config))) if keys]
    if odd:
        die(f"{path} was written by other code: its config {' and '.join(odd)}; start a fresh "
            f"run with another --out_dir, or resume it with the code that wrote it")
    return config


# ==== Appendix: files ===========================================================
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


def write_or_stop(path, write):
    """atomic_write, or, where the write fails (a full disk, a file-size limit, no permission), one
    line that says what failed, what is intact and how to go on."""
    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        stop_on_failed_write(path, e)


def stop_on_failed_write(path, error):
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(error, OSError) and error.errno:
        reason = os.strerror(error.errno).lower()
    elif os.path.isdir(folder) and shutil.disk_usage(folder).free < 2 ** 20:
        reason = "the disk is full"
    elif file_size_limit() is not None:
        reason = f"over the file-size limit of {file_size_limit():,} bytes (ulimit -f)"
    else:
        reason = type(error).__name__
        if str(error).strip():
            reason = str(error).strip().splitlines()[0]
    saved = progress.get('saved')
    ckpt = os.path.join(out_dir, 'ckpt.pt')
    if saved is not None:
        what = (f"{ckpt} still holds step {saved}, whole; make room, then continue with: "
                f"{resume_command()}")
    else:
        what = "no checkpoint was written yet; make room, then run the same command again"
    die(f"cannot write {path} ({reason}); {what}")


def file_size_limit():
    """The process's file-size limit in bytes (ulimit -f), None where there is none."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    return soft


def resume_command():
    """This run's command line with --init_from=resume (and its --out_dir) in place of
    --init_from."""
    args, skip = [], False
    for a in command_line:
        if skip:  # the value of a dropped --key value
            skip = False
        elif a in ('--init_from', '--out_dir'):
            skip = True
        elif not a.startswith(('--init_from=', '--out_dir=')):
            args.append(a)
    return ' '.join(['python', SCRIPT, *args, f'--out_dir={out_dir}', '--init_from=resume'])


def load_checkpoint(path, mmap=False):
    """A run's checkpoint (its out_dir will do), or a Hugging Face Llama folder as a transfer
    source: eval.py reads such a folder, beside its export. mmap: the tensors are mapped from the
    file, not read (for the config alone)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'ckpt.pt')):
        return load_hf_folder(path)
    if os.path.isdir(path):  # a run's out_dir will do
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        die(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location='cpu', weights_only=False, mmap=mmap)
    except Exception as e:
        if isinstance(e, MemoryError) or 'DefaultCPUAllocator' in str(e):  # torch's own words
            die(f"not enough memory to load the checkpoint {path} ({os.path.getsize(path):,} "
                f"bytes): stop what else runs here, or load it on a machine with more memory")
        die(f"cannot read the checkpoint {path}: {type(e).__name__}: {e}")


def load_hf_folder(folder):
    """A folder without ckpt.pt: an HF Llama folder, read by eval.py into a checkpoint's dict."""
    if not os.path.exists(os.path.join(folder, 'config.json')):
        die(f"no checkpoint at {os.path.join(folder, 'ckpt.pt')}")
    import eval as hf  # here only: training from scratch or a checkpoint never imports it
    try:
        source = hf.load_hf_llama(folder)
    except hf.HFError as e:
        die(str(e))
    for note in source['notes']:
        print(f"note: {note}")
    return source


def open_log(path, step):
    """log.jsonl, one JSON object a line; on resume the lines after the checkpoint's step are
    dropped."""
    kept = []
    if step and os.path.exists(path):
        kept = [line for line in open(path) if json.loads(line)['step'] <= step]
    try:
        log = open(path, 'w')
        log.writelines(kept)
        log.flush()
    except OSError as e:
        stop_on_failed_write(path, e)
    return log


def log_write(log, record):
    try:
        log.write(json.dumps(record) + '\n')
        log.flush()
    except OSError as e:
        stop_on_failed_write(log.name, e)


def write_run_file(model_args, checkpoint=None):
    """out_dir/run.json, written as the run starts: what eval.py compare needs once the checkpoints
    are gone. A resume (from `checkpoint`) keeps the run's first settings and adds itself."""
    config = {k: globals()[k] for k in config_keys}
    run = dict(config=config, stage=stage, vocab=vocab, model_args=model_args)
    path = os.path.join(out_dir, 'run.json')
    if checkpoint:
        run = resumed_run_file(path, run, checkpoint)
    def write(tmp):
        # closed here: a failed last flush must fail the write, not pass unseen
        with open(tmp, 'w') as f:
            json.dump(run, f, indent=1)
    write_or_stop(path, write)


def check_source_vocab(source, stage, keep_embeddings):
    """train(): a source whose tokenizer is neither GPT-2's nor bytes (an HF folder's) gives its
    blocks only: sft and --keep_embeddings need ids that text_codec can encode."""
    if source['vocab']['kind'] in (*SOURCES, 'gpt2', 'bytes'):
        return
    for who, wants in (('sft', stage == 'sft'), ('--keep_embeddings', keep_embeddings)):
        if wants:
            die(f"{source.get('source', 'the source')}'s tokenizer is neither GPT-2's nor bytes: "
                f"{who} needs its ids to mean text nca_gpt.py can encode; transfer its blocks to "
                f"--stage lm instead")


def resumed_run_file(path, run, checkpoint):
    """run.json on resume: the run as it started (where run.json is gone or unreadable, as its
    checkpoint has it), and in `resumes` each resume: when (UTC), from which step, and which of
    MAY_CHANGE_ON_RESUME it changed, [before, now]."""
    before, first = checkpoint['config'], None
    try:
        with open(path) as f:
            first = json.load(f)
    except (OSError, ValueError):
        pass
    if not isinstance(first, dict) or not isinstance(first.get('config'), dict):
        first = {**run, 'config': before}
    changed = {k: [before[k], run['config'][k]] for k in MAY_CHANGE_ON_RESUME
               if k != 'init_from' and before[k] != run['config'][k]}
    resume = dict(time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                  from_step=checkpoint['iter_num'], changed=changed)
    return {**first, 'resumes': [*first.get('resumes', []), resume]}


# ==== Appendix: what a run prints ================================================
def print_transfer(source, keep):
    line = (f"transferred the blocks of {init_from} ({source['stage']}, "
            f"step {source['iter_num']}); ")
    if keep:
        line += "embedding and head kept"
    else:
        line += f"embedding and head fresh for {vocab['kind']}"
    if reinit:
        line += f"; reinit {reinit}"
    if freeze:
        line += f"; frozen {freeze}"
    print(line)
    theirs = source.get('config', {}).get('recipe', 'project')
    if theirs != recipe:
        print(f"recipes differ: {init_from} was trained under --recipe={theirs}, this stage runs "
              f"under --recipe={recipe}")


def print_run(model, world, iter_num):
    os.makedirs(out_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_blocks = n_params - 2 * model.wte.weight.numel()
    print(f"stage {stage}, preset {preset}, {device} {dtype}, recipe {recipe}, {world} "
          f"process(es); {n_params / 1e6:.2f}M parameters ({n_blocks / 1e6:.2f}M without "
          f"embedding and head)")
    total = max_iters * tokens_per_iter()
    print(f"{max_iters} updates x {tokens_per_iter():,} tokens = {total / 1e6:,.1f}M tokens, from "
          f"step {iter_num}; lr: warm-up {warmup_iters} steps, cosine to step {lr_decay_iters}; "
          f"writing to {out_dir}/")
    print('config: ' + ' '.join(f"{k}={globals()[k]}" for k in config_keys))


def print_step(log, it, lossf, lr, dt, eta, flops_per_iter, peak_flops, t_start):
    rate = tokens_per_iter() / dt
    mfu = f" | mfu {flops_per_iter / dt / peak_flops:.1%}" if peak_flops else ''
    print(f"step {it} | loss {lossf:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s{mfu} | "
          f"eta {eta / 60:.1f} min")
    log_write(log, dict(step=it, loss=lossf, lr=lr, tok_per_s=rate, time=time.time() - t_start))


def print_evaluation(it, stats):
    ppl = math.exp(min(stats['val_loss'], 50))
    line = (f"step {it}: val loss {stats['val_loss']:.4f} +- {stats['val_loss_se']:.4f} over "
            f"{eval_iters} fixed batches (ppl {ppl:.2f})")
    fl = stats.get('frame_loss')  # nca
    if fl:
        second = fl[min(1, len(fl) - 1)]
        line += (f" | loss of frame 1, 2, {len(fl)}: {fl[0]:.3f}, {second:.3f}, {fl[-1]:.3f}"
                 f" | next-frame acc {stats['next_frame_acc']:.1%} (copying the last frame: "
                 f"{stats['copy_frame_acc']:.1%})")
    print(line)


# ==== Appendix: devices and memory ===============================================
def check_memory(model, act_bytes, master):
    need, free = memory_needed(model, act_bytes), free_memory(device)
    if master:
        line = (f"memory: about {need / 2**30:.2f} GiB needed on {device} (a rough estimate: "
                f"weights, gradients, AdamW, activations of {batch_size} sequences)")
        if free:
            line += f"; {free / 2**30:.1f} GiB free"
        print(line)
    if free and need > 2 * free:  # beyond the estimate's own error: it clearly cannot fit
        die(f"this run needs about {need / 2**30:.1f} GiB and {device} has {free / 2**30:.1f} GiB "
            f"free: lower --batch_size (raise --gradient_accumulation_steps to keep the update the "
            f"same)")


def memory_needed(model, act_bytes):
    """Rough bytes of a training step (tests hold it within 2x of a measured peak): 16 a parameter
    (fp32 weights, gradients, AdamW's two moments); per token, what backward keeps: ~27 x width
    per layer in the compute dtype (the matmuls' inputs, q, k, v, SwiGLU's gate and up) plus
    2 x width in fp32 (the norms'), and the logits 3 times."""
    C, V = model.wte.embedding_dim, model.head.out_features
    per_token = model.n_layer * C * (27 * act_bytes + 8) + V * (act_bytes + 8)
    n_params = sum(p.numel() for p in model.parameters())
    return 16 * n_params + batch_size * block_size * per_token


def free_memory(device):
    """Bytes free on the device: the GPU's, or the RAM available to a CPU run; None where
    unknown."""
    if device.startswith('cuda'):
        return torch.cuda.mem_get_info(device)[0]
    if device == 'cpu' and os.path.exists('/proc/meminfo'):
        for line in open('/proc/meminfo'):
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    return None


def peak_flops_per_s(device):
    """bf16 dense peak of the GPU, for MFU; None where unknown."""
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    peaks = [('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L4', 121e12),
             ('4090', 165e12)]
    return next((f for key, f in peaks if key in name), None)


def main(argv):
    global device
    command_line[:] = argv
    note = configure(argv)
    device = device or devices()[0]
    check_config()
    master = int(os.environ.get('RANK', 0)) == 0
    if note and master:
        print(note)
    if band == 'auto' and init_from != 'resume':  # a resume keeps its checkpoint's band
        auto_band()
    try:
        train()
    # Ctrl-C: one line on where to go on (a checkpoint is written whole or not at all)
    except KeyboardInterrupt:
        if master:
            print(f"{SCRIPT}: interrupted{interrupted_at()}", file=sys.stderr)
        sys.exit(130)


def interrupted_at():
    if not progress:
        return ''
    saved = progress.get('saved')
    if saved is None:
        return f" at step {progress['step']}; no checkpoint yet"
    return (f" at step {progress['step']}; {out_dir}/ckpt.pt holds step {saved}: add "
            f"--init_from=resume to continue from it")


if __name__ == '__main__':
    main(sys.argv[1:])
