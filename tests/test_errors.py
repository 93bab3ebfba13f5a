"""Every bad input is one line on stderr that says what to do, before any work starts: never a traceback."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402


@pytest.mark.parametrize('script,args,message', [
    ('nca_gpt.py', ['--stage=nope'], 'is not one of: nca, dyck, lm, sft'),
    ('nca_gpt.py', ['--nope=1'], 'unknown option --nope; valid options:'),
    ('nca_gpt.py', ['--num_rules', 'many'], '--num_rules=many is not a valid int'),
    ('nca_gpt.py', ['--num_rules'], '--num_rules needs a value'),
    ('nca_gpt.py', ['stage'], 'unexpected argument'),
    ('nca_gpt.py', ['--device=cuda'], '--device=cuda is not available on this machine (it has cpu)'),
    ('nca_gpt.py', ['--eval_interval=0'], '--eval_interval=0 must be at least 1'),
    ('nca_gpt.py', ['--log_interval=0'], '--log_interval=0 must be at least 1'),
    ('nca_gpt.py', ['--batch_size=0'], '--batch_size=0 must be at least 1'),
    ('nca_gpt.py', ['--grid=13'], '--grid=13 is not a multiple of --patch=2'),
    ('nca_gpt.py', ['--patch=3', '--n_states=10'], 'gives 10^9 patch tokens, over 2^16'),
    ('nca_gpt.py', ['--n_head=3'], '--n_head can be 1, 2, 4, 8, 16, 32, 64'),
    ('nca_gpt.py', ['--block_size=20'], 'shorter than two frames of 38 tokens'),
    ('eval.py', ['nca', '--n_states=4', '--num_rules=256'], 'eval.py: the band (0.5, 1.0) kept no rule'),
    ('eval.py', ['nca', '--gzip_lower=0.95', '--num_rules=256'], 'kept no rule'),
    ('eval.py', ['nca', '--num_rules=0'], 'eval.py: --num_rules=0 must be at least 1'),
    ('eval.py', ['ppl', '--n_states=3'], '--n_states is an option of eval.py nca'),
    ('eval.py', ['nca', '--ckpt=out-nca'], '--ckpt is an option of eval.py ppl/gsm8k/humaneval/bbl/icl/watch/export, not of eval.py nca'),
    ('eval.py', ['ppl', '--temperature=0.5'], '--temperature is an option of eval.py gsm8k/humaneval/bbl/nca, not of eval.py ppl'),
    ('eval.py', ['compare', '--seed=2'], '--seed is an option of eval.py gsm8k/humaneval/bbl/nca, not of eval.py compare'),
    ('nca_gpt.py', ['--gzip_lower=0.6', '--gzip_upper=0.4'], 'is empty: the lower bound must be below'),
    ('nca_gpt.py', ['--stage=lm', '--dataset=gsm8k', '--data_dir={data}'], 'gsm8k is a benchmark, not a corpus'),
    ('eval.py', ['ppl', '--device=cuda'], '--device=cuda is not available on this machine'),
    ('eval.py', ['ppl', '--datasets=gsm8k', '--data_dir={data}'], 'gsm8k is a benchmark, not a corpus'),
    ('eval.py', ['humaneval', '--samples=/missing'], 'no /missing: --samples names a jsonl'),
    ('eval.py', ['ppl', '--EOT=7'], 'unknown option --EOT'),
    ('prepare_data.py', ['x', '--EOT=7'], 'unknown option --EOT'),
    ('prepare_data.py', ['pystdlib', '--max_tokens=-1'], 'prepare_data.py: --max_tokens=-1 must be 0 (all) or more'),
    ('prepare_data.py', ['pystdlib', '--workers=0'], '--workers=0 must be at least 1'),
    ('prepare_data.py', ['pystdlib', '--val_fraction=1'], '--val_fraction=1.0 must be in [0, 1)'),
    ('prepare_data.py', ['humaneval', '--github_base=http://127.0.0.1:9', '--retries=0', '--data_dir={data}'],
     '--github_base=URL fetches from a mirror'),
])
def test_bad_input_is_one_line(tmp_path, script, args, message):
    (tmp_path / 'gsm8k').mkdir()  # a prepared benchmark: meta.json and jsonl, no token files
    (tmp_path / 'gsm8k' / 'meta.json').write_text(json.dumps(dict(benchmark='gsm8k')))
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *[a.format(data=tmp_path) for a in args]],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode != 0 and message in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith(('out-', 'eval-'))]  # no out_dir, log or JSON


@pytest.mark.parametrize('args,message', [
    (['--eval_iters=0'], '--eval_iters=0 must be at least 1'),
    (['--gradient_accumulation_steps=0'], 'must be at least 1'),
    (['--n_layer=0'], '--n_layer=0 must be at least 1'),
    (['--n_head=0'], '--n_head=0 must be at least 1'),
    (['--n_embd=-8'], '--n_embd=-8 must be at least 1'),
    (['--n_embd=96', '--n_head=32'], '--n_head can be 1, 2, 3, 4, 6, 8, 12, 16, 24, 48'),  # heads of width 3: odd
    (['--block_size=0'], '--block_size=0 must be at least 1'),
    (['--stage=dyck', '--dyck_k=0'], '--dyck_k=0 must be at least 1'),
    (['--patch=0'], '--patch=0 must be at least 1'),
    (['--grid=1'], '--grid=1 is not a multiple of --patch=2'),
    (['--n_states=1'], 'at least 2 states'),
    (['--n_states=17'], 'gives 17^4 patch tokens'),
    (['--patch=5', '--grid=10'], 'gives 2^25 patch tokens'),
    (['--num_val_rules=-1'], 'must be at least 1'),
    (['--max_iters=-1'], '--max_iters=-1 must be 0 or more'),
    (['--learning_rate=-0.1'], 'must be 0 or more'),
    (['--dropout=1'], '--dropout must be below 1'),
    (['--gzip_lower=0.4', '--gzip_upper=0.4'], 'is empty'),
    (['--device=gpu'], '--device=gpu is not available'),
    (['--device=cuda:1'], '--device=cuda:1 is not available'),
    (['--max_iters=5', '--max_tokens=100'], 'both set the run\'s length'),
    (['--stage=lm', '--epochs=2'], '--epochs applies to the nca and sft stages'),
    (['--stage=sft', '--data_dir=/nowhere'], 'sft trains on the pairs of `prepare_data.py gsm8k`'),
])
def test_bad_values_of_the_same_options(nca, args, message):
    """The siblings of the commands above (zero, negative, out of range), checked in this process: quicker."""
    with pytest.raises(SystemExit, match='^nca_gpt.py: ') as e:
        nca.configure(args)
        nca.device = nca.device or 'cpu'
        nca.check_config()
    assert message in str(e.value.code) and '\n' not in e.value.code


@pytest.mark.parametrize('args,message', [
    (['ppl', '--batch_size=0'], '--batch_size=0 must be positive'),
    (['gsm8k', '--limit=-1'], '--limit=-1 must be 0 (the default) or more'),
    (['humaneval', '--timeout=0'], '--timeout=0.0 must be positive'),
    (['ppl', '--device=gpu'], '--device=gpu is not available'),
    (['ppl', '--dtype=float16'], '--dtype=float16 is not one of'),
    (['ppl', '--datasets=nowhere', '--data_dir=/nowhere'], 'run `python prepare_data.py nowhere` first'),
    (['bbl', '--data_dir=/nowhere'], 'run `python prepare_data.py bbl` first'),
])
def test_bad_eval_values(monkeypatch, args, message):
    for k in ev.config_keys:
        monkeypatch.setattr(ev, k, getattr(ev, k))
    with pytest.raises(SystemExit, match='^eval.py: ') as e:
        ev.main(args)
    assert message in str(e.value.code) and '\n' not in e.value.code
