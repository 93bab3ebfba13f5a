"""The measurements only a GPU can make, in one go (tests/gpu_check.sh runs it; meant to take under 8 minutes on
one H100/H200).

    bash tests/gpu_check.sh [--out=gpu_check.json] [--dry_run]

It runs the main job's code itself (nca_gpt.train() at the small preset, in this process) and writes one JSON:
  nca_data   building the rule sets, and NCA batches of 32 x 1024 tokens made on the GPU: tokens/s
  train      compile off and on: tokens/s, MFU, peak memory (with nca_gpt.py's estimate), time to the first
             update (model build, compile and the step-0 evaluation included), the loss of a short run
  resume     the compiled run continued from its checkpoint (CUDA's random state restored)
  main_job   `python nca_gpt.py --stage nca` (5,000 updates, 164M tokens) at the rates above: an estimate
  humaneval  sampling time of eval.py at the protocol's settings (64 samples, T 0.4, top-p 0.95, up to 500
             tokens) for a few problems, with an untrained model (it rarely stops early: the slow case)
--dry_run: tiny shapes on whatever device there is (the CPU in CI) to prove the script runs; its numbers measure
nothing.
"""
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import nca_gpt  # noqa: E402

# GPT-2's ranks for tiktoken offline: TIKTOKEN_CACHE_DIR or NCA_TIKTOKEN_CACHE as the tests read them (conftest.py);
# else a shared/tiktoken-cache in or beside the checkout, where a GPU machine's copy of the tree may carry one
for _cache in (os.environ.get('NCA_TIKTOKEN_CACHE'), os.path.join(ROOT, 'shared', 'tiktoken-cache'),
               os.path.join(ROOT, '..', 'shared', 'tiktoken-cache')):
    if _cache and os.path.isdir(_cache):
        os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.abspath(_cache))
DEFAULTS = {k: getattr(nca_gpt, k) for k in nca_gpt.config_keys}  # configure() layers on what is there: reset first
DRY = '--dry_run' in sys.argv
# the main job's settings, shortened by each run below; --warmup_iters=20 so that a short run's loss can fall
MAIN = ['--stage=nca', '--preset=small', '--log_interval=1', '--warmup_iters=20']
if DRY:  # test_train.py's tiny shapes
    MAIN = ['--stage=nca', '--preset=tiny', '--log_interval=1', '--block_size=114', '--batch_size=4', '--num_rules=64',
            '--num_val_rules=16', '--eval_iters=2', '--n_layer=2', '--n_embd=32']
PROBLEMS = [  # HumanEval-style prompts, for a machine without data/humaneval (the timing needs no tests)
    dict(task_id=f'fake/{i}', prompt=f'def {name}({args}):\n    """{doc}"""\n')
    for i, (name, args, doc) in enumerate([('add', 'a: int, b: int', 'Return the sum of a and b.'),
                                           ('is_palindrome', 's: str', 'Return True if s reads the same backwards.'),
                                           ('below_zero', 'ops: list', 'True if the running sum of ops drops below 0.')])]


def sync():
    if nca_gpt.device.startswith('cuda'):
        torch.cuda.synchronize()


def configure(args):
    for k, v in DEFAULTS.items():
        setattr(nca_gpt, k, v)
    nca_gpt.configure(args)
    nca_gpt.device = nca_gpt.device or nca_gpt.devices()[0]


def watch(name, calls):
    """Make nca_gpt.NAME append (end time, seconds, args, result) to calls: train() looks it up at each call."""
    fn = getattr(nca_gpt, name)

    def timed(*args):
        t0 = time.time()
        out = fn(*args)
        calls.append((time.time(), time.time() - t0, args, out))
        return out
    setattr(nca_gpt, name, timed)
    return fn


def train_run(args):
    """nca_gpt.train() at the main job's settings plus args -> speed, memory and losses of what it logged."""
    configure(MAIN + args)
    logged, evals, saves, estimate = [], [], [], []
    originals = {name: watch(name, calls) for name, calls in
                 [('log_write', logged), ('evaluate', evals), ('atomic_write', saves), ('memory_needed', estimate)]}
    cuda = nca_gpt.device.startswith('cuda')
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        nca_gpt.train()
    finally:
        for name, fn in originals.items():
            setattr(nca_gpt, name, fn)
    steps = [(end, args[1]) for end, _, args, _ in logged if 'loss' in args[1]]  # log_write(log, record)
    val = [args[1]['val_loss'] for _, _, args, _ in logged if 'val_loss' in args[1]]
    tok_s = statistics.median(r['tok_per_s'] for _, r in steps[len(steps) // 3:])  # once compiled and warm
    with torch.device('meta'):  # the model's shape, for its FLOPs, without allocating it
        model = nca_gpt.GPT(-(-nca_gpt.stage_vocab()['size'] // 64) * 64, nca_gpt.n_layer, nca_gpt.n_head,
                            nca_gpt.n_embd, nca_gpt.block_size)
    peak = nca_gpt.peak_flops_per_s(nca_gpt.device)
    return dict(
        compile=nca_gpt.compile, dtype=nca_gpt.dtype, updates=steps[-1][1]['step'],
        tokens_per_update=nca_gpt.tokens_per_iter(), tokens_per_s=tok_s,
        mfu=model.flops_per_token(nca_gpt.block_size) * tok_s / peak if peak else None,
        seconds_to_first_update=steps[0][0] - t0,  # log_interval=1: logged right after update 1
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        memory_estimate_gib=estimate[0][3] / 2**30,
        eval_seconds=[t for _, t, _, _ in evals], checkpoint_seconds=[t for _, t, _, _ in saves],
        train_loss=[steps[0][1]['loss'], steps[-1][1]['loss']], val_loss=[val[0], val[-1]],
        seconds=time.time() - t0)


def nca_data():
    """Building the rule sets (cached: the runs below reuse them; validation first, so that the training set's
    time, which the main job pays each epoch, is that of a warm device), then batches."""
    configure(MAIN)
    t0 = time.time()
    cfg = nca_gpt.data_config('nca')
    nca_gpt.rule_set(cfg, 'val', 0)
    build_val = time.time() - t0
    nca_gpt.rule_set(cfg, 'train', 0)
    build_train = time.time() - t0 - build_val
    nca_gpt.nca_batch(cfg, 'train', 0, nca_gpt.batch_size)  # warm-up
    sync()
    t0, n = time.time(), 3 if DRY else 20
    for i in range(n):
        nca_gpt.nca_batch(cfg, 'train', 1 + i, nca_gpt.batch_size)
    sync()
    return dict(rule_set_seconds=build_train, val_rule_set_seconds=build_val, batch_size=nca_gpt.batch_size,
                block_size=nca_gpt.block_size, tokens_per_s=n * nca_gpt.batch_size * nca_gpt.block_size / (time.time() - t0))


def main_job(data, compiled):
    """The whole `--stage nca --preset=small` run at the measured rates: an estimate, not a measurement."""
    configure(['--stage=nca', '--preset=small'])  # the real job's length, whatever the dry run's shapes
    updates, tokens = nca_gpt.max_iters, nca_gpt.max_iters * nca_gpt.tokens_per_iter()
    n_evals = updates // nca_gpt.eval_interval + 1
    epochs = -(-updates * nca_gpt.tokens_per_iter() // nca_gpt.block_size // nca_gpt.num_rules)  # a rule set each
    later = lambda v: statistics.median(v[1:] or v)  # noqa: E731  (the first evaluation compiles)
    parts = dict(rule_sets=epochs * data['rule_set_seconds'] + data['val_rule_set_seconds'],
                 to_first_update=compiled['seconds_to_first_update'],
                 updates=tokens / compiled['tokens_per_s'],
                 evaluations=n_evals * later(compiled['eval_seconds']),
                 checkpoints=n_evals * later(compiled['checkpoint_seconds']))
    return dict(updates=updates, tokens=tokens, epochs=epochs, evaluations=n_evals,
                estimated_seconds=sum(parts.values()), parts_seconds=parts)


@torch.no_grad()
def humaneval(n_problems):
    """eval.py's sampling at the HumanEval protocol, with an untrained model of the small preset's shape."""
    path = os.path.join(ROOT, 'data', 'humaneval', 'test.jsonl')
    problems = [json.loads(line) for line in open(path)][:n_problems] if os.path.exists(path) else PROBLEMS[:n_problems]
    n, temp, top_p, max_new, stops = ev.PROTOCOL['humaneval']
    if DRY:
        n, max_new = 4, 8
    ev.device, ev.batch_size = nca_gpt.device, 64
    ev.dtype = 'bfloat16' if nca_gpt.device.startswith('cuda') else 'float32'
    shape = (2, 2, 32) if DRY else (nca_gpt.n_layer, nca_gpt.n_head, nca_gpt.n_embd)
    torch.manual_seed(0)
    model = nca_gpt.GPT(50304, *shape, 1024).to(nca_gpt.device).eval()
    enc, seconds, new_tokens = nca_gpt.gpt2_encoding(), [], 0
    for i, pr in enumerate(problems):
        t0 = time.time()
        outs = ev.sample(model, enc.encode_ordinary(pr['prompt']), n, max_new, temp, top_p, 0, stops, i)
        sync()
        seconds.append(time.time() - t0)
        new_tokens += sum(len(enc.encode_ordinary(o)) for o in outs)
    return dict(problems=[p['task_id'] for p in problems], samples_per_problem=n, max_new_tokens=max_new,
                seconds_per_problem=seconds, new_tokens_per_s=new_tokens / sum(seconds),
                estimated_minutes_for_164_problems=164 * statistics.mean(seconds) / 60)


def main():
    bad = [a for a in sys.argv[1:] if a != '--dry_run' and not a.startswith('--out=')]
    if bad:
        sys.exit(f"gpu_check: cannot read {bad[0]!r}: the options are --out=PATH and --dry_run")
    if not DRY and not torch.cuda.is_available():
        sys.exit("gpu_check: no GPU here; `bash tests/gpu_check.sh --dry_run` checks the script on the CPU")
    out = next((a[len('--out='):] for a in sys.argv[1:] if a.startswith('--out=')), 'gpu_check.json')
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), dry_run=DRY,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                  torch=torch.__version__, command=' '.join(['bash tests/gpu_check.sh'] + sys.argv[1:]))
    if DRY:
        result['note'] = 'a dry run: tiny shapes; the numbers prove that the script runs and measure nothing'

    def save(section, value):  # after each part: a failure later keeps what was measured
        result[section] = value
        print(f"gpu_check: {section} {json.dumps(value)}", flush=True)
        nca_gpt.atomic_write(out, lambda tmp: json.dump(result, open(tmp, 'w'), indent=1))

    n_eager, n_compiled, n_more = (4, 4, 2) if DRY else (40, 150, 20)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        save('nca_data', nca_data())
        save('train', [train_run(['--compile=false', f'--max_iters={n_eager}', f'--eval_interval={n_eager}',
                                  f'--out_dir={tmp}/eager'])])
        save('train', result['train'] + [train_run(['--compile=true', f'--max_iters={n_compiled}',
                                                    f'--eval_interval={n_compiled // 2}', f'--out_dir={tmp}/compiled'])])
        save('resume', train_run(['--compile=true', f'--max_iters={n_compiled + n_more}', '--init_from=resume',
                                  f'--eval_interval={n_compiled // 2}', f'--out_dir={tmp}/compiled']))
        save('main_job', main_job(result['nca_data'], result['train'][1]))
        configure(MAIN)
        save('humaneval', humaneval(3))
    save('seconds', time.time() - t0)
    print(f"gpu_check: wrote {out}" + (" (a dry run: it measures nothing)" if DRY else ''))


if __name__ == '__main__':
    main()
