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


@pytest.mark.parametrize('phase', ['grid', 'nca_lr', 'heldout', 'size'])
def test_tune_lists_each_run_once_after_the_run_it_starts_from(nca, tmp_path, phase):
    """tests/tune.sh --list: every run's flags parse, a stage 2 after its stage 1; the later phases need the choice."""
    env = {**os.environ, 'OUT': str(tmp_path)}
    if phase != 'grid':
        p, _ = tune_list(env, phase)
        assert p.returncode == 2 and 'run `bash tests/tune.sh tune` first' in p.stderr
        (tmp_path / 'chosen.env').write_text('SCRATCH_LR=1e-3\nNCA_S1_LR=3e-4\nNCA_S1_ITERS=100\nNCA_LR=2e-3\n')
    p, lines = tune_list(env, phase)
    assert p.returncode == 0, p.stderr
    # heldout and size: NCA also at scratch's lr 1e-3 (ALSO_NCA_LR), a run a seed and size more
    assert len(lines) == {'grid': 42, 'nca_lr': 8, 'heldout': 24, 'size': 56}[phase]
    widths = set()
    for out_dir, start, flags in each_run_configured(nca, lines):
        stage_1 = '/s1-' in out_dir or '-s1-' in out_dir
        assert nca.stage == ('nca' if stage_1 else 'lm'), out_dir
        if nca.stage == 'lm':
            assert nca.min_lr == pytest.approx(nca.learning_rate / 10) and nca.max_iters == 800
            assert nca.batch_size * nca.block_size * nca.max_iters == 8 * 256 * 800  # the same tokens at every size
        if phase in ('heldout', 'size') and nca.stage == 'lm':
            also = 'scratch' in out_dir or '-nca1e-3-' in out_dir
            assert nca.learning_rate == (1e-3 if also else 2e-3), out_dir  # the chosen lrs, and ALSO_NCA_LR's
        widths.add((nca.n_layer, nca.n_embd))
    if phase == 'size':
        assert widths == {(2, 128), (2, 256), (2, 512), (4, 128)}
    if phase in ('heldout', 'size'):
        p, without = tune_list({**env, 'ALSO_NCA_LR': ''}, phase)
        assert len(without) == len(lines) - {'heldout': 4, 'size': 14}[phase]
        assert not any('nca1e-3' in d for d, _, _ in without)


def test_tune_phases_share_their_runs(tmp_path):
    """NCA's stage 2 at 1e-3 is the grid's cell, and the size phase's width 128 the held-out phase's runs: listed by
    two phases, each runs once."""
    env = {**os.environ, 'OUT': str(tmp_path)}
    (tmp_path / 'chosen.env').write_text('SCRATCH_LR=1e-3\nNCA_S1_LR=3e-4\nNCA_S1_ITERS=100\nNCA_LR=1e-3\n')
    runs = {phase: {d: (start, flags) for d, start, flags in tune_list(env, phase)[1]}
            for phase in ('grid', 'nca_lr', 'heldout', 'size')}
    shared = runs['grid'].keys() & runs['nca_lr'].keys()
    assert {os.path.basename(d) for d in shared} == {'s1-nca-lr3e-4-it100-s1', 's1-nca-lr3e-4-it100-s2',
                                                      'nca-lr3e-4-it100-s1', 'nca-lr3e-4-it100-s2'}
    tiny = {d for d in runs['size'] if '/held-tiny-' in d}
    assert len(tiny) == 12 and tiny <= runs['heldout'].keys()
    for d in shared:
        assert runs['grid'][d] == runs['nca_lr'][d]
    for d in tiny:
        assert runs['size'][d] == runs['heldout'][d]


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
