"""lm-evaluation-harness end to end on an `eval.py export` folder: its log-likelihoods are this GPT's.
Skipped, saying why, where lm-eval (with its hf backend) is not installed: CI does not install it (about 100 s and
650 MB of packages; README: "Use with transformers and lm-evaluation-harness")."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
import nca_gpt

lm_eval = pytest.importorskip('lm_eval', reason="lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')")
pytest.importorskip('transformers', reason="lm-eval's hf backend needs transformers")
from eval import export_hf  # noqa: E402


def random_byte_model():
    """A small byte-level GPT with every parameter random (norms too): a swapped weight would show."""
    args = dict(vocab_size=320, n_layer=2, n_head=4, n_embd=64, block_size=256, dropout=0.0, head_bias=False,
                emb_init='normal', scale_residual=True)
    torch.manual_seed(0)
    model = nca_gpt.GPT(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
    checkpoint = dict(model=model.state_dict(), model_args=args, vocab=dict(kind='bytes', size=257), stage='lm',
                      iter_num=0, best_val_loss=float('inf'), config={})
    return checkpoint, model.eval()


def loglikelihood(model, context, continuation):
    """As lm-eval scores a pair: the context's trailing whitespace moves to the continuation; sum of log-probs."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    c, t = list(context.encode('utf-8')), list(continuation.encode('utf-8'))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([c + t])[:, :-1])[0][0], -1)
    return sum(logp[len(c) - 1 + i, token].item() for i, token in enumerate(t))


def test_lm_eval_scores_an_export_as_this_gpt_does(tmp_path):
    checkpoint, model = random_byte_model()
    export_hf(checkpoint, tmp_path / 'hf')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    cmd = [sys.executable, '-m', 'lm_eval', '--model', 'hf', '--model_args',
           f'pretrained={tmp_path / "hf"},dtype=float32', '--tasks', 'python_bytes', '--include_path',
           'docs/lm-eval-task', '--device', 'cpu', '--batch_size', '1', '--log_samples',
           '--output_path', str(tmp_path / 'out')]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    samples = glob.glob(str(tmp_path / 'out' / '**' / 'samples_python_bytes*.jsonl'), recursive=True)
    assert len(samples) == 1
    worst, count = 0.0, 0
    for line in open(samples[0]):
        row = json.loads(line)
        for args, resp in zip(row['arguments'].values(), row['resps']):
            ours = loglikelihood(model, args['arg_0'], args['arg_1'])
            worst = max(worst, abs(ours - float(resp[0][0])))
            count += 1
    assert count == 30 and worst < 1e-4, (count, worst)
