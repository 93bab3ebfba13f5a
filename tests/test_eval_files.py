"""eval.py's files: compare on runs whose checkpoints are gone (run.json), failed writes and bad reads said in one
line with nothing half-written, and tests/reproduce.sh end to end on a tiny setting, its comparison included."""
import builtins
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402


@pytest.fixture
def config(monkeypatch):
    """eval.py's config restored after a test that runs its main()."""
    for k in ev.config_keys + ['vocab']:
        monkeypatch.setattr(ev, k, getattr(ev, k))
    return ev


def write_run(folder, curve, seed, init_from='scratch', stage='lm'):
    """A run folder as nca_gpt.py leaves it once its checkpoint is deleted: log.jsonl and run.json alone."""
    folder.mkdir(parents=True)
    rows = [dict(step=t // 100, tokens=t, val_loss=v) for t, v in curve]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    run = dict(config=dict(seed=seed, init_from=init_from, stage=stage), stage=stage,
               vocab=dict(kind='bytes', size=257), model_args=dict(n_layer=1))
    (folder / 'run.json').write_text(json.dumps(run))


def test_compare_reads_seeds_from_run_json_when_the_checkpoints_are_gone(tmp_path, monkeypatch, capsys):
    # stage 1 of the nca arm: its checkpoint deleted, its signal cached; the shuffled arm's: nothing left
    signal = dict(step=100, frame1_minus_last=0.5, acc_minus_copy=0.25)
    write_run(tmp_path / 's1-nca', [(0, 3.0), (100, 2.0)], seed=1, stage='nca')
    (tmp_path / 's1-nca' / 'signal.json').write_text(json.dumps(signal))
    write_run(tmp_path / 's1-shuffled', [(0, 3.0), (100, 2.5)], seed=1, stage='nca')
    for seed, base, arm in [(1, 2.0, 1.9), (2, 2.2, 2.15)]:
        write_run(tmp_path / f'scratch-s{seed}', [(0, 5.0), (400, base)], seed)
        write_run(tmp_path / f'nca-s{3 - seed}', [(0, 5.0), (400, arm)], seed, str(tmp_path / 's1-nca'))
        write_run(tmp_path / f'shuffled-s{seed}', [(0, 5.0), (400, arm)], seed, str(tmp_path / 's1-shuffled'))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'scratch=scratch-s*,nca=nca-s*,shuffled=shuffled-s*')
    monkeypatch.setattr(ev, 'png', '')
    arms = ev.eval_compare(None)['arms']
    # paired by run.json's seeds, not by the folders' names: nca-s2 holds seed 1
    assert arms['nca']['paired']['mean'] == pytest.approx(((1.9 - 2.0) + (2.15 - 2.2)) / 2)
    assert arms['nca']['stage1'] == dict(frame1_minus_last=0.5, acc_minus_copy=0.25)
    assert arms['shuffled']['stage1'] is None and arms['shuffled']['paired']['n'] == 2
    printed = capsys.readouterr().out
    assert 's1-shuffled holds neither its checkpoint nor a signal.json' in printed
    shuffled_row = next(line for line in printed.splitlines() if line.startswith('shuffled') and 'same sign' in line)
    assert ' - ' in shuffled_row  # its stage-1 column


def test_compare_without_run_json_or_checkpoint_is_one_line(tmp_path, monkeypatch):
    write_run(tmp_path / 'a-s1', [(0, 5.0), (400, 2.0)], 1)
    (tmp_path / 'a-s1' / 'run.json').unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'a=a-s*')
    with pytest.raises(SystemExit, match='a-s1 holds neither run.json nor ckpt.pt') as e:
        ev.eval_compare(None)
    assert '\n' not in str(e.value.code)


def test_a_log_cut_short_is_named_with_its_line(tmp_path, monkeypatch):
    write_run(tmp_path / 'a-s1', [(0, 5.0), (400, 2.0)], 1)
    with open(tmp_path / 'a-s1' / 'log.jsonl', 'a') as f:
        f.write('{"step": 5, "val_lo')  # a run killed mid-line
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'a=a-s*')
    with pytest.raises(SystemExit, match=r'a-s1/log.jsonl, line 3, is not JSON'):
        ev.eval_compare(None)


def compare_runs(tmp_path):
    """Two runs that compare (with a checkpoint too, as older runs have it) -> eval.py compare's options."""
    for name, final in (('a-s1', 2.0), ('b-s1', 1.9)):
        write_run(tmp_path / name, [(0, 5.0), (400, final)], 1)
        torch.save(dict(config=dict(seed=1, init_from='scratch')), tmp_path / name / 'ckpt.pt')
    return [f'--runs=a={tmp_path}/a-s*,b={tmp_path}/b-s*', f'--out={tmp_path}/out/eval-compare.json']


def no_file_left(folder):
    return not os.path.exists(folder) or os.listdir(folder) == []


def test_a_disk_full_on_the_json_is_one_line_and_leaves_nothing(tmp_path, config, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(json, 'dump', full)
    with pytest.raises(SystemExit) as e:
        ev.main(['compare', *compare_runs(tmp_path)])
    message = str(e.value.code)
    assert message.startswith(f'eval.py: cannot write {tmp_path}/out/eval-compare.json: No space left on device')
    assert '\n' not in message and no_file_left(tmp_path / 'out')


class FailsAtClose:
    """A file on a disk that fills up: the first bytes land, the rest is lost, and closing says so."""
    def __new__(cls, path, mode='r', *args, **kwargs):
        if 'w' not in mode:  # reading the logs goes as usual
            return builtins.open(path, mode, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, path, mode='r', *args, **kwargs):
        self.file = builtins.open(path, mode, *args, **kwargs)
        self.written = 0

    def write(self, text):
        if self.written < 10:
            self.file.write(text[:10])
        self.written += len(text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def close(self):
        self.file.close()
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_a_write_that_fails_as_the_file_closes_leaves_no_half_written_file(tmp_path, config, monkeypatch):
    monkeypatch.setattr(ev, 'open', FailsAtClose, raising=False)  # eval.py's open, no one else's
    with pytest.raises(SystemExit, match='eval-compare.json: File too large') as e:
        ev.main(['compare', *compare_runs(tmp_path)])
    assert '\n' not in str(e.value.code) and no_file_left(tmp_path / 'out')


def test_a_png_without_permission_is_one_line(tmp_path, monkeypatch):
    def refused(path, mode='r', *args, **kwargs):
        if 'w' in mode:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(ev, 'open', refused, raising=False)
    with pytest.raises(SystemExit, match=r'cannot write .*watch.png: Permission denied'):
        ev.write_png(str(tmp_path / 'watch.png'), np.zeros((2, 2, 3), dtype=np.uint8))
    assert os.listdir(tmp_path) == []


def test_reproduce_sh_ends_with_its_comparison(tmp_path):
    """The whole script on one seed, two arms and runs of 4 steps: every run, then eval.py compare's table and
    JSON (the step that `arms=$( [ -n "$TAG" ] && ... )` killed under set -e when SWEEP was unset)."""
    tiny = ('--max_iters=4 --eval_interval=2 --eval_iters=1 --num_rules=32 --num_val_rules=8 --warmup_iters=2 '
            '--lr_decay_iters=4')
    env = dict(os.environ, SEEDS='1', RECIPES='A', ARMS_ONLY='scratch nca', OUT=str(tmp_path / 'out'),
               DATA_DIR=str(tmp_path / 'data'), PY=sys.executable, EXTRA=tiny, OMP_NUM_THREADS='1')
    env.pop('SWEEP', None)
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'reproduce.sh')], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads((tmp_path / 'out' / 'compare-A.json').read_text())
    assert set(result['arms']) == {'scratch', 'nca'} and result['arms']['nca']['stage1'] is not None
    assert 'speed-up' in p.stdout and os.path.exists(tmp_path / 'data' / 'pystdlib' / 'meta.json')


def test_a_machine_that_cannot_start_a_program_is_one_line_not_a_traceback(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ev, '_modes', {'guards': (None, None, None)})  # decided already: no trial run
    monkeypatch.setattr(ev, 'sandbox', 'guards')
    monkeypatch.setattr(ev.tempfile, 'mkdtemp', full)  # /tmp is full
    with pytest.raises(SystemExit, match='cannot run a program in the sandbox: .*No space left on device') as e:
        ev.run_programs(['assert True\n'])
    assert '\n' not in str(e.value.code)
