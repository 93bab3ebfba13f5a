"""Sampling speed of eval.py: batched decoding with the key/value cache against recomputing the whole sequence
each step (run by hand).

    python tests/bench_eval.py [--shape=small] [--batch=64] [--prompt=150] [--new=100]

Prints new tokens/s both ways and what HumanEval at the paper's protocol (164 problems x 64 samples, ~200 new
tokens each on average, at most 500) would take at that rate.

    python tests/bench_eval.py --canonical=canonical.jsonl [--data_dir=data]

writes HumanEval's canonical solutions as completions (one {task_id, completion} row a problem, from
data/humaneval/test.jsonl) and exits: the samples of the sandbox timing, `python eval.py humaneval
--samples=canonical.jsonl --sandbox=bwrap` (then --sandbox=guards), which should score pass@1 1.0.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import nca_gpt  # noqa: E402

SHAPES = {'tiny': (2, 2, 64), 'small': (12, 12, 768), 'paper': (24, 32, 2048)}


def write_canonical(out, data_dir):
    src = os.path.join(data_dir, 'humaneval', 'test.jsonl')
    if not os.path.exists(src):
        sys.exit(f"no {src}: run `python prepare_data.py humaneval` first")
    rows = [json.loads(line) for line in open(src) if line.strip()]
    with open(out, 'w') as f:
        f.writelines(json.dumps(dict(task_id=r['task_id'], completion=r['canonical_solution'])) + '\n' for r in rows)
    print(f"wrote {out}: the canonical solutions of {len(rows)} problems")


def main():
    opts = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    if 'canonical' in opts:
        return write_canonical(opts['canonical'], opts.get('data_dir', 'data'))
    shape, B = opts.get('shape', 'small'), int(opts.get('batch', 64))
    n_prompt, n_new = int(opts.get('prompt', 150)), int(opts.get('new', 100))
    ev.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    ev.dtype = 'bfloat16' if ev.device == 'cuda' else 'float32'
    ev.batch_size = B
    n_layer, n_head, n_embd = SHAPES[shape]
    model = nca_gpt.GPT(50304, n_layer, n_head, n_embd, 1024).to(ev.device).eval()
    prompt = list(range(1000, 1000 + n_prompt))
    sync = torch.cuda.synchronize if ev.device == 'cuda' else (lambda: None)
    print(f"$ python tests/bench_eval.py {' '.join(sys.argv[1:])}\n{shape} model on {ev.device} ({ev.dtype}), "
          f"batch {B}, prompt {n_prompt}, {n_new} new tokens")
    ev.sample(model, prompt, B, 4, 1.0, 0.95, 0, [], 0)  # warm-up
    sync()
    t0 = time.time()
    ev.sample(model, prompt, B, n_new, 1.0, 0.95, 0, [], 0)  # no stop strings: all n_new steps
    sync()
    cached = B * n_new / (time.time() - t0)
    idx = torch.tensor([prompt] * B, device=ev.device)
    t0 = time.time()
    with torch.no_grad(), ev.autocast():
        for _ in range(min(n_new, 20)):  # no cache: the whole sequence every step (20 steps are enough to time)
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    sync()
    plain = B * min(n_new, 20) / (time.time() - t0)
    print(f"with the cache:    {cached:10,.0f} new tokens/s\nwithout (plain):   {plain:10,.0f} new tokens/s "
          f"(first 20 steps only; slower as the sequence grows)")
    print(f"HumanEval, 164 x 64 samples x ~200 tokens: {164 * 64 * 200 / cached / 60:,.1f} min at this rate")


if __name__ == '__main__':
    main()
