"""The scripts run by hand, checked where that needs neither JAX nor a long run: tests/bench_vs_authors.sh's
arguments (and its shell and embedded Python parse), tests/bench_eval.py --canonical. Offline, seconds."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, 'tests', 'bench_vs_authors.sh')


def bench(*args, env=None):
    return subprocess.run(['bash', BENCH, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'PYTHON': sys.executable, **(env or {})})


def test_bench_vs_authors_parses_and_says_how_to_use_it():
    assert subprocess.run(['bash', '-n', BENCH]).returncode == 0
    p = bench('--help')
    assert p.returncode == 0 and 'bash tests/bench_vs_authors.sh PATH_TO_AUTHORS_CLONE' in p.stdout
    # the Python it writes and runs (the authors' worker, the project's, the driver) at least compiles
    script = open(BENCH).read()
    blocks = re.findall(r"cat > \"\$work/(\w+\.py)\" <<'PY'\n(.*?)\nPY\n", script, re.S)
    assert [name for name, _ in blocks] == ['authors.py', 'project.py', 'drive.py']
    for name, code in blocks:
        compile(code, name, 'exec')


@pytest.mark.parametrize('args,message', [
    ([], "give the path of a clone of the authors' repository"),
    (['{tmp}'], 'utils/nca.py missing: not a clone of danihyunlee/nca-pre-pretraining'),
    (['{tmp}', '--rounds=two'], None),
    (['--fast', '{tmp}'], 'unknown option --fast'),
])
def test_bench_vs_authors_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if message is None:  # a clone's files there: only the count is wrong
        (tmp_path / 'utils').mkdir()
        (tmp_path / 'utils' / 'nca.py').write_text('')
        (tmp_path / 'utils' / 'tokenizers.py').write_text('')
        message = '--rounds and --rules are counts'
    p = bench(*args, env={'NCA_AUTHORS_VENV': str(tmp_path / 'no-venv')})
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / 'no-venv').exists()  # refused before making the venv


def test_bench_eval_writes_the_canonical_solutions(tmp_path):
    problems = [dict(task_id=f'HumanEval/{i}', prompt=f'def f{i}(a):\n', canonical_solution=f'    return a + {i}\n',
                     test='def check(f):\n    pass\n', entry_point=f'f{i}') for i in range(3)]
    (tmp_path / 'humaneval').mkdir()
    (tmp_path / 'humaneval' / 'test.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in problems))
    out = tmp_path / 'canonical.jsonl'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'bench_eval.py'), f'--canonical={out}',
                        f'--data_dir={tmp_path}'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [dict(task_id=r['task_id'], completion=r['canonical_solution']) for r in problems]


def each_run_configured(nca, lines):
    """A run list's lines (out_dir, the run it starts from or -, flags), each listed once and after the run it starts
    from; yields each with nca configured from the defaults and its flags (a typo fails here, not an hour in)."""
    dirs = [d for d, _, _ in lines]
    assert len(set(dirs)) == len(dirs)
    defaults = {k: getattr(nca, k) for k in nca.config_keys}
    for i, (out_dir, start, flags) in enumerate(lines):
        assert start == '-' or start in dirs[:i], f'{out_dir} starts from {start}, not listed before it'
        for k, v in defaults.items():
            setattr(nca, k, v)
        nca.configure(flags.split() + [f'--out_dir={out_dir}'])
        yield out_dir, start, flags


def test_study_lists_each_run_once_after_the_run_it_starts_from(nca):
    """tests/study.sh --list: a stage-2 run waits for its stage 1, so with JOBS slots a stage 2 listed before its stage
    1 could wait forever; every run's flags parse (a typo would fail only after an hour of the study)."""
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'study.sh'), '--list'], capture_output=True, text=True,
                       timeout=60, env={**os.environ, 'OUT': 'o'})
    assert p.returncode == 0, p.stderr
    lines = [line.split('|') for line in p.stdout.splitlines()]
    assert len(lines) > 100
    for out_dir, start, flags in each_run_configured(nca, lines):
        stage_1 = start == '-' and 'scratch' not in out_dir
        assert nca.stage == ('lm' if not stage_1 else 'dyck' if 's1d-' in out_dir else 'nca'), out_dir


def tune_list(env, phase):
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'tune.sh'), '--list', phase], capture_output=True,
                       text=True, timeout=60, env=env)
    return p, [line.split('|') for line in p.stdout.splitlines()]


LRS = {'tiny': ('1e-3', '2e-3'), 'd4': ('1e-3', '1e-3'), 'w256': ('5e-4', '1e-3'), 'w512': ('5e-4', '5e-4')}


def tune_env(tmp_path, chosen=True, lrs=()):
    """OUT in tmp_path, with stage 1's cell chosen and the stage-2 lrs of the shapes `lrs` (SCRATCH_LR, NCA_LR)."""
    if chosen:
        (tmp_path / 'chosen.env').write_text('NCA_S1_LR=3e-4\nNCA_S1_ITERS=100\n')
    for shape in lrs:
        scratch, nca_lr = LRS[shape]
        (tmp_path / f'lrs-{shape}.env').write_text(f'SCRATCH_LR={scratch}\nNCA_LR={nca_lr}\n')
    return {**os.environ, 'OUT': str(tmp_path)}


@pytest.mark.parametrize('phase', ['grid', 'lrs', 'heldout', 'untuned'])
def test_tune_lists_each_run_once_after_the_run_it_starts_from(nca, tmp_path, phase):
    """tests/tune.sh --list: every run's flags parse, a stage 2 after its stage 1, the same stage-2 tokens at every
    size; each phase needs the choices before it, and uses them."""
    first = 'run `bash tests/tune.sh {}` first'.format
    needs = {'grid': None, 'lrs': first('grid'), 'heldout': first('lrs'), 'untuned': first('lrs')}[phase]
    if needs:
        p, _ = tune_list(tune_env(tmp_path, chosen=phase != 'lrs'), phase)
        assert p.returncode == 2 and needs in p.stderr, p.stderr
    p, lines = tune_list(tune_env(tmp_path, lrs=LRS), phase)
    assert p.returncode == 0, p.stderr
    # grid: 18 stage 1s, 3 scratch lrs and 9 cells at 2 seeds; lrs: at 4 shapes, 2 arms x 3 lrs x 2 seeds and 2
    # stage 1s; heldout: 14 seeds over the shapes, scratch, NCA and shuffled, 2 stage 1s each; untuned: no control
    assert len(lines) == {'grid': 42, 'lrs': 4 * (12 + 2), 'heldout': 14 * 5, 'untuned': 14 * 3}[phase]
    widths = set()
    for out_dir, start, flags in each_run_configured(nca, lines):
        shape = os.path.basename(out_dir).split('-')[1]
        stage_1 = '/s1-' in out_dir or '/grid-s1-' in out_dir
        assert nca.stage == ('nca' if stage_1 else 'lm'), out_dir
        if stage_1:
            assert nca.nca_shuffle == ('-shuffled-' in out_dir), out_dir
        else:  # the shuffled arm starts from the shuffled stage 1, NCA from NCA's, scratch from nothing
            assert ('-shuffled-' in start, '-nca-' in start, start == '-') == (
                '-shuffled-' in out_dir, '-nca-' in out_dir, '-scratch-' in out_dir), out_dir
        if nca.stage == 'lm':
            assert nca.min_lr == pytest.approx(nca.learning_rate / 10) and nca.max_iters == 800
            assert nca.batch_size * nca.block_size * nca.max_iters == 8 * 256 * 800  # the same tokens at every size
            named = re.search(r'-lr([0-9.e-]+)-s\d+$', out_dir)
            if named and '/s2-' in out_dir:  # a stage 2's folder names its lr
                assert float(named.group(1)) == nca.learning_rate, out_dir
        if nca.stage == 'lm' and phase in ('heldout', 'untuned'):
            scratch, nca_lr = LRS[shape if phase == 'heldout' else 'tiny']  # untuned: width 128's choice
            assert nca.learning_rate == float(scratch if '-scratch-' in out_dir else nca_lr), out_dir
            assert nca.seed >= 3
        if nca.stage == 'nca' and phase != 'grid':
            assert (nca.learning_rate, nca.max_iters) == (3e-4, 100)  # the chosen cell, at every size
        widths.add((nca.n_layer, nca.n_embd))
    assert widths == ({(2, 128)} if phase == 'grid' else {(2, 128), (2, 256), (2, 512), (4, 128)})


def test_tune_phases_share_their_runs(tmp_path):
    """The grid's scratch runs are width 128's tuning runs; where a size's tuned lrs are width 128's, the untuned
    arms are the tuned ones: listed by two phases, each runs once."""
    env = tune_env(tmp_path, lrs=LRS)
    runs = {phase: {d: (start, flags) for d, start, flags in tune_list(env, phase)[1]}
            for phase in ('grid', 'lrs', 'heldout', 'untuned')}
    scratch = {d for d in runs['grid'] if '-scratch-' in d}
    assert len(scratch) == 6 and scratch <= runs['lrs'].keys()
    shared = runs['heldout'].keys() & runs['untuned'].keys()
    names = {os.path.basename(d) for d in shared}
    # tiny: all of its runs; d4: scratch (1e-3 both) and the stage 1s; w256: the stage 1s; w512: none but them
    assert {n for n in names if n.startswith('s2-')} == (
        {f's2-tiny-{a}-lr{lr}-s{s}' for a, lr in (('scratch', '1e-3'), ('nca', '2e-3')) for s in (3, 4, 5, 6)}
        | {f's2-d4-scratch-lr1e-3-s{s}' for s in (3, 4, 5, 6)})
    for d in shared:
        assert runs['heldout'][d] == runs['untuned'][d]
    for d in scratch:
        assert runs['grid'][d] == runs['lrs'][d]


def fake_run(folder, lr, seed, final, width=128):
    """A finished stage-2 run, as tune.sh reads it: done, its log and its run.json."""
    folder.mkdir(parents=True)
    rows = [dict(step=0, tokens=0, val_loss=5.5), dict(step=800, tokens=800 * 2048, val_loss=final)]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = dict(seed=seed, learning_rate=float(lr), n_layer=2, n_head=4, n_embd=width, block_size=256,
                  init_from='scratch')
    (folder / 'run.json').write_text(json.dumps(dict(config=config, stage='lm')))
    (folder / 'done').write_text('')


def test_tune_widens_an_arms_grid_while_its_best_sits_at_an_edge(tmp_path):
    """tune.sh lrs: scratch's best at the grid's top edge gets a lr twice as hot, NCA's at the bottom one half as
    hot, again while the best stays at the edge (at most WIDEN=2 times, then the edge is chosen, saying so); the
    runs it adds are listed by the phase, and the choice is each arm's lowest mean over seeds 1-2."""
    finals = {'scratch': {'5e-4': 1.70, '1e-3': 1.60, '2e-3': 1.55, '4e-3': 1.58},
              'nca': {'5e-4': 1.50, '1e-3': 1.52, '2e-3': 1.56, '2.5e-4': 1.45, '1.25e-4': 1.44}}
    for arm, by_lr in finals.items():
        for lr, final in by_lr.items():
            for seed, offset in ((1, 0.01), (2, -0.01)):
                fake_run(tmp_path / f's2-tiny-{arm}-lr{lr}-s{seed}', lr, seed, final + offset)
    for seed in (1, 2):
        (tmp_path / f's1-tiny-nca-lr3e-4-it100-s{seed}').mkdir()
        (tmp_path / f's1-tiny-nca-lr3e-4-it100-s{seed}' / 'done').write_text('')
    env = {**tune_env(tmp_path), 'SIZES': 'tiny:3'}
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'tune.sh'), 'lrs'], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'lrs-tiny.grid').read_text().splitlines() == ['scratch 4e-3', 'nca 2.5e-4', 'nca 1.25e-4']
    assert (tmp_path / 'lrs-tiny.env').read_text() == 'SCRATCH_LR=2e-3\nNCA_LR=1.25e-4\n'
    assert 'nca: chosen lr 1.25e-4 (at an edge: the widenings are spent)' in p.stdout
    assert 'scratch: the best, 2e-3, sits at the grid\'s edge: widened to 4e-3' in p.stdout
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'tune.sh'), '--table'], capture_output=True, text=True,
                       timeout=60, env=env)
    assert 'chosen: SCRATCH_LR=2e-3, NCA_LR=1.25e-4' in p.stdout
    assert '  scratch  lr 4e-3    1.5900 / 1.5700   mean 1.5800' in p.stdout.splitlines()
    listed = {os.path.basename(d) for d, _, _ in tune_list(env, 'lrs')[1]}
    assert {'s2-tiny-scratch-lr4e-3-s1', 's2-tiny-nca-lr1.25e-4-s2'} <= listed and len(listed) == 2 * 9 + 2


def test_a_run_listed_twice_at_once_runs_once(tmp_path):
    """tests/run_one.sh: two harnesses given the same run at the same time (a phase, and a hand-picked list) run it
    once; the lock dies with its holder, so a run killed before it finished runs again."""
    fake = tmp_path / 'fake.sh'  # stands for python: counts its runs, takes a second
    fake.write_text(f'echo run >> {tmp_path}/count; sleep 1\n')
    out_dir = tmp_path / 'a-run'
    line = f'{out_dir}|-|--stage=lm'
    env = {**os.environ, 'PY': f'bash {fake}'}
    cmd = ['bash', '-c', f'. tests/run_one.sh; one "{line}"']
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert first.wait(timeout=30) == 0 and second.returncode == 0
    assert f'running elsewhere: {out_dir}' in second.stdout
    assert (tmp_path / 'count').read_text() == 'run\n' and (out_dir / 'done').exists()
    # a holder killed mid-run: not done, and its lock released
    (out_dir / 'done').unlink()
    killed = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    time.sleep(0.3)
    os.killpg(killed.pid, 9)
    killed.wait()
    assert not (out_dir / 'done').exists()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=30)
    assert (tmp_path / 'count').read_text() == 'run\n' * 3 and (out_dir / 'done').exists()


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path):
    """tests/run_one.sh: a run stopped part-way (its ckpt.pt there, no done) continues with --init_from=resume, its
    settings its checkpoint's (issue 33: bit for bit as if it had never stopped); one never started runs its flags,
    after the stage 1 it starts from; a failed one says so and leaves no done."""
    fake = tmp_path / 'fake.sh'  # stands for python: records its arguments, fails when told to
    fake.write_text(f'echo "$@" >> {tmp_path}/args; [ ! -f {tmp_path}/fail ]\n')
    env = {**os.environ, 'PY': f'bash {fake}'}
    (tmp_path / 's1').mkdir()
    (tmp_path / 's1' / 'done').write_text('')

    def one(name, flags='--stage=lm --learning_rate=1e-3'):
        line = f'{tmp_path / name}|{tmp_path / "s1"}|{flags}'
        p = subprocess.run(['bash', '-c', f'. tests/run_one.sh; one "{line}"'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout, (tmp_path / 'args').read_text().splitlines()[-1]
    out, args = one('fresh')
    start, fresh = tmp_path / 's1', tmp_path / 'fresh'
    assert args == f'nca_gpt.py --stage=lm --learning_rate=1e-3 --init_from={start} --out_dir={fresh}'
    assert f'done {tmp_path / "fresh"}' in out and (tmp_path / 'fresh' / 'done').exists()
    (tmp_path / 'stopped').mkdir()
    (tmp_path / 'stopped' / 'ckpt.pt').write_text('')
    out, args = one('stopped')
    assert args == f'nca_gpt.py --init_from=resume --out_dir={tmp_path / "stopped"}'
    (tmp_path / 'fail').write_text('')
    out, _ = one('broken')
    assert 'FAILED' in out and (tmp_path / 'broken' / 'failed').exists()
    assert not (tmp_path / 'broken' / 'done').exists()


def test_tune_sizes_goes_size_by_size_to_the_trend(tmp_path):
    """tune.sh sizes, on finished runs (faked): each size's lrs chosen, its held-out tables, then width 128's lrs
    at every size and the trend, tuned beside untuned, from the runs' logs."""
    # width 128 prefers scratch 1e-3 and NCA 2e-3, width 256 scratch 5e-4 and NCA 1e-3 (each inside its grid)
    best = {('tiny', 'scratch'): '1e-3', ('tiny', 'nca'): '2e-3', ('w256', 'scratch'): '5e-4', ('w256', 'nca'): '1e-3'}
    gap = {'tiny': -0.01, 'w256': 0.02}  # NCA minus scratch at the tuned lrs; at width 128's lrs width 256 is +0.10
    for shape, width in (('tiny', 128), ('w256', 256)):
        for arm in ('scratch', 'nca', 'shuffled'):
            for lr in ('2.5e-4', '5e-4', '1e-3', '2e-3', '4e-3'):
                for seed in (1, 2, 3):
                    tuned = lr == best[shape, 'nca' if arm == 'shuffled' else arm]
                    final = 1.5 + (0 if tuned else 0.05) + (gap[shape] if arm != 'scratch' else 0)
                    if shape == 'w256' and arm == 'nca' and lr == '2e-3':
                        final = 1.5 + 0.10  # width 128's NCA lr, carried over
                    fake_run(tmp_path / f's2-{shape}-{arm}-lr{lr}-s{seed}', lr, seed, final, width)
        for arm in ('nca', 'shuffled'):
            for seed in (1, 2, 3):
                folder = tmp_path / f's1-{shape}-{arm}-lr3e-4-it100-s{seed}'
                folder.mkdir(exist_ok=True)
                (folder / 'done').write_text('')
    env = {**tune_env(tmp_path), 'SIZES': 'tiny:3,w256:3', 'LRS_w256': '5e-4 1e-3 2e-3'}
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'tune.sh'), 'sizes'], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'lrs-tiny.env').read_text() == 'SCRATCH_LR=1e-3\nNCA_LR=2e-3\n'
    assert (tmp_path / 'lrs-w256.env').read_text() == 'SCRATCH_LR=5e-4\nNCA_LR=1e-3\n'
    assert os.readlink(tmp_path / 'heldout' / 'w256-nca-s3') == '../s2-w256-nca-lr1e-3-s3'
    assert os.readlink(tmp_path / 'untuned' / 'w256-nca-s3') == '../s2-w256-nca-lr2e-3-s3'
    trend = json.loads((tmp_path / 'trend-untuned.json').read_text())
    scores = trend['scores']
    assert scores['tuned: 2x256 nca - scratch'] == pytest.approx(0.02)
    assert scores['untuned: 2x256 nca - scratch'] == pytest.approx(0.10 - 0.05)  # scratch at 1e-3 is 0.05 off too
    assert scores['untuned: 2x128 nca - scratch'] == scores['tuned: 2x128 nca - scratch'] == pytest.approx(-0.01)
