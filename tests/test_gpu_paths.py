"""What a GPU run switches on, exercised on the CPU before any GPU does: torch.compile, bf16 autocast, the loop's
CUDA-only branches (fused AdamW, MFU), the presets' shapes, the memory estimate, and tests/gpu_check.sh's dry run.
Two tests take minutes and run only with `python -m pytest -q tests --slow` (a shorter update of the small preset
runs without it)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import FAST, lm_data, read_log, run, train_losses  # noqa: F401 (lm_data is a fixture)

import nca_gpt

DEFAULTS = {k: getattr(nca_gpt, k) for k in nca_gpt.config_keys}
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ('g++', 'clang++', 'c++')),
                                    reason="torch's inductor compiles for the CPU with a C++ compiler: none here")


def train(nca, *args):
    """nca_gpt.train() in this process, from the defaults: runs of one test share rule sets and compiled code."""
    for k, v in DEFAULTS.items():
        setattr(nca, k, v)
    nca.configure([*FAST, *args])
    nca.train()


def val_losses(out_dir):
    return {r['step']: r['val_loss'] for r in read_log(out_dir) if 'val_loss' in r}


@needs_compiler
def test_compiled_training_matches_eager_and_resumes(nca, tmp_path, monkeypatch):
    monkeypatch.setattr('torch._inductor.config.compile_threads', 1)  # 2 cores: a pool of workers costs more than it saves
    # the schedule given: a resume keeps its checkpoint's, and the eager run's follows its own --max_iters
    args = ['--stage=nca', '--learning_rate=3e-3', '--warmup_iters=0', '--lr_decay_iters=6', '--eval_interval=4']
    train(nca, *args, '--max_iters=6', f'--out_dir={tmp_path / "eager"}')
    train(nca, *args, '--max_iters=4', '--compile=true', f'--out_dir={tmp_path / "compiled"}')
    train(nca, *args, '--max_iters=6', '--compile=true', '--init_from=resume', f'--out_dir={tmp_path / "compiled"}')
    eager, compiled = train_losses(tmp_path / 'eager'), train_losses(tmp_path / 'compiled')
    assert list(compiled) == list(eager) == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 after the resume
    # the same weights give the same loss to ~1e-6 (inductor fuses and reorders sums): step 1 and the first evaluation.
    # After that Adam turns ~1e-6 differences of near-zero gradients (rare patch tokens) into whole steps of size lr:
    # measured drift up to 3e-3 by step 6 (2-core EPYC, 2026-11-28), so later steps get 1e-2, a few updates' worth
    ev, cv = val_losses(tmp_path / 'eager'), val_losses(tmp_path / 'compiled')
    assert abs(compiled[1] - eager[1]) < 1e-5 and abs(cv[0] - ev[0]) < 1e-5, (eager, compiled, ev, cv)
    assert all(abs(compiled[k] - eager[k]) < 1e-2 for k in eager), (eager, compiled)
    assert list(cv) == list(ev) == [0, 4, 6] and all(abs(cv[k] - ev[k]) < 1e-2 for k in ev), (ev, cv)


def test_bf16_autocast_runs_and_its_checkpoint_is_fp32(nca, tmp_path, lm_data):
    args = ['--stage=nca', '--max_iters=3', '--eval_interval=3', '--learning_rate=3e-3', '--warmup_iters=0']
    train(nca, *args, f'--out_dir={tmp_path / "fp32"}')
    train(nca, *args, '--dtype=bfloat16', f'--out_dir={tmp_path / "nca"}')
    fp32, bf16 = train_losses(tmp_path / 'fp32'), train_losses(tmp_path / 'nca')
    # bf16 keeps 8 bits of mantissa: a loss of 9.2 is good to ~0.04 (measured here: differences of ~1e-4, not 0)
    assert list(bf16) == [1, 2, 3] and all(abs(bf16[k] - fp32[k]) < 0.05 for k in fp32) and bf16 != fp32, (fp32, bf16)
    train(nca, '--stage=lm', '--dtype=bfloat16', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64',
          '--max_iters=3', '--eval_interval=3', f'--init_from={tmp_path / "nca"}', f'--out_dir={tmp_path / "lm"}')
    assert all(math.isfinite(v) for v in [*train_losses(tmp_path / 'lm').values(), *val_losses(tmp_path / 'lm').values()])
    ckpt = torch.load(tmp_path / 'lm' / 'ckpt.pt', weights_only=False)
    assert {v.dtype for v in ckpt['model'].values()} == {torch.float32}  # autocast computes in bf16, keeps fp32
    nca.GPT(**ckpt['model_args']).load_state_dict(ckpt['model'])  # strict: every tensor fits an fp32 model
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), 'ppl', f'--ckpt={tmp_path / "lm"}',
                        f'--data_dir={lm_data}', '--datasets=toy', '--device=cpu', f'--out={tmp_path / "ppl.json"}'],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 1 < json.loads((tmp_path / 'ppl.json').read_text())['scores']['toy ppl'] < 50304


def test_the_loops_cuda_only_branches_on_the_cpu(nca, tmp_path, monkeypatch, capsys):
    """On CUDA the loop fuses AdamW and prints MFU: force both here, and the updates stay those of the plain run."""
    args = ['--stage=dyck', '--max_iters=3', '--eval_interval=3', '--learning_rate=3e-3', '--warmup_iters=0']
    train(nca, *args, f'--out_dir={tmp_path / "plain"}')
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, 'AdamW', lambda *a, **k: adamw(*a, **{**k, 'fused': True}))
    monkeypatch.setattr(nca, 'peak_flops_per_s', lambda device: 1e12)
    capsys.readouterr()
    train(nca, *args, f'--out_dir={tmp_path / "fused"}')
    assert capsys.readouterr().out.count('| mfu ') == 3
    plain, fused = train_losses(tmp_path / 'plain'), train_losses(tmp_path / 'fused')
    assert len(plain) == 3 and all(abs(fused[k] - plain[k]) < 1e-5 for k in plain), (plain, fused)


@pytest.mark.parametrize('name,shape,count', [('small', (12, 12, 768), '113.3M'), ('paper', (24, 32, 2048), '1.61B')])
def test_preset_shapes_and_parameter_counts_match_readme(nca, name, shape, count):
    nca.configure([f'--preset={name}', '--stage=nca'])
    with torch.device('meta'):  # shapes only: the paper's model would take 6.6 GB here
        model = nca.GPT(10048, nca.n_layer, nca.n_head, nca.n_embd, nca.block_size, nca.dropout)
    L, H, C = shape
    assert (nca.n_layer, nca.n_head, nca.n_embd, nca.block_size) == (L, H, C, 1024)
    blocks = sum(p.numel() for p in model.parameters()) - 2 * model.wte.weight.numel()
    assert blocks == L * (16 * C * C + 2 * C) + C  # a block: attention 4 C^2, SwiGLU (hidden 4C) 12 C^2, two norms
    assert count == (f'{blocks / 1e6:.1f}M' if blocks < 1e9 else f'{blocks / 1e9:.2f}B')
    row = next(line for line in open(os.path.join(ROOT, 'README.md')) if line.startswith(f'| {name} |'))
    assert f'{L} layers, width {C}, {H} heads ({count} parameters without embedding and head' in row


MEASURE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import nca_gpt

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key + ':'))

nca_gpt.configure(sys.argv[2:])
nca_gpt.get_batch('train', 0), nca_gpt.get_batch('val', 0)  # rule sets built, code paths warm: not the run's memory
estimate, needed = [], nca_gpt.memory_needed
nca_gpt.memory_needed = lambda *args: estimate.append(needed(*args)) or estimate[0]
open('/proc/self/clear_refs', 'w').write('5')  # the peak RSS starts again from the current RSS
before = status('VmRSS')
nca_gpt.train()
print(json.dumps(dict(estimate=estimate[0], measured=status('VmHWM') - before)))
'''


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='measures the peak RSS through Linux /proc')
@pytest.mark.parametrize('shape', [
    ['--dyck_k=5024', '--n_layer=2', '--n_embd=128'],      # NCA's vocabulary of 10,048: the logits weigh most (tiny)
    ['--n_layer=6', '--n_embd=256', '--dtype=bfloat16'],  # the layers weigh most, in bf16 (as in the small preset)
])
def test_memory_estimate_is_within_2x_of_the_measured_peak(tmp_path, shape):
    # glibc then maps big blocks apart and returns them on free, so that RSS follows the live tensors (as CUDA's
    # allocator counts them) rather than the heap glibc keeps
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    p = subprocess.run([sys.executable, '-c', MEASURE, ROOT, '--stage=dyck', '--preset=tiny', '--device=cpu',
                        '--batch_size=16', '--eval_iters=1', '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path}',
                        *shape], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.splitlines()[-1])
    print(f"estimate {r['estimate'] / 2**30:.2f} GiB, measured peak {r['measured'] / 2**30:.2f} GiB")  # pytest -s
    assert r['estimate'] > 3e8 and 0.5 < r['estimate'] / r['measured'] < 2, r


def test_a_run_that_cannot_fit_is_refused(tmp_path, monkeypatch, nca):
    p = run(*FAST, '--stage=dyck', '--batch_size=100000000', f'--out_dir={tmp_path}', check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'memory: about' in p.stdout
    assert 'GiB free: lower --batch_size (raise --gradient_accumulation_steps' in p.stderr, p.stderr


@pytest.mark.parametrize('free_gib,fits', [(1024, True), (0.001, False)])
def test_a_gpus_free_memory_decides(tmp_path, monkeypatch, nca, capsys, free_gib, fits):
    """On CUDA the free memory comes from mem_get_info (free, total): the run goes on, or is refused, by the free
    bytes, not the total (80 GiB here either way). The CUDA branch of free_memory runs with only torch's call faked."""
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (int(free_gib * 2**30), 80 * 2**30))
    cuda_free = nca.free_memory
    monkeypatch.setattr(nca, 'free_memory', lambda device: cuda_free('cuda:0'))  # the rest of the run on the CPU
    args = ['--stage=dyck', '--max_iters=1', '--eval_interval=1', f'--out_dir={tmp_path}']
    if fits:
        train(nca, *args)
        assert '; 1024.0 GiB free' in capsys.readouterr().out and list(train_losses(tmp_path)) == [1]
    else:
        with pytest.raises(SystemExit, match=r'has 0\.0 GiB free: lower --batch_size'):
            train(nca, *args)
        assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_gpu_check_dry_run(tmp_path):
    # as the compile test: 2 cores, and its kernels cached; the interpreter running the tests, venv activated or not
    env = {**os.environ, 'TORCHINDUCTOR_COMPILE_THREADS': '1', 'PYTHON': sys.executable}
    p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'gpu_check.sh'), '--dry_run', f'--out={tmp_path / "r.json"}'],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert 'measures nothing' in p.stdout
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['dry_run'] is True and 'measure nothing' in r['note']
    eager, compiled = r['train']
    assert (eager['compile'], compiled['compile'], eager['updates'], r['resume']['updates']) == (False, True, 4, 6)
    assert compiled['train_loss'] == pytest.approx(eager['train_loss'], abs=1e-4)
    assert all(v > 0 for v in (r['nca_data']['tokens_per_s'], compiled['tokens_per_s'], compiled['seconds_to_first_update'],
                               r['main_job']['estimated_seconds'], r['humaneval']['new_tokens_per_s']))
    assert (r['main_job']['tokens'], r['main_job']['epochs'], len(r['humaneval']['seconds_per_problem'])) == (163840000, 10, 3)
    if not torch.cuda.is_available():
        p = subprocess.run(['bash', os.path.join(ROOT, 'tests', 'gpu_check.sh')], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, env=env)
        assert p.returncode != 0 and 'no GPU here' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]


def test_small_preset_one_short_update_on_the_cpu(tmp_path):
    """The small preset's model (12 layers, width 768) and optimiser, one update of one 256-token sequence, no
    compile: the main job's code path in the default run (the full 1024-token update is the slow test below)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'nca_gpt.py'), '--stage=nca', '--preset=small', '--device=cpu',
                        '--compile=false', '--batch_size=1', '--gradient_accumulation_steps=1', '--block_size=256',
                        '--max_iters=1', '--eval_iters=1', '--log_interval=1', '--num_rules=64', '--num_val_rules=16',
                        f'--out_dir={tmp_path}'], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'stage nca, preset small' in p.stdout and '128.70M parameters (113.27M without embedding and head)' in p.stdout
    assert list(train_losses(tmp_path)) == [1] and math.isfinite(train_losses(tmp_path)[1])


@pytest.mark.slow
def test_small_preset_one_update_on_the_cpu(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'nca_gpt.py'), '--stage=nca', '--preset=small', '--device=cpu',
                        '--batch_size=1', '--gradient_accumulation_steps=1', '--max_iters=1', '--eval_iters=1',
                        '--log_interval=1', '--num_rules=64', '--num_val_rules=16', f'--out_dir={tmp_path}'],
                       capture_output=True, text=True, timeout=3600)  # 80 s on 2 idle cores; far more when shared
    assert p.returncode == 0, p.stderr[-3000:]
    assert '128.70M parameters (113.27M without embedding and head)' in p.stdout
    assert list(train_losses(tmp_path)) == [1] and math.isfinite(train_losses(tmp_path)[1])


@pytest.mark.slow
@needs_compiler
def test_compiled_bf16_with_dropout_resumes(nca, tmp_path):
    """The paper preset's combination on a GPU: compile, bf16 and attention dropout; then a resume."""
    args = ['--stage=nca', '--compile=true', '--dtype=bfloat16', '--dropout=0.1', '--eval_interval=3']
    train(nca, *args, '--max_iters=3', f'--out_dir={tmp_path}')
    train(nca, *args, '--max_iters=5', '--init_from=resume', f'--out_dir={tmp_path}')
    losses = train_losses(tmp_path)
    assert list(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(v) and 8 < v < 10 for v in losses.values()), losses


def test_torchrun_with_one_named_gpu_is_refused(nca, monkeypatch):
    """Under torchrun, 'cuda' becomes each process's cuda:LOCAL_RANK; an explicit cuda:0 would put every process on
    one GPU, so it is refused in one line (one process may name its GPU)."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match='would put all 2 processes on one GPU: give --device=cuda') as e:
        nca.check_device('cuda:0')
    assert '\n' not in str(e.value.code)
    monkeypatch.setenv('WORLD_SIZE', '1')
    if torch.cuda.is_available():
        nca.check_device('cuda:0')
    else:  # one process: the ordinary check, which a machine without a GPU fails
        with pytest.raises(SystemExit, match='is not available on this machine'):
            nca.check_device('cuda:0')
    nca.check_device('cpu')
