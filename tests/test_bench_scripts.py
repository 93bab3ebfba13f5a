"""The scripts run by hand, checked where that needs neither JAX nor a long run: tests/bench_vs_authors.sh's
arguments (and its shell and embedded Python parse), tests/bench_eval.py --canonical. Offline, seconds."""
import json
import os
import re
import subprocess
import sys

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


@pytest.mark.parametrize('phase', ['tune', 'heldout'])
def test_tune_lists_each_run_once_after_the_run_it_starts_from(nca, tmp_path, phase):
    """tests/tune.sh --list: every run's flags parse, a stage 2 after its stage 1; the held-out phase needs the choice."""
    env = {**os.environ, 'OUT': str(tmp_path)}
    script = os.path.join(ROOT, 'tests', 'tune.sh')
    if phase == 'heldout':
        p = subprocess.run(['bash', script, '--list', 'heldout'], capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 2 and 'run `bash tests/tune.sh tune` first' in p.stderr
        (tmp_path / 'chosen.env').write_text('SCRATCH_LR=1e-3\nNCA_S1_LR=3e-4\nNCA_S1_ITERS=100\nNCA_LR=1e-3\n')
    p = subprocess.run(['bash', script, '--list', phase], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    lines = [line.split('|') for line in p.stdout.splitlines()]
    assert len(lines) == {'tune': 30, 'heldout': 20}[phase]
    for out_dir, start, flags in each_run_configured(nca, lines):
        assert nca.stage == ('nca' if '/s1-' in out_dir or '/held-s1-' in out_dir else 'lm'), out_dir
        if nca.stage == 'lm':
            assert nca.min_lr == pytest.approx(nca.learning_rate / 10) and nca.max_iters == 800
