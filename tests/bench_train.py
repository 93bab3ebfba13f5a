"""Training speed: nca_gpt.py's loop against the plainest loop of the same shape (run by hand).

    python tests/bench_train.py [--presets=tiny,small] [--iters=30]
    python tests/bench_train.py --lm=pystdlib,pystdlib-gpt2     # the lm stage of the tiny preset on each dataset

For each preset (and compile off/on on CUDA) it runs `nca_gpt.py --stage nca` (or, with --lm, `--stage lm` on each
of those prepared datasets, with the tiny preset: bytes against GPT-2 tokens) for `iters` updates and,
in the same process, a nanoGPT-style loop written as plainly as possible around the same model and the
same batches: get batch, forward, backward, clip, step. It prints tokens/s, MFU (on a known GPU) and the
ratio; the target is a ratio of 1.0 or more (the loop adds nothing that costs).
"""
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nca_gpt  # noqa: E402


def plain_loop(iters):
    """The same model and data, no scaler, no logging, no checkpoints, no schedule."""
    g = nca_gpt
    model = g.GPT(-(-g.stage_vocab()['size'] // 64) * 64, g.n_layer, g.n_head, g.n_embd, g.block_size).to(g.device)
    opt = torch.optim.AdamW(model.parameters(), lr=g.learning_rate, fused=g.device == 'cuda')
    step = torch.compile(model) if g.compile else model
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if g.device == 'cuda' else torch.autocast('cpu', enabled=False)
    times = []
    for it in range(iters):
        t0 = time.time()
        for micro in range(g.gradient_accumulation_steps):
            x, y = g.get_batch('train', it * g.gradient_accumulation_steps + micro)
            with ctx:
                _, loss = step(x, y)
            (loss / g.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the GPU, as the loop's log line does
        times.append(time.time() - t0)
    dt = sorted(times[len(times) // 3:])[len(times[len(times) // 3:]) // 2]  # median after warm-up/compile
    return g.tokens_per_iter() / dt, model


def main():
    opts = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    cuda = torch.cuda.is_available()
    presets = opts.get('presets', 'tiny,small' if cuda else 'tiny').split(',')
    iters = int(opts.get('iters', 30))
    print(f"$ python tests/bench_train.py {' '.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} threads"))
    runs = [(p, ['--stage=nca']) for p in presets]
    if 'lm' in opts:
        runs = [('tiny', ['--stage=lm', f'--dataset={d}']) for d in opts['lm'].split(',')]
    print(f"{'run':<28}{'compile':<9}{'loop tok/s':>12}{'plain tok/s':>13}{'ratio':>7}{'MFU':>7}")
    for preset, stage in runs:
        for comp in ([False, True] if cuda else [False]):
            with tempfile.TemporaryDirectory() as out:
                nca_gpt.configure([*stage, f'--preset={preset}', f'--max_iters={iters}', f'--eval_interval={10 ** 9}',
                                   '--log_interval=1', f'--out_dir={out}', f'--compile={comp}', '--eval_iters=1'])
                nca_gpt.device = 'cuda' if cuda else 'cpu'
                nca_gpt.train()
                rates = [json.loads(line)['tok_per_s'] for line in open(os.path.join(out, 'log.jsonl')) if '"loss"' in line]
                ours = sorted(rates[len(rates) // 3:])[len(rates[len(rates) // 3:]) // 2]
                plain, model = plain_loop(iters)
                peak = nca_gpt.peak_flops_per_s(nca_gpt.device)
                mfu = f"{model.flops_per_token(nca_gpt.block_size) * ours / peak:.1%}" if peak else '-'
                name = preset + (f" {nca_gpt.dataset} ({nca_gpt.vocab['kind']})" if nca_gpt.stage == 'lm' else '')
                print(f"{name:<28}{str(comp):<9}{ours:>12,.0f}{plain:>13,.0f}{ours / plain:>7.2f}{mfu:>7}", flush=True)


if __name__ == '__main__':
    main()
