"""eval.py grid and trend: one arm's gap to a baseline over its stage 1's settings, and over model sizes, paired
by seed, with a line in log10 of the non-embedding parameters. On hand-made run folders (log.jsonl, run.json)."""
import json
import math
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402

SHAPES = {'tiny': (2, 4, 128), 'w256': (2, 4, 256), 'w512': (2, 8, 512)}


def write_run(folder, shape, seed, final, induction):
    """A stage-2 run: validation losses at steps 0, 100 and 800 (tokens 2,048 a step), the probe at each."""
    folder.mkdir(parents=True)
    n_layer, n_head, n_embd = SHAPES[shape]
    rows = [dict(step=s, tokens=2048 * s, val_loss=v, icl=0.0, induction=i)
            for s, v, i in ((0, 5.5, 0.0), (100, 3.0, induction[0]), (800, final, induction[1]))]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = dict(seed=seed, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=256, init_from='scratch')
    (folder / 'run.json').write_text(json.dumps(dict(config=config, stage='lm')))


@pytest.fixture
def trend(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'png', '')
    monkeypatch.setattr(ev, 'arms', 'scratch,nca')

    def run(patterns):
        monkeypatch.setattr(ev, 'runs', ','.join(patterns))
        return ev.eval_trend(None)
    return run


def test_each_size_is_paired_by_seed_and_its_size_counted_without_embedding(trend, tmp_path):
    gaps = {'tiny': [0.03, 0.01], 'w256': [0.00, -0.02], 'w512': [-0.02, -0.04]}
    for shape, diffs in gaps.items():
        for seed, d in zip((3, 4), diffs):
            write_run(tmp_path / f'{shape}-scratch-s{seed}', shape, seed, 1.6, (-0.05, -0.10))
            write_run(tmp_path / f'{shape}-nca-s{seed}', shape, seed, 1.6 + d, (-0.09, -0.12))
    result = trend([f'{shape}-ARM-s*' for shape in gaps])
    sizes = result['sizes']
    assert [(p['n_layer'], p['n_embd']) for p in sizes] == [(2, 128), (2, 256), (2, 512)]
    for p, (shape, diffs) in zip(sizes, gaps.items()):
        L, _, C = SHAPES[shape]
        # per block: q, k, v, out (4 C^2), SwiGLU's gate, up and down at 4 C (12 C^2), two norms; the final norm
        assert p['params'] == L * (16 * C * C + 2 * C) + C
        assert p['diffs'] == pytest.approx(diffs)
        assert p['paired']['mean'] == pytest.approx(np.mean(diffs)) and p['paired']['n'] == 2
        assert p['induction_step'] == 100
        assert p['induction_early_lead']['mean'] == pytest.approx(-0.04)
        assert p['induction_end_lead']['mean'] == pytest.approx(-0.02)
    # the line, by the textbook formulas, not the code's
    x = np.array([math.log10(p['params']) for p in sizes for _ in p['diffs']])
    y = np.array([d for p in sizes for d in p['diffs']])
    X = np.stack([np.ones_like(x), x], 1)
    coef, residual, *_ = np.linalg.lstsq(X, y, rcond=None)
    sigma2 = residual[0] / (len(y) - 2)
    se = math.sqrt(sigma2 * np.linalg.inv(X.T @ X)[1, 1])
    fit = result['fit']
    assert fit['slope_per_decade'] == pytest.approx(coef[1]) and coef[1] < 0
    assert fit['slope_ci95'] == pytest.approx(2.776 * se, rel=1e-3)  # t(4)
    assert fit['zero_at_params'] == pytest.approx(10 ** (-coef[0] / coef[1]))
    assert sizes[0]['params'] < fit['zero_at_params'] < sizes[-1]['params']


def test_a_seed_without_its_pair_is_left_out_and_one_size_draws_no_line(trend, tmp_path, capsys):
    for seed in (3, 4):
        write_run(tmp_path / f'tiny-scratch-s{seed}', 'tiny', seed, 1.6, (-0.05, -0.1))
    write_run(tmp_path / 'tiny-nca-s3', 'tiny', 3, 1.65, (-0.05, -0.1))
    result = trend(['tiny-ARM-s*'])
    assert result['sizes'][0]['seeds'] == [3] and result['fit'] is None
    assert 'no line: it needs two sizes' in capsys.readouterr().out


def test_named_series_each_get_their_line(trend, tmp_path):
    """--runs='tuned=...;untuned=...': two series over the same sizes, each paired and fitted on its own (tune.sh's
    tuned gap beside the untuned one)."""
    gaps = {'tuned': {'tiny': [0.01, 0.03], 'w256': [0.00, 0.02]}, 'untuned': {'tiny': [0.01, 0.03],
                                                                                'w256': [0.10, 0.12]}}
    for name, by_shape in gaps.items():
        for shape, diffs in by_shape.items():
            for seed, d in zip((3, 4), diffs):
                write_run(tmp_path / name / f'{shape}-scratch-s{seed}', shape, seed, 1.6, (-0.05, -0.1))
                write_run(tmp_path / name / f'{shape}-nca-s{seed}', shape, seed, 1.6 + d, (-0.05, -0.1))
    result = trend(['tuned=tuned/tiny-ARM-s*', 'tuned/w256-ARM-s*;untuned=untuned/tiny-ARM-s*',
                    'untuned/w256-ARM-s*'])
    assert list(result['series']) == ['tuned', 'untuned']
    for name, by_shape in gaps.items():
        points = result['series'][name]['sizes']
        assert [p['paired']['mean'] for p in points] == pytest.approx([np.mean(d) for d in by_shape.values()])
        # two sizes, gaps d apart at a factor 4 in parameters: the slope a decade
        rise = np.mean(by_shape['w256']) - np.mean(by_shape['tiny'])
        decades = math.log10(points[1]['params'] / points[0]['params'])
        assert result['series'][name]['fit']['slope_per_decade'] == pytest.approx(rise / decades)
    assert result['scores']['untuned: slope a decade'] > result['scores']['tuned: slope a decade']
    # the line's 95% band, by the textbook formula: t s sqrt(1/n + (x - mean)^2 / Sxx), narrowest at the mean
    fit = result['series']['untuned']['fit']
    x = np.array([math.log10(p['params']) for p in result['series']['untuned']['sizes'] for _ in range(2)])
    y = np.array([d for d in (0.01, 0.03, 0.10, 0.12)])
    s = math.sqrt(((y - np.polyval(np.polyfit(x, y, 1), x)) ** 2).sum() / 2)
    mid, half = ev.line_band(fit, np.array([x.mean(), x[-1]]))
    assert mid[0] == pytest.approx(y.mean()) and half[0] == pytest.approx(4.303 * s / 2, rel=1e-3)  # t(2), n = 4
    sxx = ((x - x.mean()) ** 2).sum()
    assert half[1] == pytest.approx(4.303 * s * math.sqrt(1 / 4 + (x[-1] - x.mean()) ** 2 / sxx), rel=1e-3)


def test_the_trend_png_draws_each_series(trend, tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    for name, d in (('a', 0.02), ('b', 0.05)):
        for shape, scale in (('tiny', 1), ('w256', 2)):
            for seed, jitter in ((3, 0.01), (4, -0.01)):
                write_run(tmp_path / name / f'{shape}-scratch-s{seed}', shape, seed, 1.6, (-0.05, -0.1))
                write_run(tmp_path / name / f'{shape}-nca-s{seed}', shape, seed, 1.6 + d * scale + jitter,
                          (-0.05, -0.1))
    monkeypatch.setattr(ev, 'png', str(tmp_path / 'trend.png'))
    trend(['a=a/tiny-ARM-s*', 'a/w256-ARM-s*;b=b/tiny-ARM-s*', 'b/w256-ARM-s*'])
    assert (tmp_path / 'trend.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('case,message', [
    ('no ARM', "a glob a size with ARM where the arm's name goes"),
    ('no runs', "names no run folder"),
    ('two shapes', 'its runs have different shapes'),
    ('unfinished', 'its runs end at different tokens'),
])
def test_bad_runs_are_one_line(trend, tmp_path, case, message):
    write_run(tmp_path / 'tiny-scratch-s3', 'tiny', 3, 1.6, (-0.05, -0.1))
    write_run(tmp_path / 'tiny-nca-s3', 'w256' if case == 'two shapes' else 'tiny', 3, 1.6, (-0.05, -0.1))
    if case == 'unfinished':
        with open(tmp_path / 'tiny-nca-s3' / 'log.jsonl', 'a') as f:
            f.write(json.dumps(dict(step=900, tokens=2048 * 900, val_loss=1.5)) + '\n')
    patterns = {'no ARM': ['tiny-*-s*'], 'no runs': ['w512-ARM-s*']}.get(case, ['tiny-ARM-s*'])
    with pytest.raises(SystemExit, match=message) as e:
        trend(patterns)
    assert '\n' not in str(e.value.code)


def write_stage1(folder, lr, iters, acc_minus_copy):
    """A stage-1 run whose checkpoint is gone: its run.json, and its signal cached as eval.py leaves it."""
    folder.mkdir(parents=True)
    config = dict(seed=1, learning_rate=lr, max_iters=iters, stage='nca', init_from='scratch')
    (folder / 'run.json').write_text(json.dumps(dict(config=config, stage='nca')))
    (folder / 'signal.json').write_text(json.dumps(dict(step=iters, frame1_minus_last=0.2,
                                                        acc_minus_copy=acc_minus_copy)))


def write_stage2(folder, seed, final, init_from='scratch'):
    folder.mkdir(parents=True)
    rows = [dict(step=s, tokens=2048 * s, val_loss=v) for s, v in ((0, 5.5), (800, final))]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = dict(seed=seed, init_from=str(init_from), stage='lm')
    (folder / 'run.json').write_text(json.dumps(dict(config=config, stage='lm')))


def test_grid_lays_the_arm_out_by_its_stage_1(monkeypatch, tmp_path):
    """eval.py grid: the arm's runs, each found in the cell of the stage 1 it started from (its lr and length, read
    from that run, not from folder names), paired by seed with the baseline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'png', '')
    monkeypatch.setattr(ev, 'baseline', '')
    gaps = {(3e-4, 100): [0.01, 0.03], (3e-4, 300): [0.02, 0.02], (3e-3, 100): [0.25, 0.29]}
    for seed, base in ((1, 1.59), (2, 1.56)):
        write_stage2(tmp_path / f'scratch-s{seed}', seed, base)
        for k, ((lr, iters), diffs) in enumerate(gaps.items()):
            s1 = tmp_path / f's1-cell{k}-s{seed}'  # names that say nothing of the cell
            write_stage1(s1, lr, iters, 0.1 * (k + 1))
            write_stage2(tmp_path / f'nca-cell{k}-s{seed}', seed, base + diffs[seed - 1], s1)
    monkeypatch.setattr(ev, 'runs', 'scratch=scratch-s*,nca=nca-cell*')
    cells = ev.eval_grid(None)['cells']
    assert [(c['stage1_lr'], c['stage1_iters']) for c in cells] == sorted(gaps)
    for c in cells:
        diffs = gaps[(c['stage1_lr'], c['stage1_iters'])]
        assert c['paired']['mean'] == pytest.approx(np.mean(diffs)) and c['paired']['n'] == 2
    assert cells[-1]['stage1']['acc_minus_copy'] == pytest.approx(0.3)  # the (3e-3, 100) cell, k = 2
    # a glob that takes in two runs of one seed in one cell (another stage-2 lr, say) is refused
    write_stage2(tmp_path / 'nca-cell0-other-lr-s1', 1, 1.7, tmp_path / 's1-cell0-s1')
    with pytest.raises(SystemExit, match='two nca runs of seed 1 start from a stage 1 at lr 0.0003 for 100'):
        ev.eval_grid(None)
    # an arm that started from nothing has no cell
    monkeypatch.setattr(ev, 'runs', 'scratch=scratch-s*,other=scratch-s1')
    with pytest.raises(SystemExit, match='did not start from a stage-1 run folder'):
        ev.eval_grid(None)
