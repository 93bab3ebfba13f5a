"""--init_from=resume goes on with the run's own settings: the data's, the model's, the band, the recipe's and the
schedule's come from the checkpoint, whatever the command line leaves out; a flag that contradicts the checkpoint
is refused in one line; a transfer's frozen parts stay frozen; run.json keeps the run's first settings and records
each resume; a checkpoint of other code and a load out of memory are one line each. CPU, offline, about four
minutes on 2 cores."""
import json
import os
import shutil

import pytest
import torch

from test_method import FAST, load, message, run
from test_train import train_losses

import eval as ev

# test_method's tiny NCA run, smaller still; the schedule given, so that a run of 2 updates resumed to 4 has the
# schedule of a run of 4
SHORT = [*FAST, '--batch_size=2', '--eval_iters=1', '--eval_interval=2', '--warmup_iters=2', '--lr_decay_iters=4']


def without(args, keys):
    """args less the --key=value of keys: the flags a resume leaves out."""
    return [a for a in args if a[2:].split('=')[0] not in keys]


@pytest.fixture(scope='module')
def first(tmp_path_factory):
    """A run at its first checkpoint, step 2 (seed 7, every other setting SHORT's); tests resume copies of it."""
    out = tmp_path_factory.mktemp('first') / 'out'
    run(*SHORT, '--max_iters=2', '--seed=7', f'--out_dir={out}')
    return out


def copy_of(first, tmp_path):
    shutil.copytree(first, tmp_path / 'out')
    return tmp_path / 'out'


@pytest.mark.parametrize('flags,again,want', [
    (['--rule_hidden2=32'], [], dict(rule_hidden2=32)),                     # the data: the rule network
    (['--n_embd=64'], [], dict(n_embd=64)),                                 # the model
    (['--gzip_upper=0.9'], [], dict(gzip_upper=0.9)),                       # the band
    # the recipe, and one of its items set on the command line, which the checkpoint keeps over the recipe's
    (['--recipe=authors', '--warmup_zero=false'], ['--recipe=authors'], dict(recipe='authors', warmup_zero=False)),
], ids=['data', 'model', 'band', 'recipe'])
def test_a_resume_goes_on_with_the_checkpoints_settings(tmp_path, flags, again, want):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run(*SHORT, *flags, '--max_iters=4', f'--out_dir={straight}')
    run(*SHORT, *flags, '--max_iters=2', f'--out_dir={split}')
    run(*without(SHORT, want), *again, '--max_iters=4', f'--out_dir={split}', '--init_from=resume')
    config = load(split / 'ckpt.pt')['config']
    assert {k: config[k] for k in want} == want
    assert list(train_losses(straight)) == [1, 2, 3, 4] and train_losses(split) == train_losses(straight)  # bit for bit


def test_a_longer_resume_keeps_the_schedule(tmp_path):
    # no schedule given: the tiny preset's shares of 2 updates (warm-up 0, decay by step 2), which a resume to 4 keeps
    out = tmp_path / 'out'
    args = without(SHORT, ('warmup_iters', 'lr_decay_iters'))
    run(*args, '--max_iters=2', f'--out_dir={out}')
    schedule = {k: load(out / 'ckpt.pt')['config'][k] for k in ('warmup_iters', 'lr_decay_iters')}
    run(*args, '--max_iters=4', f'--out_dir={out}', '--init_from=resume')
    config = load(out / 'ckpt.pt')['config']
    assert schedule == dict(warmup_iters=0, lr_decay_iters=2)
    assert (config['max_iters'], {k: config[k] for k in schedule}) == (4, schedule)


def test_a_frozen_transfer_resumes_with_its_parts_frozen(first, tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    transfer = [*SHORT, f'--init_from={first}', '--freeze=attn:0']
    run(*transfer, '--max_iters=4', f'--out_dir={straight}')
    run(*transfer, '--max_iters=2', f'--out_dir={split}')
    run(*SHORT, '--max_iters=4', f'--out_dir={split}', '--init_from=resume')  # the freeze is the checkpoint's
    assert list(train_losses(straight)) == [1, 2, 3, 4] and train_losses(split) == train_losses(straight)
    source, resumed = load(first / 'ckpt.pt')['model'], load(split / 'ckpt.pt')['model']
    frozen = [k for k in source if k.startswith('blocks.0.attn.')]
    assert frozen and all(torch.equal(source[k], resumed[k]) for k in frozen)


def test_a_contradicting_flag_is_refused_and_an_equal_one_accepted(first, tmp_path):
    out = copy_of(first, tmp_path)
    p = run(*SHORT, '--max_iters=4', '--rule_hidden2=8', f'--out_dir={out}', '--init_from=resume', check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert err.startswith('nca_gpt.py: --rule_hidden2=8 contradicts') and 'rule_hidden2=16' in err, err
    assert 'another --out_dir' in err and load(out / 'ckpt.pt')['iter_num'] == 2
    run(*SHORT, '--max_iters=3', '--rule_hidden2=16', '--seed=7', f'--out_dir={out}', '--init_from=resume')
    assert load(out / 'ckpt.pt')['iter_num'] == 3


def test_run_json_keeps_the_first_settings_and_records_each_resume(first, tmp_path):
    out = copy_of(first, tmp_path)
    started = json.loads((out / 'run.json').read_text())
    run(*SHORT, '--max_iters=3', '--log_interval=2', f'--out_dir={out}', '--init_from=resume')
    run(*SHORT, '--max_iters=4', f'--out_dir={out}', '--init_from=resume')
    written = json.loads((out / 'run.json').read_text())
    assert {k: written[k] for k in started} == started                     # the first settings, as they were
    assert written['config']['max_iters'] == 2 and written['config']['init_from'] == 'scratch'
    resumes = written['resumes']
    moved = {'out_dir': [str(first), str(out)]}                             # the copy is a folder of its own
    assert [(r['from_step'], r['changed']) for r in resumes] == [
        (2, {'max_iters': [2, 3], 'log_interval': [1, 2], **moved}), (3, {'max_iters': [3, 4], 'log_interval': [2, 1]})]
    assert all(r['time'].endswith('Z') and r['time'][:4].isdigit() for r in resumes)
    config = ev.run_config(str(out))                                        # eval.py: the run as the resumes left it
    assert (config['max_iters'], config['log_interval'], config['init_from']) == (4, 1, 'scratch')


def test_a_checkpoint_of_other_code_is_refused(first, tmp_path):
    out = copy_of(first, tmp_path)
    ckpt = load(out / 'ckpt.pt')
    ckpt['config']['fire_rate'] = 0.5                                       # a setting this code does not have
    del ckpt['config']['burn_in']                                           # and one it needs
    torch.save(ckpt, out / 'ckpt.pt')
    p = run(*SHORT, '--max_iters=4', f'--out_dir={out}', '--init_from=resume', check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert 'written by other code' in err and 'fire_rate' in err and 'burn_in' in err and 'fresh run' in err, err


def test_a_load_out_of_memory_says_so(nca, tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(b'x' * 1234)

    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(torch, 'load', no_memory)
    with pytest.raises(SystemExit) as e:
        nca.load_checkpoint(str(path))
    msg = message(e)
    assert msg.startswith(f'nca_gpt.py: not enough memory to load the checkpoint {path} (1,234 bytes)'), msg
