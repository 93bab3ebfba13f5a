"""The NCA data engine: rules, rollout, tokenizer, filter, batches, Dyck. CPU, offline, seconds."""
import gzip
import os
import subprocess
import sys
import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
import eval as ev  # noqa: E402


def small_rollout(nca, R=6, steps=5, temperature=0.0, first=0):
    keys, rules = nca.candidate_rules('train', 0, first, R, nca.data_config('nca'))
    grid0 = nca.initial_grids(nca.make_key(keys, nca.GRID), nca.n_states, nca.grid)
    return rules, grid0, keys, nca.rollout(nca.unpack_rules(rules, nca.data_config('nca')), grid0, steps, keys, temperature)


def test_shapes_and_ranges(nca):
    rules, grid0, keys, frames = small_rollout(nca, temperature=1e-4)
    assert rules.shape == (6, 584)  # the paper's 614 parameters less 30 biases that are always zero
    assert grid0.shape == (6, 12, 12) and frames.shape == (6, 6, 12, 12)
    assert frames.min() >= 0 and frames.max() < nca.n_states
    assert torch.equal(frames[:, 0], grid0)
    # lecun normal truncated at 2 std: the 3x3 conv's fan-in is 9 * 10
    conv1 = nca.unpack_rules(nca.candidate_rules('train', 0, 0, 4096, nca.data_config('nca'))[1], nca.data_config('nca'))[0]
    assert abs(conv1.std().item() - (1 / 90) ** 0.5) < 0.003
    assert conv1.abs().max().item() <= 2 * (1 / 90) ** 0.5 / 0.8796 + 1e-6
    tokens = nca.tokenize(frames, nca.n_states, nca.patch)
    assert tokens.shape == (6, 6 * 38) and tokens.max() <= 10001 and tokens.min() >= 0


def test_rollout_is_the_papers_conv_network(nca):
    """The lookup-table rollout equals the plain network: wrap-pad, conv3x3, conv1x1, ReLU, conv1x1."""
    rules, grid0, keys, frames = small_rollout(nca, R=5, steps=6)
    n = nca.n_states
    for r in range(5):
        w1, w2, w3 = [w[0] for w in nca.unpack_rules(rules[r:r + 1], nca.data_config('nca'))]
        state = grid0[r]
        for t in range(6):
            x = F.one_hot(state, n).permute(2, 0, 1).float()[None]           # (1, n, S, S)
            h = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='circular'), w1)
            h = nca.rule_nonlinearity(F.conv2d(h, w2[:, :, None, None]))
            state = F.conv2d(h, w3[:, :, None, None])[0].argmax(0)
            assert torch.equal(state, frames[r, t + 1]), (r, t)


def plain_rollout(nca, rules, grid0, n_steps, keys, temperature, identity_bias):
    """The rollout step by step as the paper's code makes it, every cell drawn: lookup table, ReLU, logits,
    softmax(logits / T) by inverse CDF with uniform(keys)."""
    R, S, _ = grid0.shape
    cfg = nca.data_config('nca')
    n, hidden = cfg.n_states, cfg.rule_hidden2   # the rule network's shapes as the code has them
    w1, w2, w3 = nca.unpack_rules(rules, cfg)
    table = torch.einsum('rcsij,roc->rijso', w1, w2).reshape(-1, hidden)
    first_row = (torch.arange(R).view(R, 1, 1) * 9 + torch.arange(9).view(1, 9, 1)) * n
    u = nca.uniform(keys, n_steps * S * S).view(R, n_steps, S * S)
    states = [grid0.reshape(R, S * S)]
    for t in range(n_steps):
        rows = first_row + states[-1][:, nca.torus_neighbours(S, 'cpu')]                      # (R, 9, S*S)
        h = nca.rule_nonlinearity(F.embedding_bag(rows.transpose(1, 2).reshape(-1, 9), table, mode='sum'))
        h = h.view(R, S * S, hidden)
        logits = torch.bmm(w3, h.transpose(1, 2)).transpose(1, 2) + identity_bias * F.one_hot(states[-1], n)
        if temperature == 0:
            states.append(logits.argmax(-1))
        else:
            weights = ((logits - logits.amax(-1, keepdim=True)) / temperature).clamp_min(-80).exp()
            states.append(nca.categorical(weights, u[:, t]))
    return torch.stack(states, 1).view(R, n_steps + 1, S, S)


@pytest.mark.parametrize('temperature,identity_bias,n,size,tie', [
    (1e-4, 0.0, 10, 12, False), (0.0, 0.0, 10, 12, False), (1e-4, 0.5, 10, 12, False), (1e-4, 0.0, 4, 8, False),
    (1e-4, 0.0, 10, 12, True), (0.0, 0.0, 10, 12, True), (0.1, 0.0, 10, 8, False)])
def test_rollout_draws_every_cell_as_the_plain_rollout(nca, temperature, identity_bias, n, size, tie):
    """The batched rollout (one index_select and one embedding_bag a step for all rules) must give the states of
    the plain step-by-step rollout bit for bit, exact ties included (tie: state 1's logits are state 0's)."""
    nca.n_states, nca.grid = n, size
    keys, rules = nca.candidate_rules('train', 0, 0, 512, nca.data_config('nca'))
    if tie:
        w3 = rules[:, -16 * n:].view(-1, n, 16)
        w3[:, 1] = w3[:, 0]
    grid0 = nca.initial_grids(nca.make_key(keys, nca.GRID), n, size)
    noise = nca.make_key(keys, nca.NOISE)
    frames = nca.rollout(nca.unpack_rules(rules, nca.data_config('nca')), grid0, 20, noise, temperature, identity_bias)
    assert torch.equal(frames, plain_rollout(nca, rules, grid0, 20, noise, temperature, identity_bias))


def test_tokens_to_grids_round_trip(nca):
    _, _, _, frames = small_rollout(nca, temperature=1e-4)
    tokens = nca.tokenize(frames, 10, 2)
    assert torch.equal(ev.detokenize(tokens, 10, 2, 12), frames)
    assert torch.equal(nca.tokenize(ev.detokenize(tokens, 10, 2, 12), 10, 2), tokens)
    # a patch's cells are its token's base-n digits, row-major
    grid = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    grid[0, 0, 0, :2] = torch.tensor([1, 2])
    grid[0, 0, 1, :2] = torch.tensor([3, 4])
    assert nca.tokenize(grid, 10, 2)[0, 1].item() == 1 + 2 * 10 + 3 * 100 + 4 * 1000
    with pytest.raises(ValueError):
        ev.detokenize(tokens[:, :-1], 10, 2, 12)
    bad = tokens.clone()
    bad[0, 0] = 5
    with pytest.raises(ValueError):
        ev.detokenize(bad, 10, 2, 12)


@pytest.mark.parametrize('shift', [(1, 0), (0, 5), (7, 11)])
def test_torus_equivariance(nca, shift):
    rules, grid0, keys, frames = small_rollout(nca, steps=8)
    shifted = nca.rollout(nca.unpack_rules(rules, nca.data_config('nca')), grid0.roll(shift, dims=(1, 2)), 8, keys, 0.0)
    assert torch.equal(shifted, frames.roll(shift, dims=(2, 3)))
    assert not torch.equal(frames[:, 1:], frames[:, :1].expand_as(frames[:, 1:]))  # the grids do move


@pytest.mark.parametrize('batch', ['nca', 'dyck'])
def test_same_seed_same_data_whatever_the_batch_size(nca, batch):
    nca.num_rules, nca.num_val_rules, nca.block_size = 16, 8, 128
    def get(split, index, batch_size):
        return getattr(nca, f'{batch}_batch')(nca.data_config(batch), split, index, batch_size)
    for split in ('train', 'val'):
        x8, y8 = get(split, 1, 8)        # sequences 8..15
        x4, y4 = get(split, 3, 4)        # sequences 12..15
        assert torch.equal(x8[4:], x4) and torch.equal(y8[4:], y4)
    assert not torch.equal(get('train', 0, 8)[0], get('val', 0, 8)[0])
    nca.seed += 1
    assert not torch.equal(get('train', 1, 8)[0], x8)


def test_gzip_ratio_of_known_bytes(nca):
    zeros = np.zeros(360, dtype=np.int64)  # 1,440 bytes as int32
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)    # raw deflate, no header
    raw_len = len(deflate.compress(bytes(1440)) + deflate.flush())
    # gzip = 10-byte header + deflate + 8-byte trailer (CRC, size): 18 + 14 bytes for 1,440 zeros
    assert nca.gzip_ratio(zeros) == (18 + raw_len) / 1440 == 32 / 1440
    tokens = np.random.default_rng(0).integers(0, 10000, 360)
    ratio = nca.gzip_ratio(tokens)
    assert 0.5 < ratio < 0.75
    # the convention matters: the same tokens as uint16 bytes score far higher
    raw16 = tokens.astype('<u2').tobytes()
    assert len(gzip.compress(raw16, 9)) / len(raw16) > ratio + 0.2


def test_rejection_sampling_keeps_the_in_band_candidates_in_order(nca):
    nca.gzip_lower, nca.gzip_upper = 0.3, 0.5
    keys, rules = nca.candidate_rules('train', 0, 0, 256, nca.data_config('nca'))
    ratio = nca.rule_complexity(rules, keys, nca.data_config('nca'))
    expected = rules[(0.3 < ratio) & (ratio < 0.5)][:20]
    assert 20 < ((0.3 < ratio) & (ratio < 0.5)).sum() < 200
    nca.num_rules = 20
    assert torch.equal(nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=32), expected)
    assert torch.equal(nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=256), expected)
    nca.gzip_lower, nca.gzip_upper = 0.999, 1.0
    with pytest.raises(SystemExit, match='kept no rule'):
        nca.rule_set(nca.data_config('nca'), 'train', 0, chunk=32)


def test_gzip_ratios_match_the_authors_generator(nca):
    """The authors' generator, 1024 random rules: median 0.49, quartiles 0.28 / 0.57, 46% in 0.5-1.0,
    10% in 0.3-0.4. Tolerances are a few standard errors of 1024 samples (the lower quartile sits on a
    steep part of the distribution and moves +-0.04 between seeds)."""
    keys, rules = nca.candidate_rules('train', 0, 0, 1024, nca.data_config('nca'))
    r = nca.rule_complexity(rules, keys, nca.data_config('nca')).numpy()
    q25, q50, q75 = np.quantile(r, [0.25, 0.5, 0.75])
    assert abs(q50 - 0.49) < 0.03 and abs(q75 - 0.57) < 0.02 and abs(q25 - 0.28) < 0.07
    assert abs(((0.5 < r) & (r < 1.0)).mean() - 0.46) < 0.04
    assert abs(((0.3 < r) & (r < 0.4)).mean() - 0.10) < 0.03


def test_start_end_positions_and_loss_mask(nca):
    nca.num_rules, nca.block_size = 8, 200
    x, y = nca.nca_batch(nca.data_config('nca'), 'train', 0, 4)
    assert x.shape == y.shape == (4, 200)
    seq = torch.cat([x, y[:, -1:]], 1)
    for t in range(0, 200, 38):
        assert (x[:, t] == 10000).all()
    for t in range(37, 200, 38):
        assert (x[:, t] == 10001).all()
    assert (y[:, :37] == -1).all()                        # the first frame is context only
    kept = y[:, 37:] != -1
    target = seq[:, 1:]
    assert torch.equal(y[:, 37:][kept], target[:, 37:][kept])
    assert (target[:, 37:][~kept] >= 10000).all()          # what is masked after frame 0: START/END only
    assert ((y == -1) | (y < 10000)).all()


def test_rules_are_resampled_every_epoch(nca, monkeypatch):
    nca.num_rules, nca.block_size = 8, 76
    asked, real = [], nca.rule_set
    monkeypatch.setattr(nca, 'rule_set', lambda cfg, split, which: asked.append(which) or real(cfg, split, which))
    nca.nca_batch(nca.data_config('nca'), 'train', 1, 8)                          # epoch 1
    assert asked == [1]
    nca.rule_resample = 0
    nca.nca_batch(nca.data_config('nca'), 'train', 1, 8)
    assert asked == [1, 0]


def test_dyck_sequences_are_balanced_and_within_depth(nca):
    x, y = nca.dyck_batch(nca.data_config('dyck'), 'train', 0, 16)
    assert x.shape == (16, 1024) and torch.equal(x[:, 1:], y[:, :-1])
    k, max_depth, deepest = nca.dyck_k, nca.dyck_depth, 0
    for seq in torch.cat([x, y[:, -1:]], 1).tolist():
        stack = []
        for t in seq:
            assert 0 <= t < 2 * k
            if t < k:
                stack.append(t)
            else:
                assert stack and stack.pop() == t - k    # closes the most recent open bracket
            assert len(stack) <= max_depth
            deepest = max(deepest, len(stack))
    assert deepest == max_depth


def test_eval_nca_writes_the_filter_statistics(tmp_path):
    out = tmp_path / 'nca.json'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), 'nca', '--num_rules=64', '--seed=3', '--device=cpu',
                        '--gzip_lower=0.4', f'--out={out}'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert 'gzip ratio of 64 candidate rules' in p.stdout and 'Zipf slope' in p.stdout
    stats = json.loads(out.read_text())
    assert len(stats['gzip_ratios']) == 64 and 0 < stats['acceptance'] < 1 and stats['nca']['gzip_lower'] == 0.4
    assert abs(stats['acceptance'] - np.mean([0.4 < r < 1.0 for r in stats['gzip_ratios']])) < 1e-9


def test_no_two_uses_share_a_random_stream(nca, monkeypatch):
    """Every draw (rule weights, initial grids, rollout noise, order, sequences) hashes (key, counter) pairs of
    its own: a pair that fed two draws would make two supposedly independent things functions of each other."""
    nca.grid, nca.block_size, nca.num_rules, nca.num_val_rules = 8, 40, 16, 8
    seen, real = [], nca.hash_bits

    def record(keys, n):
        seen.append({(k, c) for k in keys.tolist() for c in range(n)})
        return real(keys, n)
    monkeypatch.setattr(nca, 'hash_bits', record)
    nca.nca_batch(nca.data_config('nca'), 'train', 0, 4)
    nca.nca_batch(nca.data_config('nca'), 'val', 0, 4)
    assert len(seen) >= 8
    assert len(set().union(*seen)) == sum(map(len, seen))  # no pair twice, within a draw or across draws


def test_categorical_is_the_inverse_cdf_along_any_axis(nca):
    """The count of cumulative weights below u * total is searchsorted's index: zero weights never drawn, ties kept,
    the same along axis 1 as along the last."""
    torch.manual_seed(0)
    w = torch.rand(4000, 10) ** 4 * (torch.rand(4000, 10) < 0.7)                # many zeros, tiny weights
    w[:, 3] += 1e-30                                                             # no row all zero
    w[::7, 5] = w[::7, 6]                                                        # ties
    u = torch.cat([torch.rand(3998), torch.tensor([0.5 / 2 ** 23, 1 - 0.5 / 2 ** 23])])
    cdf = w.cumsum(-1)
    want = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    got = nca.categorical(w, u)
    assert torch.equal(got, want) and (w.gather(1, got[:, None]) > 0).all()
    assert torch.equal(nca.categorical(w.view(40, 100, 10).transpose(1, 2), u.view(40, 100), dim=1).flatten(), got)


def test_mix32_leaves_its_input_alone_and_agrees_with_ints(nca):
    """mix32 works in place after its first operation: the caller's tensor must come back unchanged."""
    x = torch.randint(0, 2 ** 32, (1000,))
    before = x.clone()
    h = nca.mix32(x)
    assert torch.equal(x, before) and torch.equal(h[:5], torch.tensor([nca.mix32(v) for v in x[:5].tolist()]))


def test_copy_baseline_on_a_hand_made_case(nca, monkeypatch):
    """Three frames of four patches: copying the previous frame gets 4 of the 8 predicted patches right; a
    model that always says patch 1 gets 2; START/END and the first frame count for neither."""
    nca.stage, nca.grid, nca.n_states, nca.patch, nca.block_size, nca.eval_iters = 'nca', 4, 2, 2, 17, 1
    S, E = 16, 17  # START, END: after the 2 ** 4 patch tokens
    seq = torch.tensor([[S, 1, 2, 3, 4, E, S, 1, 2, 0, 0, E, S, 1, 5, 0, 7, E]])
    y = seq[:, 1:].clone()
    y[:, :5] = -1
    y[y >= 16] = -1
    monkeypatch.setattr(nca, 'get_batch', lambda split, k: (seq[:, :-1], y))

    class SaysOne(torch.nn.Module):
        def forward(self, x, targets):
            logits = torch.zeros(*x.shape, 18)
            logits[..., 1] = 1.0
            return logits, F.cross_entropy(logits.view(-1, 18), targets.reshape(-1), ignore_index=-1)
    stats = nca.evaluate(SaysOne(), torch.no_grad())
    assert stats['copy_frame_acc'] == 0.5 and stats['next_frame_acc'] == 0.25
    assert len(stats['frame_loss']) == 2  # frames 1 and 2, whole


def test_shuffled_control_keeps_each_sequences_tokens_and_drops_the_order(nca):
    nca.num_rules, nca.num_val_rules, nca.block_size = 64, 16, 151
    x, y = nca.nca_batch(nca.data_config('nca'), 'train', 0, 4)
    nca.nca_shuffle = True
    xs, ys = nca.nca_batch(nca.data_config('nca'), 'train', 0, 4)
    assert torch.equal(xs.sort(1).values, x.sort(1).values)            # the same tokens in every sequence
    special = x >= 10 ** 4
    assert torch.equal(special, xs >= 10 ** 4) and torch.equal(ys == -1, y == -1)  # START/END and the mask stay
    assert (xs != x).float().mean() > 0.5                                # the order is gone
    assert torch.equal(nca.nca_batch(nca.data_config('nca'), 'train', 0, 4)[0], xs)             # and the shuffle repeats with the seed


def test_authors_loss_predicts_start_and_end(nca):
    nca.num_rules, nca.num_val_rules, nca.block_size = 64, 16, 151
    _, y = nca.nca_batch(nca.data_config('nca'), 'train', 0, 2)
    nca.nca_loss = 'all'
    _, y_all = nca.nca_batch(nca.data_config('nca'), 'train', 0, 2)
    assert (y >= 10 ** 4).sum() == 0 and (y_all >= 10 ** 4).sum() == 2 * 2 * 3  # START, END of frames 1-3
    assert (y_all[:, :37] == -1).all()                                    # the first frame stays context


@pytest.mark.parametrize('ratio,band', [(0.29, [0.3, 0.4]), (0.262, [0.3, 0.4]), (0.47, [0.5, 1.0]), (0.61, [0.5, 1.0]),
                                        (0.21, [0.2, 0.3])])
def test_band_auto_follows_the_corpus_gzip_ratio(nca, tmp_path, ratio, band):
    (tmp_path / 'corpus').mkdir()
    meta = dict(tokenizer='bytes', gzip_ratio=dict(median=ratio, tokens='gpt2'))  # measured on the text's GPT-2 ids
    (tmp_path / 'corpus' / 'meta.json').write_text(json.dumps(meta))
    nca.data_dir, nca.dataset, nca.n_states = str(tmp_path), 'corpus', 10
    nca.dataset_meta.cache_clear()
    nca.auto_band()
    assert [nca.gzip_lower, nca.gzip_upper] == band   # code -> the paper's (0.3, 0.4), prose -> its 0.5+
    del meta['gzip_ratio']['tokens']  # a ratio of byte ids is not the filter's convention: refused, saying what to do
    (tmp_path / 'corpus' / 'meta.json').write_text(json.dumps(meta))
    nca.dataset_meta.cache_clear()
    with pytest.raises(SystemExit, match='has no gzip ratio of GPT-2 tokens: prepare it again'):
        nca.auto_band()
