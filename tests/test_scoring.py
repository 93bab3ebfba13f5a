"""eval.py's scores on hand-made completions, right and wrong: GSM8K (both styles) and BIG-bench Lite (pass@k,
chance-normalised), through the real scoring code, against values worked out by hand; and sampling never draws
an id that only pads the embedding. CPU, offline, seconds."""
import json

import pytest
import torch

from conftest import ROOT  # noqa: F401 (puts the repository on sys.path)
import eval as ev
import nca_gpt


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


@pytest.fixture
def scored(tmp_path, monkeypatch):
    """eval.py's task functions with sample_all replaced by fixed completions: -> a function (task, completions)."""
    monkeypatch.setattr(ev, 'data_dir', str(tmp_path))
    monkeypatch.setattr(ev, 'limit', 0)
    monkeypatch.setattr(ev, 'temperature', -1.0)
    monkeypatch.setattr(ev, 'top_p', -1.0)
    monkeypatch.setattr(ev, 'max_new_tokens', 0)

    def score(fn, completions, n_samples):
        monkeypatch.setattr(ev, 'n', n_samples)
        seen = []

        def fake_sample_all(model, prompts, task):
            seen.append((prompts, task))
            assert len(prompts) == len(completions)
            return completions
        monkeypatch.setattr(ev, 'sample_all', fake_sample_all)
        return fn(None), seen[0]
    return score


GSM8K_TRAIN = [dict(question=f'What is {i} + {i}?', answer=f'{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}')
               for i in range(1, 6)]
GSM8K_TEST = [dict(question='Tom has 10 apples and buys 8 more. How many?', answer='10 + 8 = 18\n#### 18'),
              dict(question='A car costs $1,000 and a bike $234. Together?', answer='1000 + 234 = 1234\n#### 1,234')]


@pytest.mark.parametrize('how', ['paper', 'harness'])
def test_gsm8k_pass_at_k_on_hand_made_completions(tmp_path, monkeypatch, scored, how):
    write_jsonl(tmp_path / 'gsm8k' / 'train.jsonl', GSM8K_TRAIN)
    write_jsonl(tmp_path / 'gsm8k' / 'test.jsonl', GSM8K_TEST)
    monkeypatch.setattr(ev, 'style', how)
    completions = [
        # problem 0 (gold 18). paper: 2 of 4 right (#### 18, Final Answer: 18); strict (#### only): 1; flexible: 3
        ['8 more makes 18.\n#### 18', 'so\nFinal Answer: 18', 'He has 17.\n#### 17', 'The answer is 18.'],
        # problem 1 (gold 1234): "$1,234.00" is the gold number; the others are wrong or carry no number
        ['#### $1,234.00', 'Final Answer: 1233', 'I do not know', 'the total is 1234'],
    ]
    result, (prompts, task) = scored(ev.eval_gsm8k, completions, 4)
    assert task == ('gsm8k' if how == 'paper' else 'harness')
    assert [p['gold'] for p in result['problems']] == ['18', '1234']
    # pass@k = 1 - C(n - c, k) / C(n, k), n = 4: c=1 -> 1/4, 1/2, 1; c=2 -> 1/2, 5/6, 1; c=3 -> 3/4, 1, 1
    if how == 'paper':
        assert prompts[0].endswith('Question: Tom has 10 apples and buys 8 more. How many?\nAnswer:\n')
        assert prompts[0].count('Final Answer: ') == 3  # three solved shots in the format sft trains on
        assert [p['correct'] for p in result['problems']] == [{'paper': 2}, {'paper': 1}]
        assert result['scores'] == pytest.approx({'paper pass@1': (1 / 2 + 1 / 4) / 2, 'paper pass@2': (5 / 6 + 1 / 2) / 2,
                                                  'paper pass@4': 1.0, 'no parsable number': 3 / 8}, rel=1e-12)
    else:
        assert prompts[1].startswith('Question: What is 1 + 1?\nAnswer: 1 + 1') and prompts[1].endswith('Together?\nAnswer:')
        assert [p['correct'] for p in result['problems']] == [{'strict': 1, 'flexible': 3}, {'strict': 1, 'flexible': 2}]
        # strict misses 'Final Answer: N' and 'The answer is 18.' (no ####): 5 of 8 have no '#### N'
        assert result['scores'] == pytest.approx({
            'strict pass@1': 1 / 4, 'strict pass@2': 1 / 2, 'strict pass@4': 1.0,
            'flexible pass@1': (3 / 4 + 1 / 2) / 2, 'flexible pass@2': (1 + 5 / 6) / 2, 'flexible pass@4': 1.0,
            'no parsable number': 5 / 8}, rel=1e-12)


def test_gsm8k_all_wrong_scores_zero(tmp_path, scored):
    write_jsonl(tmp_path / 'gsm8k' / 'train.jsonl', GSM8K_TRAIN)
    write_jsonl(tmp_path / 'gsm8k' / 'test.jsonl', GSM8K_TEST)
    result, _ = scored(ev.eval_gsm8k, [['#### 17', '#### 19'], ['#### 234', 'Final Answer: 1000']], 2)
    assert result['scores'] == {'paper pass@1': 0.0, 'paper pass@2': 0.0, 'no parsable number': 0.0}


def bbl_row(task, question, targets, choices):
    return dict(task=task, input=question, targets=targets, choices=choices)


def test_bbl_chance_normalised_pass_at_k(tmp_path, scored):
    train = [bbl_row('mc', 'Shot question?', ['yes'], ['yes', 'no', 'maybe', 'never']),
             bbl_row('free', 'Say hi.', ['hi'], []), bbl_row('low', 'Pick one.', ['a'], ['a', 'b'])]
    test = [bbl_row('mc', 'Is water wet?', ['Yes'], ['yes', 'no', 'maybe', 'never']),   # 4 choices: chance 1/4
            bbl_row('mc', 'Is fire cold?', ['no'], ['yes', 'no', 'maybe', 'never']),
            bbl_row('free', 'Say bye.', ['bye', 'goodbye'], []),                          # free text: no chance level
            bbl_row('low', 'Pick b.', ['b'], ['a', 'b'])]                                 # 2 choices: chance 1/2
    write_jsonl(tmp_path / 'bbl' / 'train.jsonl', train)
    write_jsonl(tmp_path / 'bbl' / 'test.jsonl', test)
    completions = [[' yes ', 'YES', 'no', 'maybe'],         # 2 of 4 right: answers compare stripped, any case
                   ['yes', 'maybe', 'never', 'no'],         # 1 of 4
                   ['goodbye', 'bye', 'bye', 'hello'],      # 3 of 4, either target
                   ['a', 'a', 'a', 'b']]                    # 1 of 4: below the chance of 2 choices
    result, (prompts, task) = scored(ev.eval_bbl, completions, 4)
    assert task == 'bbl'
    assert prompts[0] == ('Question:\nShot question?\nchoice: yes\nchoice: no\nchoice: maybe\nchoice: never\n\nAnswer:\n'
                          'yes\n\nQuestion:\nIs water wet?\nchoice: yes\nchoice: no\nchoice: maybe\nchoice: never\n\nAnswer:\n')
    # pass@k of n=4: c=1 -> 1/4, 1/2, 1; c=2 -> 1/2, 5/6, 1; c=3 -> 3/4, 1, 1. Normalised: (acc - chance) / (1 - chance),
    # chance the mean of 1/choices over the task's questions, floored at 0
    mc = {1: (1 / 2 + 1 / 4) / 2, 2: (5 / 6 + 1 / 2) / 2, 4: 1.0}
    want = {'mc': {f'pass@{k}': (a - 1 / 4) / (3 / 4) for k, a in mc.items()},
            'free': {'pass@1': 3 / 4, 'pass@2': 1.0, 'pass@4': 1.0},
            'low': {'pass@1': 0.0, 'pass@2': 0.0, 'pass@4': 1.0}}  # 1/4 and 1/2 are not above chance (1/2)
    assert result['tasks'].keys() == want.keys()
    for name, scores in want.items():
        assert result['tasks'][name] == pytest.approx(scores, rel=1e-12), name
    assert result['scores'] == pytest.approx({f'normalised pass@{k}': sum(t[f'pass@{k}'] for t in want.values()) / 3
                                              for k in (1, 2, 4)}, rel=1e-12)
    assert result['tasks']['mc']['pass@1'] == pytest.approx(1 / 6)  # acc 3/8 against chance 1/4


@pytest.mark.parametrize('temp,p,k', [(0.0, 1.0, 0), (1.0, 1.0, 0), (1.0, 0.9, 0), (0.7, 1.0, 5)])
def test_next_tokens_never_draws_a_padding_id(monkeypatch, temp, p, k):
    """A byte model: 257 ids padded to 320. Ids 257-319 made the most likely by far are still never drawn."""
    monkeypatch.setattr(ev, 'vocab', dict(kind='bytes', size=257))
    logits = torch.randn(64, 320, generator=torch.Generator().manual_seed(0))
    logits[:, 257:] += 100.0
    u = torch.rand(64, generator=torch.Generator().manual_seed(1))
    out = ev.next_tokens(logits, temp, p, k, u)
    assert out.shape == (64,) and int(out.max()) < 257


def test_a_byte_model_never_samples_its_padding(monkeypatch):
    monkeypatch.setattr(ev, 'device', 'cpu')
    monkeypatch.setattr(ev, 'dtype', 'float32')
    monkeypatch.setattr(ev, 'batch_size', 4)
    monkeypatch.setattr(ev, 'vocab', dict(kind='bytes', size=257))
    torch.manual_seed(0)
    model = nca_gpt.GPT(320, n_layer=1, n_head=2, n_embd=32, block_size=64).eval()
    with torch.no_grad():  # ids 257..319 only pad the embedding: make them the most likely by far
        model.head.weight[257:] = model.head.weight[:257].abs().max() * 1000
    drawn, next_tokens = [], ev.next_tokens
    monkeypatch.setattr(ev, 'next_tokens', lambda *a: drawn.append(next_tokens(*a)) or drawn[-1])
    for temp in (0.0, 1.0):
        outs = ev.sample(model, list(b'def f(x):'), 4, 10, temp, 1.0, 0, [], seed_base=0)
        assert len(outs) == 4 and all(isinstance(o, str) for o in outs)
    assert drawn and int(torch.cat(drawn).max()) < 257
