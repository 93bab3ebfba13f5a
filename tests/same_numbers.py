"""Compare two folders written by tests/same_numbers.sh: every number the same, bit for bit?

    python tests/same_numbers.py /tmp/before /tmp/after

Logs and evaluation JSON are compared value by value (wall-clock fields left out), checkpoints tensor by tensor
(weights, optimiser moments, random states), data files byte by byte, printed lines with their timings masked.
A config key present on one side only is listed, not counted as a difference (a new option, say). Exit 1 on
any difference."""
import json
import os
import re
import sys

import torch

TIMING = {'time', 'tok_per_s', 'seconds'}
differences, notes = [], []


def rooted(x, root):
    """x with the folder's own path replaced by OUT, in every string it holds."""
    if isinstance(x, str):
        return x.replace(root, 'OUT')
    if isinstance(x, dict):
        return {rooted(k, root): rooted(v, root) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(rooted(v, root) for v in x)
    return x


def same(a, b, where):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in TIMING:
                continue
            if k not in a or k not in b:
                (notes if 'config' in where else differences).append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
                continue
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            differences.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            differences.append(f"{where}: tensors differ")
    elif a != b and not (a != a and b != b):  # NaN == NaN here
        differences.append(f"{where}: {a!r} vs {b!r}")


def masked(text, root):
    text = text.replace(root, 'OUT')
    text = re.sub(r'\d[\d,.]* ?(tokens/s|tok/s|min|s\b|ms|GiB|GB)', r'# \1', text)
    text = re.sub(r'mfu [\d.]+%|eta [\d.]+', '#', text)
    return [line for line in text.splitlines() if not line.startswith('config:')]


def main(before, after):
    for dirpath, _, files in os.walk(before):
        for f in sorted(files):
            a = os.path.join(dirpath, f)
            rel = os.path.relpath(a, before)
            b = os.path.join(after, rel)
            if not os.path.exists(b):
                differences.append(f"{rel}: missing after")
            elif f.endswith('.pt'):
                a_ckpt, b_ckpt = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
                same(rooted(a_ckpt, before), rooted(b_ckpt, after), rel)
            elif f.endswith('.jsonl'):
                same(rooted([json.loads(x) for x in open(a)], before), rooted([json.loads(x) for x in open(b)], after), rel)
            elif f.endswith('.json'):
                ja, jb = rooted(json.load(open(a)), before), rooted(json.load(open(b)), after)
                same(ja, jb, rel)
            elif f.endswith('.stdout'):
                la, lb = masked(open(a).read(), before), masked(open(b).read(), after)
                if la != lb:
                    diff = [f"    - {x}\n    + {y}" for x, y in zip(la, lb) if x != y][:3]
                    differences.append(f"{rel}: printed lines differ ({len(la)} vs {len(lb)} lines)\n" + '\n'.join(diff))
            elif open(a, 'rb').read() != open(b, 'rb').read():
                differences.append(f"{rel}: bytes differ")
    for n in notes:
        print('note:', n)
    for d in differences:
        print('DIFFERENT:', d)
    print(f"{'same numbers' if not differences else f'{len(differences)} differences'}: {before} vs {after}")
    sys.exit(1 if differences else 0)


if __name__ == '__main__':
    main(*sys.argv[1:3])
