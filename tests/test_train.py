"""The GPT and the training loop: learning, transfer, resume, torchrun, config, sft. CPU, offline."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

# a small, fast NCA run: 3 frames of 38 tokens, a tiny model
FAST = ['--preset=tiny', '--device=cpu', '--block_size=114', '--batch_size=4', '--num_rules=64',
        '--num_val_rules=16', '--eval_iters=2', '--log_interval=1', '--n_layer=2', '--n_embd=32', '--n_states=10',
        '--gzip_lower=0.5']  # the paper's NCA data (the tiny preset's is smaller)


def run(*args, torchrun=False, check=True):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun else [])
    p = subprocess.run(cmd + [os.path.join(ROOT, 'nca_gpt.py'), *args], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]


def train_losses(out_dir):
    return {r['step']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def test_loss_falls_on_nca_data(tmp_path):
    # simple rules (gzip ratio under 0.3: mostly still or periodic) so that a few dozen steps show learning
    run(*FAST, '--stage=nca', '--max_iters=60', '--eval_interval=60', '--learning_rate=3e-3', '--gzip_lower=0',
        '--gzip_upper=0.3', f'--out_dir={tmp_path}')
    val = [r for r in read_log(tmp_path) if 'val_loss' in r]
    assert [r['step'] for r in val] == [0, 60]
    assert val[1]['val_loss'] < val[0]['val_loss'] - 0.5, val
    assert len(val[1]['frame_loss']) == 2 and 0 <= val[1]['next_frame_acc'] <= 1


def test_resume_equals_uninterrupted(tmp_path):
    # the schedule given: a run's own warm-up and decay would follow its --max_iters (5, then 8)
    args = [*FAST, '--stage=nca', '--dropout=0.1', '--eval_interval=3', '--warmup_iters=2', '--lr_decay_iters=8']
    run(*args, '--max_iters=8', f'--out_dir={tmp_path / "straight"}')
    run(*args, '--max_iters=5', f'--out_dir={tmp_path / "split"}')
    run(*args, '--max_iters=8', f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    straight, split = train_losses(tmp_path / 'straight'), train_losses(tmp_path / 'split')
    assert len(straight) == 8 and straight == split                     # bit for bit, dropout included
    val_at_6 = [[r for r in read_log(tmp_path / d) if r['step'] == 6 and 'val_loss' in r] for d in ('straight', 'split')]
    assert val_at_6[0] == val_at_6[1] != []


def test_torchrun_two_processes_match_one(tmp_path):
    args = [*FAST, '--stage=nca', '--gradient_accumulation_steps=2', '--max_iters=3', '--eval_interval=3']
    p = run(*args, f'--out_dir={tmp_path / "ddp"}', torchrun=True)
    run(*args, f'--out_dir={tmp_path / "one"}')
    assert sorted(os.listdir(tmp_path / 'ddp')) == ['ckpt.pt', 'log.jsonl', 'run.json']  # only rank 0 writes
    assert p.stdout.count('step 3 |') == 1 and p.stdout.count('2 process(es)') == 1
    ddp, one = train_losses(tmp_path / 'ddp'), train_losses(tmp_path / 'one')
    assert ddp.keys() == one.keys() and all(abs(ddp[k] - one[k]) < 1e-4 for k in one)


@pytest.fixture
def lm_data(tmp_path):
    """A tiny prepared dataset as prepare_data.py writes it: uint16 tokens and meta.json."""
    folder = tmp_path / 'data' / 'toy'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts = {}
    for split, n in (('train', 20000), ('val', 4000)):
        tokens = (np.arange(n) % 97 * 3 + rng.integers(0, 2, n)).astype(np.uint16)  # learnable structure
        tokens.tofile(folder / f'{split}.bin')
        counts[f'{split}_tokens'] = n
    (folder / 'meta.json').write_text(json.dumps(dict(tokenizer='gpt2', dtype='uint16', vocab_size=50257, **counts)))
    return tmp_path / 'data'


def test_nca_then_lm_transfer_end_to_end(tmp_path, lm_data):
    run(*FAST, '--stage=nca', '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path / "nca"}')
    p = run(*FAST, '--stage=lm', '--dataset=toy', f'--data_dir={lm_data}', '--max_iters=20', '--eval_interval=20',
            '--block_size=64', f'--init_from={tmp_path / "nca"}', f'--out_dir={tmp_path / "lm"}')
    assert 'transferred the blocks' in p.stdout
    val = [r['val_loss'] for r in read_log(tmp_path / 'lm') if 'val_loss' in r]
    assert val[-1] < val[0] - 0.3  # it learns (at random it would stay at ln(50304) = 10.8)
    ckpt = torch.load(tmp_path / 'lm' / 'ckpt.pt', weights_only=False)
    assert ckpt['stage'] == 'lm' and ckpt['vocab']['kind'] == 'gpt2' and ckpt['model']['wte.weight'].shape[0] == 50304


def test_bytes_end_to_end_prepare_nca_transfer_lm_ppl(tmp_path):
    """A folder of .py files as bytes -> an NCA run -> the lm stage with its blocks -> eval.py ppl in bits per byte."""
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(40):
        (src / f'm{i}.py').write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}  # é\n" * (i % 5 + 1))
    (src / 'skip.bin').write_bytes(b'\x00' * 100)
    data = tmp_path / 'data'
    p = subprocess.run([sys.executable, 'prepare_data.py', 'code', f'--source={src}', '--tokenizer=bytes',
                        f'--data_dir={data}'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert 'read 40 files (40 .py); skipped 1 (1 .bin' in p.stdout
    meta = json.load(open(data / 'code' / 'meta.json'))
    assert meta['tokenizer'] == 'bytes' and meta['vocab_size'] == 257 and meta['eot'] == 256
    tokens = np.fromfile(data / 'code' / 'train.bin', dtype=np.uint16)
    docs = bytes(tokens[tokens < 256].astype(np.uint8)).decode()
    assert (tokens == 256).sum() + (np.fromfile(data / 'code' / 'val.bin', dtype=np.uint16) == 256).sum() == 40
    assert 'return x * 3 + 3  # é' in docs
    run(*FAST, '--stage=nca', '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp_path / "nca"}')
    p = subprocess.run([sys.executable, 'eval.py', 'watch', f'--ckpt={tmp_path / "nca"}', f'--png={tmp_path / "watch.png"}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)  # watch it predict held-out rules
    assert "model's prediction" in p.stdout and 'held-out rules, patch accuracy of frames 1-2' in p.stdout, p.stderr
    assert (tmp_path / 'watch.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert len(json.load(open(tmp_path / 'nca' / 'eval-watch.json'))['frame_acc']) == 2
    p = run(*FAST, '--stage=lm', '--dataset=code', f'--data_dir={data}', '--max_iters=30', '--eval_interval=30',
            '--block_size=64', f'--init_from={tmp_path / "nca"}', f'--out_dir={tmp_path / "lm"}')
    assert 'fresh for bytes' in p.stdout
    ckpt = torch.load(tmp_path / 'lm' / 'ckpt.pt', weights_only=False)
    assert ckpt['vocab']['kind'] == 'bytes' and ckpt['model']['wte.weight'].shape[0] == 320  # 257, padded
    val = [r['val_loss'] for r in read_log(tmp_path / 'lm') if 'val_loss' in r]
    assert val[-1] < val[0] - 1.0  # ln 320 = 5.8 at the start
    out = tmp_path / 'ppl.json'
    p = subprocess.run([sys.executable, 'eval.py', 'ppl', f'--ckpt={tmp_path / "lm"}', '--datasets=code',
                        f'--data_dir={data}', f'--out={out}'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.load(open(out))['datasets']['code']
    assert 'bits per byte' in p.stdout and 0 < result['bits_per_byte'] < val[-1] / np.log(2) * 1.5


def test_pystdlib_is_prepared_offline(tmp_path):
    p = subprocess.run([sys.executable, 'prepare_data.py', 'pystdlib', '--tokenizer=bytes', '--max_tokens=200000',
                        f'--data_dir={tmp_path}'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    meta = json.load(open(tmp_path / 'pystdlib' / 'meta.json'))
    assert meta['python'] == sys.version.split()[0] and meta['files'] > 500 and meta['val_tokens'] > 0
    head = bytes(np.fromfile(tmp_path / 'pystdlib' / 'train.bin', dtype=np.uint16)[:20000].astype(np.uint8))
    assert b'def ' in head and b'import ' in head


def test_max_tokens_sets_the_run_length(tmp_path, lm_data):
    run(*FAST, '--stage=lm', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64', '--max_tokens=1000',
        '--eval_interval=100', f'--out_dir={tmp_path}')
    assert max(train_losses(tmp_path)) == 4  # ceil(1000 / (4 x 64))


def make_models(nca, vocab_src=10002, vocab_dst=50257):
    torch.manual_seed(0)
    src = nca.GPT(vocab_src, n_layer=2, n_head=2, n_embd=32, block_size=64)
    for p in src.parameters():  # make every tensor, norms included, differ from a fresh init
        p.data += torch.randn_like(p)
    dst = nca.GPT(vocab_dst, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return src, dst, {'model': src.state_dict()}


def test_transfer_keeps_blocks_and_renews_embedding_and_head(nca):
    src, dst, ckpt = make_models(nca)
    fresh_wte = dst.wte.weight.clone()
    nca.transfer(dst, ckpt, same_vocab=False)
    for k, v in src.state_dict().items():
        if not k.startswith(('wte.', 'head.')):
            assert torch.equal(dst.state_dict()[k], v), k
    assert dst.wte.weight.shape == (50257, 32) and dst.head.weight.shape == (50257, 32)
    assert torch.equal(dst.wte.weight, fresh_wte) and dst.wte.weight.std() < 0.03


def test_keep_embeddings_needs_the_same_vocabulary(nca):
    src, dst, ckpt = make_models(nca, 50257, 50257)
    nca.transfer(dst, ckpt, same_vocab=True, keep=True)
    assert torch.equal(dst.wte.weight, src.wte.weight) and torch.equal(dst.head.weight, src.head.weight)
    src, dst, ckpt = make_models(nca)
    with pytest.raises(SystemExit, match='same vocabulary'):
        nca.transfer(dst, ckpt, same_vocab=False, keep=True)


@pytest.mark.parametrize('spec,changed', [
    ('attn', ['blocks.0.attn', 'blocks.1.attn']),
    ('mlp:1-1', ['blocks.1.mlp']),
    ('attn:0,mlp:0', ['blocks.0.attn', 'blocks.0.mlp']),
    ('norm', ['blocks.0.norm', 'blocks.1.norm', 'norm.']),
])
def test_reinit_switches(nca, spec, changed):
    src, dst, ckpt = make_models(nca)
    nca.transfer(dst, ckpt, same_vocab=False, reinit=spec)
    for k, v in src.state_dict().items():
        if k.startswith(('wte.', 'head.')):
            continue
        assert torch.equal(dst.state_dict()[k], v) != any(k.startswith(c) for c in changed), k
    if spec == 'norm':
        assert all((dst.state_dict()[k] == 1).all() for k in dst.state_dict() if 'norm' in k)


def test_freeze_switch(nca):
    src, dst, ckpt = make_models(nca)
    nca.transfer(dst, ckpt, same_vocab=False, freeze='attn,emb')
    frozen = {k for k, p in dst.named_parameters() if not p.requires_grad}
    assert frozen == {k for k, _ in dst.named_parameters() if '.attn.' in k or k.startswith('wte.')}


def test_mismatched_blocks_are_listed(nca):
    src = nca.GPT(100, n_layer=2, n_head=2, n_embd=32, block_size=64)
    dst = nca.GPT(100, n_layer=2, n_head=2, n_embd=64, block_size=64)
    with pytest.raises(SystemExit, match=r'blocks.0.attn.qkv.weight: checkpoint \(96, 32\) vs model \(192, 64\)'):
        nca.transfer(dst, {'model': src.state_dict()}, same_vocab=True)
    with pytest.raises(SystemExit, match='cannot read'):
        nca.parts('attention', dst)


def test_config_accepts_both_forms_and_the_preset_yields(nca):
    nca.configure(['--stage', 'lm', '--max_iters=7', '--batch_size', '3', '--preset=tiny', '--compile', 'false'])
    assert (nca.stage, nca.max_iters, nca.batch_size, nca.compile) == ('lm', 7, 3, False)
    assert nca.n_embd == 128 and nca.block_size == 256  # from the tiny preset


def test_sft_masks_the_prompt(nca, tmp_path):
    folder = tmp_path / 'qa'
    folder.mkdir()
    rows = [dict(prompt='Question: 2+2?\nAnswer:', answer=' 4'), dict(prompt='Say hi.', answer=' hi there')]
    (folder / 'sft_train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    nca.data_dir, nca.dataset, nca.block_size, nca.stage = str(tmp_path), 'qa', 16, 'sft'
    x, y = nca.sft_batch('train', 0, 2)
    enc = nca.gpt2_encoding()
    for b in range(2):
        prompt, answer = next((enc.encode(r['prompt']), enc.encode(r['answer'])) for r in rows
                              if enc.encode(r['prompt']) == x[b, :len(enc.encode(r['prompt']))].tolist())
        n, m = len(prompt), len(answer)
        assert (y[b, :n - 1] == -1).all()                                  # no loss on the prompt
        assert y[b, n - 1:n - 1 + m].tolist() == answer and y[b, n - 1 + m] == nca.EOT
        assert (y[b, n + m:] == -1).all()                                  # nor on the padding


@pytest.mark.parametrize('args,message', [
    (['--stage=lm', '--dataset=nowhere'], "run `python prepare_data.py nowhere`"),
    (['--stage=nca', '--init_from=resume'], 'no checkpoint at'),
    (['--stage=nca', '--learning_rate=1e30', '--max_iters=5'], 'loss is nan'),
])
def test_clear_errors(tmp_path, args, message):
    p = run(*FAST, *args, f'--out_dir={tmp_path}', f'--data_dir={tmp_path}', check=False)
    assert p.returncode != 0 and message in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]


def test_ctrl_c_says_where_to_resume(tmp_path):
    args = [*FAST, '--stage=nca', '--max_iters=100000', '--eval_interval=4', f'--out_dir={tmp_path}']
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'nca_gpt.py'), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, 'PYTHONUNBUFFERED': '1'},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    for line in p.stdout:
        if line.startswith('step 6 |'):  # after the checkpoint of step 4
            p.send_signal(signal.SIGINT)
            break
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 130 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    step = int(err.split('holds step ')[1].split(':')[0])
    assert step in (4, 8) and err.startswith('nca_gpt.py: interrupted at step ') and 'add --init_from=resume' in err
    p = run(*args[:-3], f'--max_iters={step + 1}', '--eval_interval=4', f'--out_dir={tmp_path}', '--init_from=resume')
    assert f'from step {step}' in p.stdout and max(train_losses(tmp_path)) == step + 1


@pytest.mark.parametrize('args,want', [
    (['--stage=nca'], (1000, 50, 1000)),                                    # the tiny preset's nca schedule
    (['--stage=nca', '--max_iters=4000'], (4000, 200, 4000)),               # the same shares of a longer run
    (['--stage=nca', '--max_iters=4000', '--warmup_iters=10'], (4000, 10, 4000)),  # a flag given wins
    (['--stage=lm', '--preset=paper', '--max_iters=24000'], (24000, 2400, 24000)),
    (['--stage=lm', '--max_tokens=20480'], (10, 1, 10)),                    # 20,480 / (8 x 256) = 10 updates
    (['--stage=sft', '--max_iters=7'], (7, 1, 7)),                          # not the preset's 1 epoch
])
def test_the_schedule_follows_the_length(nca, args, want):
    nca.configure(['--preset=tiny', *args])
    assert (nca.max_iters, nca.warmup_iters, nca.lr_decay_iters) == want


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    p = run(*FAST, '--init_from=resume', f'--out_dir={tmp_path}', check=False)
    assert p.returncode != 0 and f"cannot read the checkpoint {tmp_path / 'ckpt.pt'}" in p.stderr


def test_lm_then_sft_keeps_the_whole_model(tmp_path, lm_data):
    run(*FAST, '--stage=lm', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64', '--max_iters=2',
        '--eval_interval=2', f'--out_dir={tmp_path / "lm"}')
    rows = [dict(prompt=f'Question: {i} + {i}?\nAnswer:\n', answer=f'Final Answer: {2 * i}') for i in range(40)]
    for split in ('train', 'val'):
        (lm_data / 'toy' / f'sft_{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = run(*FAST, '--stage=sft', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64', '--epochs=1',
            f'--init_from={tmp_path / "lm"}', f'--out_dir={tmp_path / "sft"}')
    assert 'embedding and head kept' in p.stdout
    assert max(train_losses(tmp_path / 'sft')) == 10  # 1 epoch of 40 examples, 4 a step


def test_without_a_preset_a_cpu_runs_tiny_and_says_so(tmp_path):
    p = run('--stage', 'nca', '--max_iters', '2', '--eval_iters=1', '--num_rules=64', '--num_val_rules=16',
            f'--out_dir={tmp_path}')
    assert p.stdout.splitlines()[0].startswith('no --preset given: tiny (no GPU here')
    assert 'preset tiny, cpu float32' in p.stdout and (tmp_path / 'ckpt.pt').exists()


def test_presets_compile_only_on_a_gpu(nca):
    nca.configure(['--preset=small', '--device=cpu'])
    assert nca.n_embd == 768 and nca.compile is False
    nca.configure(['--preset=small', '--device=cpu', '--compile=true'])
    assert nca.compile is True


def test_a_new_source_is_one_function_and_one_entry(tmp_path):
    """docs/training.md's worked example, pasted as a user would into a copy of nca_gpt.py (its code block before
    section 2, its entry into SOURCES, nothing else), trains, refuses a bad value of its option in one line, and
    gives its blocks to a language stage."""
    doc = open(os.path.join(ROOT, 'docs', 'training.md')).read()
    section = doc[doc.index('## A new stage-1 source'):]
    code, entry = [block.split('```', 1)[0] for block in section.split('```python\n')[1:3]]
    src = open(os.path.join(ROOT, 'nca_gpt.py')).read()
    at_sources = src.index('\n}\n', src.index('SOURCES = {'))
    fork = src[:at_sources] + '\n' + entry.rstrip('\n') + src[at_sources:]
    fork = fork.replace('# ==== 2. The GPT', code + '\n\n# ==== 2. The GPT', 1)
    assert fork.count('eca_batch') == 2 and len(fork.splitlines()) == len(src.splitlines()) + len(
        (code + '\n\n').splitlines()) + len(entry.rstrip('\n').splitlines())
    script = tmp_path / 'nca_gpt.py'
    script.write_text(fork)

    def fork_run(*args, check=True):
        p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert not check or p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p
    out = tmp_path / 'out-eca'
    fork_run('--stage=eca', '--preset=tiny', '--eca_width=15', '--block_size=128', '--batch_size=8',
             '--n_layer=1', '--n_embd=32', '--max_iters=40', '--eval_interval=40', '--eval_iters=2',
             '--learning_rate=3e-3', f'--out_dir={out}')
    val = [r['val_loss'] for r in read_log(out) if 'val_loss' in r]
    assert val[1] < val[0] - 0.3, val  # it learns the rules' frames
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['vocab'] == {'kind': 'eca', 'size': 3} and ckpt['config']['eca_width'] == 15
    bad = fork_run('--stage=eca', '--eca_width=2', check=False)
    assert bad.returncode == 1 and bad.stderr.strip() == 'nca_gpt.py: --eca_width=2 must be at least 3', bad.stderr
    # its blocks start a language model: the transfer reads SOURCES too (a byte corpus of this repository's code)
    data = tmp_path / 'data' / 'own'
    data.mkdir(parents=True)
    text = open(os.path.join(ROOT, 'nca_gpt.py'), 'rb').read()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids[:len(ids) * 9 // 10].tofile(data / 'train.bin')
    ids[len(ids) * 9 // 10:].tofile(data / 'val.bin')
    meta = dict(tokenizer='bytes', vocab_size=257, train_tokens=len(ids) * 9 // 10,
                val_tokens=len(ids) - len(ids) * 9 // 10)
    (data / 'meta.json').write_text(json.dumps(meta))
    p = fork_run('--stage=lm', '--preset=tiny', '--dataset=own', f'--data_dir={tmp_path / "data"}', f'--init_from={out}',
                 '--n_layer=1', '--n_embd=32', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
                 f'--out_dir={tmp_path / "out-lm"}')
    assert 'transferred the blocks' in p.stdout and 'eca' in p.stdout, p.stdout[-1000:]
