"""The method as nca_gpt.py writes it: the rule network plainly and fast, transfer's checks, the gzip band's early
stop, the rule network's shape in the cache key and the checkpoints, stages, run.json, failed checkpoint writes,
the config resolved once. CPU, offline, about a minute."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

# a tiny NCA run (as tests/test_train.py's FAST): 3 frames of 38 tokens, a 2-layer model of width 32
FAST = ['--preset=tiny', '--device=cpu', '--block_size=114', '--batch_size=4', '--num_rules=64',
        '--num_val_rules=16', '--eval_iters=2', '--log_interval=1', '--n_layer=2', '--n_embd=32', '--n_states=10',
        '--gzip_lower=0.5', '--stage=nca']


def run(*args, check=True, preexec_fn=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'nca_gpt.py'), *args], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env, preexec_fn=preexec_fn)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def message(excinfo):
    """The text of a SystemExit (die's one line)."""
    msg = str(excinfo.value.code)
    assert '\n' not in msg, msg
    return msg


# ---- 1. the rule network written plainly is the fast rollout -------------------------------------------------
def rules_and_grids(nca, R, n, first=0):
    nca.n_states = n
    keys, rules = nca.candidate_rules('train', 0, first, R, nca.data_config('nca'))
    grid0 = nca.initial_grids(nca.make_key(keys, nca.GRID), n, nca.grid)
    return nca.unpack_rules(rules, nca.data_config('nca')), grid0, nca.make_key(keys, nca.NOISE)


def conv_logits(nca, kernels, r, state, identity_bias):
    """Rule r's logits (n, S, S) for one grid (S, S), the network written out: one-hot, wrap-pad, conv 3x3,
    conv 1x1, ReLU, conv 1x1 (+ identity_bias on the current state)."""
    w1, w2, w3 = (k[r] for k in kernels)
    n = w3.size(0)
    x = F.one_hot(state, n).permute(2, 0, 1).float()[None]
    h = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='circular'), w1)
    h = nca.rule_nonlinearity(F.conv2d(h, w2[:, :, None, None]))
    logits = F.conv2d(h, w3[:, :, None, None])[0]
    return logits + identity_bias * F.one_hot(state, n).permute(2, 0, 1)


def disagreements_at_near_ties(nca, kernels, fast, plain, identity_bias, tol=1e-5):
    """At temperature 0: every rule whose two trajectories part does so first at cells where the network's top
    two logits are within tol (a rounding choice, not a different rule). -> the number of rules that part."""
    parts = (fast != plain).flatten(2).any(2)                       # (R, T+1)
    assert not parts[:, 0].any()                                     # the same initial grids
    for r in parts.any(1).nonzero().flatten().tolist():
        t = parts[r].nonzero()[0].item()                            # the first step they differ; equal before it
        logits = conv_logits(nca, kernels, r, plain[r, t - 1], identity_bias)
        top2 = logits.topk(2, dim=0).values
        cells = fast[r, t] != plain[r, t]
        gaps = (top2[0] - top2[1])[cells]
        assert (gaps < tol).all(), (r, t, gaps.max().item())
    return int(parts.any(1).sum())


def test_the_rule_network_is_the_papers(nca):
    """The tests above rebuild the network with the code's own widths and nonlinearity, so that a fork that changes
    them fails only here: the paper's network is 3x3 conv -> 4, 1x1 conv -> 16, ReLU, 1x1 conv -> n_states."""
    cfg = nca.data_config('nca')
    assert nca.rule_shapes(cfg) == [(4, 10, 3, 3), (16, 4), (10, 16)], "not the paper's widths (rule_hidden1/2)"
    h = torch.linspace(-2, 2, 9)
    assert torch.equal(nca.rule_nonlinearity(h.clone()), F.relu(h)), "the rule network's nonlinearity is not ReLU"


@pytest.mark.parametrize('R,n,temperature,identity_bias', [
    (1024, 10, 1e-4, 0.0), (512, 2, 1e-4, 0.0), (512, 10, 1e-4, 0.5), (512, 10, 0.0, 0.0), (512, 2, 0.0, 0.0),
    (512, 10, 0.0, 0.5)])
def test_plain_rule_network_equals_fast_rollout(nca, R, n, temperature, identity_bias):
    kernels, grid0, noise = rules_and_grids(nca, R, n)
    plain = nca.rollout_plain(kernels, grid0, 20, noise, temperature, identity_bias)
    fast = nca.rollout_table(kernels, grid0, 20, noise, temperature, identity_bias)
    assert nca.rollout is nca.rollout_table  # the one training runs
    assert plain.shape == fast.shape == (R, 21, nca.grid, nca.grid)
    assert torch.equal(plain[:, 0], grid0)
    assert not torch.equal(plain[:, 1:], plain[:, :1].expand_as(plain[:, 1:]))  # the grids do move
    if temperature:
        assert torch.equal(fast, plain)
    else:  # argmax: the two forms may round a near-tie differently, nowhere else
        parted = disagreements_at_near_ties(nca, kernels, fast, plain, identity_bias)
        assert parted <= R // 100, parted  # (on the machine these tests were written on: 0, equal throughout)


@pytest.mark.parametrize('temperature,identity_bias', [(0.0, 0.0), (1e-4, 0.5)])
def test_nca_step_pads_circularly_a_torus(nca, temperature, identity_bias):
    """Shifting the grid (and each cell's noise with it) shifts the next state: the padding is circular. With zero
    padding, the cells at the border would see a different neighbourhood once shifted."""
    kernels, grid0, noise = rules_and_grids(nca, 64, 10)
    R, S, _ = grid0.shape
    u = nca.uniform(noise, S * S) if temperature else None
    step = nca.nca_step(grid0, kernels, u, temperature, identity_bias)
    assert step.shape == grid0.shape and step.dtype == torch.long
    assert not torch.equal(step, grid0)
    for shift in [(1, 0), (0, 5), (7, 11), (11, 11)]:
        roll_u = u.view(R, S, S).roll(shift, dims=(1, 2)).reshape(R, S * S) if temperature else None
        shifted = nca.nca_step(grid0.roll(shift, dims=(1, 2)), kernels, roll_u, temperature, identity_bias)
        assert torch.equal(shifted, step.roll(shift, dims=(1, 2))), shift
    if not temperature:  # and it is the written-out network, wrap-padded, cell for cell (up to near-ties)
        for r in range(8):
            logits = conv_logits(nca, kernels, r, grid0[r], identity_bias)
            top2 = logits.topk(2, dim=0).values
            differ = step[r] != logits.argmax(0)
            assert ((top2[0] - top2[1])[differ] < 1e-5).all()


# ---- 2. transfer refuses a depth or head mismatch, in one line -----------------------------------------------
def gpt_checkpoint(nca, n_layer, n_head, with_args=True):
    args = dict(vocab_size=64, n_layer=n_layer, n_head=n_head, n_embd=32, block_size=16)
    source = {'model': nca.GPT(**args).state_dict()}
    if with_args:
        source['model_args'] = args
    return source


@pytest.mark.parametrize('theirs,ours,key', [((3, 2), (2, 2), 'n_layer'), ((2, 4), (2, 2), 'n_head')])
def test_transfer_refuses_depth_or_heads_naming_both(nca, theirs, ours, key):
    source = gpt_checkpoint(nca, *theirs)
    model = nca.GPT(vocab_size=64, n_layer=ours[0], n_head=ours[1], n_embd=32, block_size=16)
    i = 0 if key == 'n_layer' else 1
    with pytest.raises(SystemExit) as e:
        nca.transfer(model, source, same_vocab=False)
    msg = message(e)
    assert msg.startswith('nca_gpt.py: ') and f'--{key}={theirs[i]}' in msg and f'--{key}={ours[i]}' in msg, msg


def test_transfer_refuses_extra_layers_without_model_args(nca):
    torch.manual_seed(0)
    fits = gpt_checkpoint(nca, 2, 2, with_args=False)  # the same blocks: loaded, the embedding this stage's own
    model = nca.GPT(vocab_size=80, n_layer=2, n_head=2, n_embd=32, block_size=16)
    nca.transfer(model, fits, same_vocab=False)
    assert torch.equal(model.blocks[1].mlp.down.weight, fits['model']['blocks.1.mlp.down.weight'])
    assert model.wte.weight.shape == (80, 32)
    source = gpt_checkpoint(nca, 3, 2, with_args=False)  # one layer more: refused
    model = nca.GPT(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)
    before = model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(SystemExit) as e:
        nca.transfer(model, source, same_vocab=False)
    msg = message(e)
    assert 'blocks.2.' in msg and 'not in this model' in msg, msg
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)  # nothing was loaded


# ---- 3. a band that keeps a tiny share of the candidates stops early ------------------------------------------
def quantile_text(ratios):
    return ' / '.join(f'{v:.3f}' for v in np.quantile(np.asarray(ratios), [0.1, 0.5, 0.9]))


def count_calls(nca, monkeypatch, most):
    """candidate_rules, counted; past `most` chunks the test has failed (it did not stop early)."""
    calls = []
    real = nca.candidate_rules

    def counted(split, rule_set, first, count, cfg):
        calls.append(first)
        if len(calls) > most:
            raise AssertionError(f"still drawing candidates after {len(calls) - 1} chunks: no early stop")
        return real(split, rule_set, first, count, cfg)
    monkeypatch.setattr(nca, 'candidate_rules', counted)
    return calls


def test_rare_band_stops_early_with_rate_time_and_quantiles(nca, monkeypatch):
    ratios = nca.rule_complexity(*reversed(nca.candidate_rules('train', 0, 0, 2048, nca.data_config('nca'))), nca.data_config('nca')).numpy()
    first = ratios[:1024]  # the candidates the first 4 chunks of 256 try
    top = np.unique(first)[::-1]
    nca.gzip_lower = float((top[2] + top[3]) / 2)   # the 3 highest ratios (and their ties): ~0.3% of them
    nca.gzip_upper = 1.0
    kept = int(((torch.tensor(first) > nca.gzip_lower) & (torch.tensor(first) < nca.gzip_upper)).sum())
    assert 3 <= kept <= 8 and kept / 1024 < 0.01
    calls = count_calls(nca, monkeypatch, most=6)
    with pytest.raises(SystemExit) as e:
        nca.num_rules = 64
        nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=256)
    msg = message(e)
    assert len(calls) <= 5, calls                      # stopped early: 64 rules would take ~20,000 candidates
    assert f'{kept / 1024:.2%}' in msg and f'{kept} of 1024' in msg, msg
    assert 'minutes' in msg and str(nca.gzip_lower) in msg, msg
    # the quantiles of every candidate tried, not of the last chunk's
    assert quantile_text(first) in msg, msg
    assert quantile_text(first[768:]) != quantile_text(first)  # (so that the line above tells them apart)


def test_empty_band_reports_the_quantiles_of_all_candidates(nca, monkeypatch):
    nca.gzip_lower, nca.gzip_upper = 5.0, 6.0  # no gzip ratio is that high
    calls = count_calls(nca, monkeypatch, most=25)
    with pytest.raises(SystemExit) as e:
        nca.num_rules = 16
        nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=32)
    msg = message(e)
    assert 'kept no rule' in msg and len(calls) == 20, (msg, calls)
    tried = nca.rule_complexity(*reversed(nca.candidate_rules('train', 0, 0, 32 * 20, nca.data_config('nca'))), nca.data_config('nca')).numpy()
    assert quantile_text(tried) in msg, msg
    assert quantile_text(tried[-32:]) != quantile_text(tried)


# ---- 4. the rule network's shape: config, cache key, checkpoints --------------------------------------------
def test_rule_network_shape_is_config_and_part_of_the_rule_set(nca):
    assert {'rule_hidden1', 'rule_hidden2'} <= set(nca.config_keys)
    assert (nca.rule_hidden1, nca.rule_hidden2) == (4, 16)  # the paper's
    n = nca.n_states
    nca.num_rules = 8
    paper = nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=64)
    assert paper.shape == (8, 9 * 4 * n + 16 * 4 + n * 16) == (8, 584)
    nca.rule_hidden2 = 8
    narrower = nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=64)
    assert narrower is not paper and narrower.shape == (8, 9 * 4 * n + 8 * 4 + n * 8)
    assert [tuple(k.shape[1:]) for k in nca.unpack_rules(narrower, nca.data_config('nca'))] == [(4, n, 3, 3), (8, 4), (n, 8)]
    frames = nca.trajectories(narrower, torch.arange(8), 3, nca.data_config('nca'))  # the narrower network runs
    assert frames.shape == (8, 3, nca.grid, nca.grid)
    nca.rule_hidden1 = 3
    assert nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=64).shape == (8, 9 * 3 * n + 8 * 3 + n * 8)
    nca.rule_hidden1, nca.rule_hidden2 = 4, 16
    assert torch.equal(nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=64), paper)  # the paper's set again


def test_rule_network_shape_is_in_the_checkpoint_and_run_json(tmp_path):
    run(*FAST, '--max_iters=1', '--eval_interval=1', '--rule_hidden1=3', '--rule_hidden2=8', f'--out_dir={tmp_path}')
    config = load(tmp_path / 'ckpt.pt')['config']
    assert (config['rule_hidden1'], config['rule_hidden2']) == (3, 8)
    config = json.loads((tmp_path / 'run.json').read_text())['config']
    assert (config['rule_hidden1'], config['rule_hidden2']) == (3, 8)


# ---- 5. an unknown stage is an error ------------------------------------------------------------------------
def test_unknown_stage_has_no_vocabulary(nca):
    nca.stage = 'bogus'
    with pytest.raises(SystemExit) as e:
        nca.stage_vocab()
    msg = message(e)
    assert 'bogus' in msg and all(s in msg for s in ('nca', 'dyck', 'lm', 'sft')), msg


# ---- 6. run.json ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def first_checkpoint(tmp_path_factory):
    """A tiny NCA run to its first checkpoint at step 2 (seed 7)."""
    out = tmp_path_factory.mktemp('first') / 'out'
    run(*FAST, '--max_iters=2', '--eval_interval=2', '--seed=7', f'--out_dir={out}')
    return out


def test_run_json_is_the_checkpoints_config(first_checkpoint):
    ckpt = load(first_checkpoint / 'ckpt.pt')
    assert ckpt['iter_num'] == 2
    written = json.loads((first_checkpoint / 'run.json').read_text())
    assert set(written) == {'config', 'stage', 'vocab', 'model_args'}
    assert written['config']['seed'] == 7 and written['config']['init_from'] == 'scratch'
    assert written['stage'] == 'nca' and written['vocab']['kind'] == 'nca'
    for k in ('config', 'stage', 'vocab', 'model_args'):
        assert written[k] == ckpt[k], k


# ---- 7. a failed checkpoint write: one line, non-zero, nothing half-written -----------------------------------
def limited_to(nbytes):
    def limit():  # in the child: files may not grow past nbytes; the write fails (EFBIG) instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


LIMIT = 200_000  # bytes: over log.jsonl and run.json, under the checkpoint (MBs)


def assert_failed_write(p, out):
    assert p.returncode != 0
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('nca_gpt.py: cannot write') and 'ckpt.pt' in last, last
    assert not [f for f in os.listdir(out) if '.tmp' in f], os.listdir(out)
    return last


def test_failed_checkpoint_write_keeps_the_last_one(first_checkpoint, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(first_checkpoint, out)
    assert os.path.getsize(out / 'ckpt.pt') > 5 * LIMIT
    p = run(*FAST, '--max_iters=4', '--eval_interval=2', '--seed=7', f'--out_dir={out}', '--init_from=resume',
            check=False, preexec_fn=limited_to(LIMIT))
    last = assert_failed_write(p, out)
    assert 'step 2' in last and '--init_from=resume' in last and f'--out_dir={out}' in last, last
    assert load(out / 'ckpt.pt')['iter_num'] == 2  # whole, and still the step-2 checkpoint


def test_failed_first_checkpoint_write_says_none_was_written(tmp_path):
    out = tmp_path / 'out'
    p = run(*FAST, '--max_iters=2', '--eval_interval=2', f'--out_dir={out}', check=False,
            preexec_fn=limited_to(LIMIT))
    last = assert_failed_write(p, out)
    assert 'no checkpoint was written yet' in last, last
    assert not (out / 'ckpt.pt').exists()


# ---- 8. the config is resolved once ---------------------------------------------------------------------------
def test_configure_resolves_the_schedule_at_once(nca):
    nca.configure(['--preset=tiny', '--stage=nca', '--max_iters=4000'])
    # the tiny nca preset: 1000 updates, warm-up 50, decay to 1000; a length given keeps their shares
    assert (nca.max_iters, nca.warmup_iters, nca.lr_decay_iters) == (4000, 200, 4000)
    assert not hasattr(nca, 'schedule_shares') and not hasattr(nca, 'run_length')
