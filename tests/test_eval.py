"""eval.py: pass@k, answer extraction, the sandbox, sampling with the cache, perplexity, each benchmark end to end."""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from conftest import ROOT
from fixture_server import FixtureServer, serve_benchmarks
from test_train import FAST, lm_data, run  # noqa: F401  (lm_data is a fixture)

sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import nca_gpt  # noqa: E402
import prepare_data  # noqa: E402


@pytest.mark.parametrize('n,c,k,want', [
    (5, 0, 1, 0.0), (5, 5, 1, 1.0), (5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10), (4, 3, 2, 1.0), (10, 1, 4, 0.4),
    (64, 0, 64, 0.0), (3, 1, 3, 1.0),
])
def test_pass_at_k(n, c, k, want):
    assert ev.pass_at_k(n, c, k) == pytest.approx(want)


@pytest.mark.parametrize('text,how,want', [
    ('so the total is 18.\n#### 18', 'strict', '18'),
    ('#### -3', 'strict', '-3'),
    ('#### $1,234.50.', 'strict', '1234.5'),
    ('#### 1,000', 'strict', '1000'),
    ('The answer is 42.', 'strict', None),
    ('3 apples and 4 pears make 7 fruits.', 'flexible', '7'),
    ('costs $12.00 in total.', 'flexible', '12'),
    ('-5 degrees, then 2.5 more', 'flexible', '2.5'),
    ('no numbers here', 'flexible', None),
    ('He had 3 eggs.\nFinal Answer: 1,200', 'paper', '1200'),
    ('Final Answer: -0.5', 'paper', '-0.5'),
    ('#### 9\nFinal Answer: 8', 'paper', '9'),
    ('Final Answer: none', 'paper', None),
])
def test_answer_extraction(text, how, want):
    assert ev.extract_answer(text, how) == want


def test_stop_strings_cut_at_the_first():
    assert ev.cut_at_stop('a\nb\ndef g():\nclass X', ['\nclass', '\ndef']) == 'a\nb'
    assert ev.cut_at_stop('no stop here', ['\n#']) == 'no stop here'


NONCE_THIEF = """import os, sys
for value in list(vars(sys.modules['__main__']).values()):  # the runner's globals: the nonce was one of them
    if isinstance(value, (str, bytes)) and len(value) == 32:
        for fd in range(3, 64):
            try:
                os.write(fd, value.encode() if isinstance(value, str) else value)
            except OSError:
                pass
os._exit(0)
"""
SANDBOX = {  # what every sandbox stops (or allows), the guards alone too
    'a correct program': ("def f():\n    return 1\nassert f() == 1\n", True),
    'a wrong one': ("assert 1 == 2\n", False),
    'an infinite loop': ("while True:\n    pass\n", False),
    'a fork bomb': ("import os\nwhile True:\n    os.fork()\n", False),
    'a 10 GB allocation': ("x = bytearray(10 * 2 ** 30)\nx[-1] = 1\n", False),
    'os.system': ("import os\nos.system('touch {outside}/system')\n", False),
    'rmtree outside': ("import shutil\nshutil.rmtree('{outside}')\n", False),
    'killing the parent': ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", False),
    'sys.exit(0) before the tests': ("import sys\nsys.exit(0)\nassert False\n", False),
    'os._exit(0)': ("import os\nos._exit(0)\n", False),
    'writing outside': ("open('{outside}/written', 'w').write('x')\n", False),
    'io.open outside': ("import io\nio.open('{outside}/io', 'w').write('x')\n", False),
    'os.open outside': ("import os\nos.close(os.open('{outside}/os-open', os.O_WRONLY | os.O_CREAT))\n", False),
    'posix.unlink outside': ("import posix\nposix.unlink('{outside}/keep.txt')\n", False),
    'open of a bytes path outside': ("open(b'{outside}/bytes', 'w').write('x')\n", False),
    "the nonce from sys.modules['__main__']": (NONCE_THIEF, False),
    'writing inside the scratch directory': ("open('notes.txt', 'w').write('x')\nassert open('notes.txt').read() == 'x'\n",
                                             True),
}
OS_LEVEL = {  # what only bwrap stops: routes around the Python-level guards, and the network
    'libc open(O_CREAT) outside': ("import ctypes, os\n"
                                   "assert ctypes.CDLL(None).open(b'{outside}/libc', os.O_WRONLY | os.O_CREAT, 0o644) >= 0\n",
                                   False),
    'libc unlink outside': ("import ctypes\nassert ctypes.CDLL(None).unlink(b'{outside}/keep.txt') == 0\n", False),
    'libc rename outside': ("import ctypes\nassert ctypes.CDLL(None).rename(b'{outside}/keep.txt', b'{outside}/x') == 0\n",
                            False),
    'a connection to a server on 127.0.0.1': (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'GET /x HTTP/1.0\\r\\n\\r\\n')\n",
        False),
}


@pytest.fixture(params=['bwrap', 'guards'])
def protection(request, monkeypatch):
    """Each sandbox in turn; bwrap's is skipped, with the reason, where it cannot start."""
    monkeypatch.setattr(ev, 'sandbox', request.param)
    monkeypatch.setattr(ev, '_modes', {})
    if request.param == 'bwrap':
        try:
            ev.sandbox_mode()
        except SystemExit as e:
            pytest.skip(str(e))
    return request.param


def check_contained(monkeypatch, os_level, extra=None):
    """Every case of SANDBOX (and of OS_LEVEL where `os_level`) run together: each passes or fails as it should,
    nothing outside is written, deleted or connected to, and the scratch directories are removed."""
    # outside: in the system's other temp directory, which bwrap leaves visible (read-only), unlike /tmp
    outside = tempfile.mkdtemp(prefix='nca-outside-', dir='/var/tmp' if os.path.isdir('/var/tmp') else None)
    server = FixtureServer()
    try:
        with open(os.path.join(outside, 'keep.txt'), 'w') as f:
            f.write('keep')
        monkeypatch.setattr(ev, 'timeout', 3.0)
        scratch_before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith('nca-eval-')}
        cases = {**SANDBOX, **(OS_LEVEL if os_level else {}), **(extra or {})}
        programs = [p.format(outside=outside, port=server.url.rsplit(':', 1)[1]) for p, _ in cases.values()]
        results = ev.run_programs(programs)  # all together, in parallel: the evaluation goes on
        for (name, (_, want)), (passed, why) in zip(cases.items(), results):
            assert passed == want, (name, why)
        assert sorted(os.listdir(outside)) == ['keep.txt'] and open(os.path.join(outside, 'keep.txt')).read() == 'keep'
        assert {d for d in os.listdir(tempfile.gettempdir()) if d.startswith('nca-eval-')} == scratch_before  # removed
        assert not server.log
    finally:
        server.close()
        shutil.rmtree(outside)


def test_sandbox(protection, monkeypatch):
    check_contained(monkeypatch, protection == 'bwrap')


def test_bwrap_with_the_interpreter_under_tmp(tmp_path, monkeypatch):
    """A venv under /tmp (as CI systems make them), which bwrap's private /tmp would hide: still bwrap, still
    contained."""
    if not shutil.which('bwrap'):
        pytest.skip('bwrap is not installed (apt-get install bubblewrap)')
    venv = tmp_path / 'venv'  # under /tmp, in pytest's folder that only root may cross
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    monkeypatch.setattr(sys, 'executable', str(venv / 'bin' / 'python'))
    monkeypatch.setattr(sys, 'prefix', str(venv))
    monkeypatch.setattr(sys, 'path', ['/tmp', *sys.path])  # as for a script run from /tmp: never bound whole
    monkeypatch.setattr(ev, 'sandbox', 'auto')
    monkeypatch.setattr(ev, '_modes', {})
    assert ev.sandbox_mode()[0], 'bwrap installed, but not used'
    check_contained(monkeypatch, True, {
        'the runner is the venv under /tmp': (
            f"import sys\nassert sys.prefix == {str(venv)!r} and sys.executable == {sys.executable!r}\n", True),
        'as root, the program runs as nobody': (  # bwrap as nobody, or as root with the program as nobody
            f"import os\nassert os.getuid() == {ev.NOBODY if os.geteuid() == 0 else os.geteuid()}\n", True)})


def test_auto_refuses_the_guards_where_bwrap_is_installed_but_fails(tmp_path, monkeypatch, capsys):
    fake = tmp_path / 'bwrap'  # a bwrap that cannot start, as in a container without namespaces
    fake.write_text('#!/bin/sh\necho "bwrap: No permissions to create new namespace" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.setattr(ev, '_modes', {})
    monkeypatch.setattr(ev, 'sandbox', 'auto')
    with pytest.raises(SystemExit) as e:
        ev.sandbox_mode()
    err = str(e.value)  # sys.exit's message: one line on stderr
    assert '\n' not in err and 'No permissions to create new namespace' in err and '--sandbox=guards' in err, err
    assert not capsys.readouterr().err  # no mode said: none chosen
    monkeypatch.setattr(ev, 'sandbox', 'guards')  # said so: the guards alone
    assert ev.sandbox_mode()[0] is None and ev.run_program('assert 1 + 1 == 2\n') == (True, 'passed')


def test_without_bwrap_the_guards_run_and_say_so(monkeypatch, capsys):
    monkeypatch.setenv('PATH', '/nonexistent')  # no bwrap to be found
    monkeypatch.setattr(ev, 'sandbox', 'auto')
    monkeypatch.setattr(ev, '_modes', {})
    assert ev.sandbox_mode()[0] is None and ev.run_program('assert 1 + 1 == 2\n') == (True, 'passed')
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('eval.py: sandbox: guards as ') and 'bwrap: not installed' in err[0]


@pytest.fixture
def tiny_model(monkeypatch, gpt2_ranks):  # its text is GPT-2's tokens
    monkeypatch.setattr(ev, 'device', 'cpu')
    monkeypatch.setattr(ev, 'dtype', 'float32')
    monkeypatch.setattr(ev, 'batch_size', 3)
    torch.manual_seed(0)
    model = nca_gpt.GPT(50304, n_layer=2, n_head=2, n_embd=32, block_size=64).eval()
    with torch.no_grad():  # sharper logits than the initialisation's, so that samples differ
        model.head.weight.mul_(50)
    return model


def test_greedy_equals_a_plain_decode_without_cache(tiny_model):
    prompt = nca_gpt.gpt2_encoding().encode('Once upon a time')
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            logits, _ = tiny_model(idx)  # the whole sequence every step, no cache
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    plain = nca_gpt.gpt2_encoding().decode(idx[0, len(prompt):].tolist())
    outs = ev.sample(tiny_model, prompt, 5, 12, 0.0, 1.0, 0, [], seed_base=1)
    assert outs == [plain] * 5
    # a tiny nucleus keeps only the most likely token: greedy again
    assert ev.sample(tiny_model, prompt, 2, 12, 1.0, 1e-6, 0, [], seed_base=1) == [plain] * 2


def test_a_fixed_seed_repeats(tiny_model):
    prompt = nca_gpt.gpt2_encoding().encode('The')
    a = ev.sample(tiny_model, prompt, 7, 10, 1.0, 0.95, 50, [], seed_base=3)
    assert a == ev.sample(tiny_model, prompt, 7, 10, 1.0, 0.95, 50, [], seed_base=3)
    assert len(set(a)) > 1 and a != ev.sample(tiny_model, prompt, 7, 10, 1.0, 0.95, 50, [], seed_base=4)


def test_sampling_stops_at_stop_strings(tiny_model):
    prompt = nca_gpt.gpt2_encoding().encode('The')
    free = ev.sample(tiny_model, prompt, 4, 20, 1.0, 1.0, 0, [], seed_base=5)
    stop = next(o[len(o) // 2:len(o) // 2 + 2] for o in free if len(o) > 4)  # a string the samples do produce
    cut = ev.sample(tiny_model, prompt, 4, 20, 1.0, 1.0, 0, [stop], seed_base=5)
    for f, c in zip(free, cut):
        assert stop not in c and f.startswith(c) and (c == f or f[len(c):].startswith(stop))


@pytest.mark.parametrize('kind', ['gpt2', 'bytes'])
def test_perplexity_is_exp_of_the_mean_loss_and_bits_per_byte(tiny_model, tmp_path, monkeypatch, kind):
    folder = tmp_path / 'toy'
    folder.mkdir()
    size, eot = (50257, 50256) if kind == 'gpt2' else (257, 256)
    tokens = np.random.default_rng(0).integers(0, size, 64 * 5 + 7).astype(np.uint16)
    tokens[::9] = eot  # documents end here and there: no bytes of text
    tokens.tofile(folder / 'val.bin')
    (folder / 'meta.json').write_text(json.dumps(dict(tokenizer=kind, vocab_size=size)))
    monkeypatch.setattr(ev, 'vocab', dict(kind=kind, size=size))
    monkeypatch.setattr(ev, 'data_dir', str(tmp_path))
    monkeypatch.setattr(ev, 'datasets', 'toy')
    monkeypatch.setattr(ev, 'max_tokens', 0)
    result = ev.eval_ppl(tiny_model)['datasets']['toy']
    t = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        losses = [tiny_model(t[w * 64:w * 64 + 64][None], t[w * 64 + 1:w * 64 + 65][None])[1] for w in range(5)]
    assert result['tokens'] == 5 * 64
    # the loss to float32 rounding (about 24 nats here: exp would magnify it), the perplexity its exp
    assert result['loss'] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    assert result['ppl'] == math.exp(result['loss'])
    targets = tokens[1:5 * 64 + 1]
    if kind == 'bytes':
        n_bytes = int((targets != eot).sum())
    else:  # the UTF-8 length of what each GPT-2 token decodes to
        enc = nca_gpt.gpt2_encoding()
        n_bytes = sum(len(enc.decode_single_token_bytes(int(i))) for i in targets if i != eot)
    assert result['bytes'] == n_bytes
    assert result['bits_per_byte'] == pytest.approx(result['loss'] * result['tokens'] / math.log(2) / n_bytes, rel=1e-6)
    monkeypatch.setattr(ev, 'vocab', dict(kind='gpt2', size=50257) if kind == 'bytes' else dict(kind='bytes', size=257))
    with pytest.raises(SystemExit, match='prepare the corpus with --tokenizer='):  # a model never reads the wrong ids
        ev.eval_ppl(tiny_model)


@pytest.fixture
def bench_dir(tmp_path, gpt2_ranks):
    """A tiny checkpoint, and each benchmark fetched in its own format from a local server by prepare_data.py."""
    torch.manual_seed(0)
    model = nca_gpt.GPT(50304, n_layer=1, n_head=2, n_embd=32, block_size=512)
    torch.save(dict(model=model.state_dict(), model_args=dict(vocab_size=50304, n_layer=1, n_head=2, n_embd=32,
                                                              block_size=512, dropout=0.0),
                    vocab=dict(kind='gpt2', size=50257), stage='lm', iter_num=0), tmp_path / 'ckpt.pt')
    server = FixtureServer()
    try:
        serve_benchmarks(server, prepare_data)
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), 'gsm8k', 'humaneval', 'bbl',
                            f'--data_dir={tmp_path / "data"}', f'--github_base={server.url}', f'--github_api={server.url}',
                            '--allow_unpinned=true'],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    finally:
        server.close()
    return tmp_path


def run_eval(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), *args, '--device=cpu'], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.mark.parametrize('task,extra,score', [
    ('gsm8k', ['--n=2'], 'paper pass@1'),
    ('gsm8k', ['--style=harness'], 'strict pass@1'),
    ('humaneval', ['--n=2', '--timeout=3'], 'pass@2'),
    ('bbl', ['--n=2'], 'normalised pass@2'),
])
def test_benchmark_end_to_end(bench_dir, task, extra, score):
    (bench_dir / 'elsewhere').mkdir()
    p = run_eval(task, f'--ckpt={bench_dir / "ckpt.pt"}', f'--data_dir={bench_dir / "data"}', '--max_new_tokens=8',
                 '--limit=3', *extra, cwd=bench_dir / 'elsewhere')
    assert p.returncode == 0, p.stderr[-3000:]
    out = bench_dir / f'eval-{task}.json'  # beside the checkpoint, not in the current directory
    assert os.listdir(bench_dir / 'elsewhere') == [] and f'wrote {out}' in p.stdout
    result = json.loads(out.read_text())
    assert 0.0 <= result['scores'][score] <= 1.0 and result['seed'] == 1337 and result['checkpoint'].endswith('ckpt.pt')
    assert score in p.stdout


def test_humaneval_scores_a_samples_file(bench_dir):
    rows = [dict(task_id='HumanEval/0', completion='    return a + b\n'), dict(task_id='HumanEval/0', completion='    return a - b\n'),
            dict(task_id='HumanEval/1', completion='    return a * b\n'), dict(task_id='HumanEval/1', completion='    while True: pass\n')]
    (bench_dir / 'samples.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = run_eval('humaneval', f'--samples={bench_dir / "samples.jsonl"}', f'--data_dir={bench_dir / "data"}', '--timeout=2',
                 f'--out={bench_dir / "he.json"}', cwd=bench_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((bench_dir / 'he.json').read_text())
    assert f"eval.py: sandbox: {result['settings']['sandbox']} (" in p.stderr  # said, and recorded
    scores = result['scores']
    assert scores == {'pass@1': pytest.approx((0.5 + 0.0) / 2), 'pass@2': pytest.approx((1.0 + 0.0) / 2)}


def test_generation_fits_the_context_and_prompts_stay_whole(capsys):
    assert ev.fit_to_context([[1] * 10, [1] * 30], 25, 40) == [25, 10]
    assert '1 of 2 prompts leave less than --max_new_tokens=25' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='the prompt of problem 1 is 40 tokens, the model.s whole context is 40'):
        ev.fit_to_context([[1] * 10, [1] * 40], 8, 40)


def test_a_small_context_shortens_generation_or_refuses_the_prompt(bench_dir):
    torch.manual_seed(0)
    args = dict(vocab_size=50304, n_layer=1, n_head=2, n_embd=32, block_size=48, dropout=0.0)
    torch.save(dict(model=nca_gpt.GPT(**args).state_dict(), model_args=args, vocab=dict(kind='gpt2', size=50257),
                    stage='lm', iter_num=0), bench_dir / 'small.pt')
    common = [f'--ckpt={bench_dir / "small.pt"}', f'--data_dir={bench_dir / "data"}', '--limit=2', '--n=2']
    p = run_eval('humaneval', *common, '--timeout=3', cwd=bench_dir)  # prompts of ~7 tokens, 500 new by default
    assert p.returncode == 0 and "2 of 2 prompts leave less than --max_new_tokens=500 in the model's context of 48" \
        in p.stdout, p.stderr[-2000:]
    p = run_eval('gsm8k', *common, cwd=bench_dir)  # 3 solved shots: longer than the whole context
    assert p.returncode != 0 and 'the prompt of problem 0 is' in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_padding_ids_are_never_sampled(tiny_model):
    with torch.no_grad():  # make an id that only pads the embedding (50257..50303) the most likely by far
        tiny_model.head.weight[50300] = tiny_model.head.weight[:50257].abs().max() * 1000
    prompt = nca_gpt.gpt2_encoding().encode('The')
    for temp in (0.0, 1.0):
        outs = ev.sample(tiny_model, prompt, 3, 6, temp, 1.0, 0, [], seed_base=0)
        assert len(outs) == 3 and all(isinstance(o, str) for o in outs)


def write_log(folder, curve, seed=1):
    folder.mkdir(parents=True)
    (folder / 'log.jsonl').write_text(''.join(json.dumps(dict(step=t // 100, tokens=t, val_loss=v)) + '\n'
                                              + json.dumps(dict(step=t // 100, loss=v + 0.1)) + '\n' for t, v in curve))
    torch.save(dict(config=dict(seed=seed, init_from='scratch')), folder / 'ckpt.pt')  # compare pairs runs by seed


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 5.0), (100, 3.0), (200, 2.0), (300, 1.5)]
    assert ev.tokens_to_reach(curve, 2.5) == 150       # halfway from 3.0 to 2.0
    assert ev.tokens_to_reach(curve, 1.5) == 300
    assert ev.tokens_to_reach(curve, 6.0) == 0
    assert ev.tokens_to_reach(curve, 1.0) is None


def test_compare_arms_over_seeds(tmp_path, monkeypatch):
    # baseline: two seeds ending at 2.0 and 2.2 (mean 2.1, sd 0.1414); its mean curve reaches 2.1 at 400 tokens.
    # "fast" reaches 2.1 at 200 tokens (2x) and ends at 1.9; "slow" never gets there.
    write_log(tmp_path / 'base-s1', [(0, 5.0), (200, 3.0), (400, 2.0)])
    write_log(tmp_path / 'base-s2', [(0, 5.0), (200, 3.2), (400, 2.2)], seed=2)
    write_log(tmp_path / 'fast-s1', [(0, 5.0), (200, 2.1), (400, 1.9)])
    write_log(tmp_path / 'slow-s1', [(0, 5.0), (200, 4.0), (400, 3.0)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'base=base-s*,fast=fast-s*,slow=slow-s*')
    monkeypatch.setattr(ev, 'png', '')
    arms = ev.eval_compare(None)['arms']
    assert arms['base']['seeds'] == 2 and arms['base']['final_loss'] == pytest.approx(2.1)
    assert arms['base']['final_loss_std'] == pytest.approx(0.1414, abs=1e-4) and arms['base']['speedup'] == 1.0
    assert arms['fast']['speedup'] == pytest.approx(2.0) and arms['fast']['tokens_to_baseline_final'] == pytest.approx(200)
    assert arms['fast']['ppl_change_pct'] == pytest.approx(100 * (math.exp(-0.2) - 1))
    assert arms['fast']['gap_in_baseline_stds'] == pytest.approx(-0.2 / 0.1414, abs=1e-3)
    assert arms['slow']['speedup'] is None and arms['slow']['tokens_to_baseline_final'] is None
    monkeypatch.setattr(ev, 'runs', 'base=nothing-*')
    with pytest.raises(SystemExit, match='names no run folder'):
        ev.eval_compare(None)


def test_compare_pairs_arms_by_seed(tmp_path, monkeypatch):
    # the arm's folders sort in another order than their seeds: pairing must follow the checkpoints' seeds
    for seed, base, arm, name in [(1, 2.0, 1.9, 'd'), (2, 2.1, 2.05, 'c'), (3, 2.2, 2.1, 'b'), (4, 2.3, 2.35, 'a')]:
        write_log(tmp_path / f'base-s{seed}', [(0, 5.0), (400, base)], seed=seed)
        write_log(tmp_path / f'arm-{name}', [(0, 5.0), (400, arm)], seed=seed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'base=base-s*,arm=arm-*')
    monkeypatch.setattr(ev, 'png', '')
    arms = ev.eval_compare(None)['arms']
    p = arms['arm']['paired']  # differences -0.1, -0.05, -0.1, +0.05: sd 0.0707, t(3) = 3.182
    assert p['mean'] == pytest.approx(-0.05) and p['ci95'] == pytest.approx(3.182 * 0.070711 / 2, abs=1e-4)
    assert (p['same_sign'], p['n']) == (3, 4) and arms['base']['paired'] is None and arms['arm']['stage1'] is None


def test_paired_interval_and_sign_count():
    assert ev.paired([1.0, 2.0, 3.0]) == dict(mean=2.0, ci95=pytest.approx(4.303 / math.sqrt(3)), same_sign=3, n=3)
    assert ev.paired([0.1, -0.3])['ci95'] == pytest.approx(12.706 * 0.2828427 / math.sqrt(2))
    assert ev.paired([-1.0] * 5 + [2.0] * 7)['same_sign'] == 7


class CopyFromContext(torch.nn.Module):
    """An induction head written out: predict the token that followed the last earlier occurrence of this one."""
    def forward(self, x, targets=None):
        B, T = x.shape
        logits = torch.zeros(B, T, 50304)
        for b in range(B):
            seen = {}
            for t in range(T):
                if x[b, t].item() in seen and seen[x[b, t].item()] + 1 < T:
                    logits[b, t, x[b, seen[x[b, t].item()] + 1]] = 30.0
                seen[x[b, t].item()] = t
        return logits, None


def test_induction_probe_sees_a_copying_model_and_not_a_fresh_one(nca):
    nca.vocab, nca.block_size = dict(kind='gpt2', size=50257), 128
    x, y = nca.repeated_tokens(0, 8, 64)                                  # (8, 127): 64 random tokens, then again
    assert torch.equal(x[:, 64:], x[:, :63]) and torch.equal(y[:, :63], x[:, 1:64])
    flat = torch.zeros(nca.block_size)
    copier = nca.in_context_scores(flat, nca.token_losses(CopyFromContext()(x)[0], y).mean(0))
    assert copier['induction'] < -10  # the second copy costs ~0 nats, the first ~ln(50,304) = 10.8
    torch.manual_seed(0)
    fresh = nca.GPT(50304, n_layer=2, n_head=2, n_embd=32, block_size=128).eval()
    with torch.no_grad():
        assert abs(nca.in_context_scores(flat, nca.token_losses(fresh(x)[0], y).mean(0))['induction']) < 0.05
    late = torch.cat([torch.full((115,), 3.0), torch.full((13,), 2.0)])  # the last tenth (12.8) 1 nat easier
    assert nca.in_context_scores(late, torch.zeros(127))['icl'] == pytest.approx(-1.0)


def test_icl_at_start_rebuilds_step_0_and_shuffled_stage1_is_scored_unshuffled(nca, tmp_path, lm_data):
    for arm, shuffle in (('nca', 'false'), ('shuffled', 'true')):
        run(*FAST, '--stage=nca', '--max_iters=1', '--eval_interval=1', f'--nca_shuffle={shuffle}', f'--out_dir={tmp_path / arm}')
    ev.device = 'cpu'
    nca_signal, shuffled_signal = ev.stage1_signal(str(tmp_path / 'nca')), ev.stage1_signal(str(tmp_path / 'shuffled'))
    own = [json.loads(line) for line in open(tmp_path / 'shuffled' / 'log.jsonl') if 'copy_frame_acc' in line][-1]
    assert shuffled_signal['copy_frame_acc'] == nca_signal['copy_frame_acc'] != own['copy_frame_acc']
    run(*FAST, '--stage=lm', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64', '--max_iters=2', '--eval_interval=2',
        f'--init_from={tmp_path / "nca"}', f'--out_dir={tmp_path / "lm"}')
    p = subprocess.run([sys.executable, 'eval.py', 'icl', f'--ckpt={tmp_path / "lm"}', '--at_start=true', '--batches=2',
                        f'--out={tmp_path / "icl.json"}', '--device=cpu'], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    step0 = json.loads(open(tmp_path / 'lm' / 'log.jsonl').readline())
    got = json.load(open(tmp_path / 'icl.json'))['scores']
    assert (got['icl'], got['induction'], got['val loss']) == (step0['icl'], step0['induction'], step0['val_loss'])


def test_a_byte_model_samples_text(monkeypatch):
    """A model of the bytes vocabulary (257 ids, padded to 320) decodes its samples as UTF-8."""
    monkeypatch.setattr(ev, 'device', 'cpu')
    monkeypatch.setattr(ev, 'dtype', 'float32')
    monkeypatch.setattr(ev, 'vocab', dict(kind='bytes', size=257))
    torch.manual_seed(0)
    model = nca_gpt.GPT(320, n_layer=1, n_head=2, n_embd=32, block_size=64).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
    outs = ev.sample(model, list(b'def f(x):'), 4, 20, 1.0, 1.0, 0, [], seed_base=0)
    assert len(outs) == 4 and all(isinstance(o, str) for o in outs) and len(set(outs)) > 1
