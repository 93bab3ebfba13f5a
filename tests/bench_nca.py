"""Speed of the NCA data engine at the paper's settings (run by hand; pytest does not collect it).

    python tests/bench_nca.py [--batch_sizes=32,256] [--filter_rules=2048] [--repeats=5]

Prints tokens/s of generation + tokenisation of 1024-token sequences and rules/s of the gzip filter, on
the CPU (all its threads; `taskset -c 0` for one core) and on CUDA when present: the best of `repeats`
timed calls after a warm-up, as the machine may be shared. Against the authors' JAX generator, measured
side by side in one run (both on one pinned core, JAX's compile time taken out): `bash tests/bench_vs_authors.sh
PATH_TO_AUTHORS_CLONE`. On the 2-core dev machine, 2026-11-28, 3 runs on the final code: generation + tokenisation 9.4-10.4x
the authors' (1.96-2.45M vs 207-261k tokens/s), the filter 9.2-10.3x (3,334-3,579 vs 347-383 rules/s); unpinned
(speed.sh unpinned; bench_vs_authors.sh --cpus=: both sides then use both cores) 8.9x and 9.0x (docs/speed.md).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nca_gpt  # noqa: E402


def timed(fn, repeats):
    """Seconds of the fastest of `repeats` calls fn(i), after a warm-up call (it builds the rule set)."""
    fn()
    best = float('inf')
    for i in range(repeats):
        if nca_gpt.device == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(i)
        if nca_gpt.device == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    opts = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    batch_sizes = [int(b) for b in opts.get('batch_sizes', '32,256').split(',')]
    n_filter = int(opts.get('filter_rules', 2048))
    repeats = int(opts.get('repeats', 5))
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    print(f"$ python tests/bench_nca.py {' '.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads on {len(os.sched_getaffinity(0))} CPUs"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ''))
    print(f"{'device':<6} {'what':<34} {'rate':>16}")
    for dev in devices:
        nca_gpt.device = dev
        cfg, dyck = nca_gpt.data_config('nca'), nca_gpt.data_config('dyck')
        for B in batch_sizes:
            sec = timed(lambda i=0: nca_gpt.nca_batch(cfg, 'train', i, B), repeats if dev == 'cpu' else 4 * repeats)
            print(f"{dev:<6} {f'nca_batch, {B} x 1024 tokens':<34} {B * nca_gpt.block_size / sec:>10,.0f} tok/s")
            if dev == 'cuda':
                print(f"{dev:<6} {'  -> 164M tokens in':<34} {164e6 / (B * nca_gpt.block_size / sec):>14.1f} s")

        def filter_once(i=0):
            keys, rules = nca_gpt.candidate_rules('train', 1 + i, 0, n_filter, cfg)
            nca_gpt.rule_complexity(rules, keys, cfg)
        sec = timed(filter_once, repeats)
        print(f"{dev:<6} {f'filter, {n_filter} candidates':<34} {n_filter / sec:>9,.0f} rules/s")
        if hasattr(nca_gpt, 'rollout_plain'):  # the rule network as written (convs), in place of the lookup table
            fast = nca_gpt.rollout
            nca_gpt.rollout = nca_gpt.rollout_plain
            for B in batch_sizes:
                sec = timed(lambda i=0: nca_gpt.nca_batch(cfg, 'train', i, B), repeats)
                print(f"{dev:<6} {f'  the same, rollout_plain, {B} x 1024':<34} {B * nca_gpt.block_size / sec:>10,.0f} tok/s")
            nca_gpt.rollout = fast
        sec = timed(lambda i=0: nca_gpt.dyck_batch(dyck, 'train', i, 32), repeats)
        print(f"{dev:<6} {'dyck_batch, 32 x 1024 tokens':<34} {32 * nca_gpt.block_size / sec:>10,.0f} tok/s")


if __name__ == '__main__':
    main()
