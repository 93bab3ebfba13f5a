"""Tokenisation speed of prepare_data.py: one thread against all cores, in one run (by hand).

    python tests/bench_prepare.py [--mb=50]

Encodes `mb` MB of synthetic English-like text with tiktoken's GPT-2 ranks, as prepare_data.py does (batches of
1,024 documents through encode_ordinary_batch), once with num_threads=1 and once with all cores.
"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare_data  # noqa: E402


def main():
    opts = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    mb = float(opts.get('mb', 50))
    rng = random.Random(0)
    words = [''.join(rng.choice('etaoinshrdlucmfwypvbgkjqxz') for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    docs, size = [], 0
    while size < mb * 1e6:
        doc = ' '.join(rng.choice(words) for _ in range(rng.randint(50, 800))) + '.\n'
        docs.append(doc)
        size += len(doc)
    enc = prepare_data.gpt2_encoding()
    print(f"$ python tests/bench_prepare.py {' '.join(sys.argv[1:])}\n{len(docs):,} documents, {size / 1e6:.0f} MB, "
          f"{os.cpu_count()} cores")
    for threads in sorted({1, os.cpu_count()}):
        t0, n = time.time(), 0
        for i in range(0, len(docs), 1024):
            n += sum(len(t) for t in enc.encode_ordinary_batch(docs[i:i + 1024], num_threads=threads))
        dt = time.time() - t0
        print(f"num_threads={threads:<3} {n / dt:>12,.0f} tokens/s  {size / 1e6 / dt:6.1f} MB/s")


if __name__ == '__main__':
    main()
