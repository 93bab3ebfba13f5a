"""eval.py export and nca_gpt.py --init_from=DIR: this GPT as a Hugging Face Llama and back (issue 26).

Without transformers: the safetensors writer and reader, the round trip export -> import (bit-exact), the refusals.
With transformers (else skipped, saying so): LlamaForCausalLM's logits and greedy continuations equal this GPT's, the
folder's tokenizer encodes as text_codec does, an HF-made Llama imports. Tiny models (width 64, 2 layers) on the CPU.
"""
import json
import os
import sys

import pytest
import torch

import conftest  # noqa: F401  (puts the project on sys.path)
import eval as ev  # noqa: E402
import nca_gpt  # noqa: E402
from eval import bpe_merges, eval_export, export_hf, gpt2_ranks, tokenizer_json  # noqa: E402
from eval import (GPT2_FINGERPRINT, HFError, load_hf_llama, read_safetensors,  # noqa: E402
                  tokenizer_fingerprint, tokenizer_vocab, write_safetensors)
from nca_gpt import check_source_vocab  # noqa: E402

try:
    import transformers
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install transformers): "
                                                           "the comparisons with HF's LlamaForCausalLM are skipped")
TEXTS = ["Hello world", "The café's naïve piñata — “quoted” ‘text’… Grüße aus Köln!",
         "東京は日本の首都です。 한국어 текст Ελληνικά 🙂🚀 x²+y²", "  leading spaces\n\n\ttabs and\r\nnewlines   ",
         "def f(x):\n    return x ** 2  # comment\n", "numbers 1234567 3.14159 and 'contractions' don't it's we'll"]


def has_gpt2():
    try:
        gpt2_ranks()
        return True
    except Exception:
        return False


needs_gpt2 = pytest.mark.skipif(not has_gpt2(), reason="tiktoken's r50k_base ranks are not available offline "
                                                       "(set TIKTOKEN_CACHE_DIR)")


def tiny(kind='bytes', seed=0, n_layer=2, n_head=4, n_embd=64, block_size=64, stage='lm'):
    """A checkpoint dict of a small GPT with EVERY parameter random (norms too, so that a swapped name shows)."""
    size = {'bytes': 257, 'gpt2': 50257, 'nca': 66, 'dyck': 16}[kind]
    args = dict(vocab_size=-(-size // 64) * 64, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                dropout=0.0, head_bias=False, emb_init='normal', scale_residual=True)
    torch.manual_seed(seed)
    model = nca_gpt.GPT(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)       # the RMSNorm gains
            else:
                p.normal_(0.0, 1.0 if name == 'wte.weight' else 0.5 / p.shape[1] ** 0.5)
    return dict(model=model.state_dict(), model_args=args, vocab=dict(kind=kind, size=size), stage=stage,
                iter_num=123, best_val_loss=2.5, config={'recipe': 'project', 'n_embd': n_embd})


def gpt(checkpoint):
    model = nca_gpt.GPT(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    return model.eval()


def one_line(e):
    msg = str(e.value)
    assert msg and '\n' not in msg, msg
    return msg


# ---- without transformers ----------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {'f32': torch.randn(3, 5, generator=g), 'bf16': torch.randn(7, generator=g).bfloat16(),
               'f16': torch.randn(2, 2, 2, generator=g).half(), 'i64': torch.arange(-5, 5), 'scalar': torch.tensor(3.5),
               'empty': torch.zeros(0, 4), 'u8': torch.arange(256, dtype=torch.uint8), 'b': torch.tensor([True, False])}
    path = tmp_path / 'x.safetensors'
    write_safetensors(path, tensors, {'format': 'pt'})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])['__metadata__'] == {'format': 'pt'}
    back, meta = read_safetensors(path)
    assert meta == {'format': 'pt'} and back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        return
    for k, t in load_file(str(path)).items():  # the reference library reads ours, and we read its
        assert torch.equal(t, tensors[k]), k
    save_file(tensors, str(tmp_path / 'y.safetensors'), metadata={'format': 'pt'})
    for k, t in read_safetensors(tmp_path / 'y.safetensors')[0].items():
        assert torch.equal(t, tensors[k]), k


def test_safetensors_reader_refuses_bad_files(tmp_path):
    (tmp_path / 'a.safetensors').write_bytes(b'\xff' * 16)
    with pytest.raises(HFError) as e:
        read_safetensors(tmp_path / 'a.safetensors')
    assert 'not a safetensors file' in one_line(e)
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 12]}}).encode()
    (tmp_path / 'b.safetensors').write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 12)
    with pytest.raises(HFError) as e:
        read_safetensors(tmp_path / 'b.safetensors')
    assert 'data_offsets' in one_line(e)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_round_trip_export_import(tmp_path, dtype):
    ckpt = tiny('bytes')
    written = export_hf(ckpt, tmp_path / 'hf', dtype)
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(tmp_path / 'hf'))
    assert sorted(os.listdir(tmp_path)) == ['hf']  # no temporary folder left beside it
    back = load_hf_llama(str(tmp_path / 'hf'))
    assert back['model'].keys() == ckpt['model'].keys()
    for k, v in ckpt['model'].items():
        want = v if dtype == 'float32' else v.bfloat16().float()
        assert back['model'][k].dtype == torch.float32 and torch.equal(back['model'][k], want), k
    assert back['model_args'] == ckpt['model_args'] and back['vocab'] == ckpt['vocab']
    assert (back['stage'], back['iter_num'], back['config'], back['best_val_loss']) == ('lm', 123, ckpt['config'], 2.5)
    assert back['notes'] == ([] if dtype == 'float32' else ["weights stored as ['torch.bfloat16'], held here in float32"])
    if dtype == 'float32':  # the imported model is the same function, to the bit
        x = torch.randint(0, 257, (2, 20))
        with torch.no_grad():
            assert torch.equal(gpt(ckpt)(x)[0], gpt(back)(x)[0])
    # and the dict works as nca_gpt's transfer source (a fresh embedding and head for the stage, the blocks kept)
    model = nca_gpt.GPT(**ckpt['model_args'])
    nca_gpt.transfer(model, back, same_vocab=True)
    assert torch.equal(model.blocks[1].attn.qkv.weight, back['model']['blocks.1.attn.qkv.weight'])


def test_bytes_tokenizer_detected_and_other_tokenizers_kept_apart(tmp_path):
    export_hf(tiny('bytes'), tmp_path / 'hf')
    assert tokenizer_vocab(str(tmp_path / 'hf'), 320) == {'kind': 'bytes', 'size': 257}
    tok = json.load(open(tmp_path / 'hf' / 'tokenizer.json'))
    tok['model']['vocab']['a'], tok['model']['vocab']['b'] = tok['model']['vocab']['b'], tok['model']['vocab']['a']
    json.dump(tok, open(tmp_path / 'hf' / 'tokenizer.json', 'w'))
    os.remove(tmp_path / 'hf' / 'nca_gpt.json')  # a foreign folder: the vocabulary comes from the tokenizer alone
    back = load_hf_llama(str(tmp_path / 'hf'))
    assert back['vocab']['kind'] == 'other' and back['vocab']['size'] == 320 and back['stage'] == 'lm'
    assert back['iter_num'] == 0 and back['config'] == {} and 'neither GPT-2' in back['notes'][-1]
    check_source_vocab(back, 'lm', False)  # its blocks transfer
    for stage, keep in (('sft', False), ('lm', True)):
        with pytest.raises(SystemExit) as e:
            check_source_vocab(back, stage, keep)
        assert "tokenizer is neither GPT-2's nor bytes" in one_line(e) and str(e.value).startswith('nca_gpt.py: ')
    os.remove(tmp_path / 'hf' / 'tokenizer.json')
    assert tokenizer_vocab(str(tmp_path / 'hf'), 320)['kind'] == 'other'


@needs_gpt2
def test_gpt2_tokenizer_from_tiktoken_ranks(tmp_path):
    ranks = gpt2_ranks()
    merges = bpe_merges(ranks)
    assert len(merges) == 50000 and all(a + b in ranks for a, b in merges[:1000])
    tok, eot = tokenizer_json('gpt2')
    vocab = {**tok['model']['vocab'], '<|endoftext|>': eot}
    assert eot == 50256 and tokenizer_fingerprint(vocab, tok['model']['merges']) == GPT2_FINGERPRINT
    assert tok['model']['merges'][:3] == ['Ġ t', 'Ġ a', 'h e']  # GPT-2's merges.txt begins so
    ckpt = tiny('gpt2', n_layer=1)
    export_hf(ckpt, tmp_path / 'hf')
    os.remove(tmp_path / 'hf' / 'nca_gpt.json')
    assert load_hf_llama(str(tmp_path / 'hf'))['vocab'] == {'kind': 'gpt2', 'size': 50257}


def test_export_refusals(tmp_path, monkeypatch):
    for kind in ('nca', 'dyck'):
        with pytest.raises(HFError) as e:
            export_hf(tiny(kind, stage=kind), tmp_path / kind)
        assert f'--stage {kind} ({kind} tokens) is not exported' in one_line(e)
    ckpt = tiny('bytes')
    ckpt['model']['head.bias'] = torch.zeros(320)  # a zero bias changes nothing: dropped
    export_hf(ckpt, tmp_path / 'zero-bias')
    ckpt['model']['head.bias'] = torch.full((320,), 0.1)
    with pytest.raises(HFError) as e:
        export_hf(ckpt, tmp_path / 'bias')
    assert 'head has a bias' in one_line(e)
    with pytest.raises(HFError) as e:
        export_hf(tiny('bytes'), tmp_path / 'x', 'float16')
    assert '--dtype=float16' in one_line(e)
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'ckpt.pt').write_text('a run')
    with pytest.raises(HFError) as e:
        export_hf(tiny('bytes'), tmp_path / 'run')
    assert 'no earlier export' in one_line(e) and (tmp_path / 'run' / 'ckpt.pt').exists()
    assert sorted(os.listdir(tmp_path)) == ['run', 'zero-bias']  # nothing written for a refusal
    export_hf(tiny('bytes', seed=1), tmp_path / 'zero-bias')  # an earlier export is replaced
    assert torch.equal(load_hf_llama(str(tmp_path / 'zero-bias'))['model']['norm.weight'], tiny('bytes', seed=1)['model']['norm.weight'])

    def fail(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(ev, 'write_safetensors', fail)
    with pytest.raises(OSError):
        export_hf(tiny('bytes'), tmp_path / 'half')
    assert sorted(os.listdir(tmp_path)) == ['run', 'zero-bias']  # whole or absent


def edit(folder, **changes):
    path = os.path.join(folder, 'config.json')
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, 'w'))


REFUSED = [  # (config.json changes, the field the one-line error must name)
    (dict(num_key_value_heads=2), 'num_key_value_heads'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(intermediate_size=172), 'intermediate_size'),
    (dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'rope_scaling'),
    (dict(rope_scaling={'type': 'dynamic', 'factor': 2.0}), 'rope_scaling'),
    (dict(rope_parameters={'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0}), 'rope_parameters'),
    (dict(rope_parameters={'rope_type': 'default', 'rope_theta': 5e5}), 'rope_theta'),
    (dict(rope_theta=5e5, rope_parameters=None), 'rope_theta'),
    (dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5}), 'rope_parameters'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(head_dim=32), 'head_dim'),
    (dict(model_type='mistral'), 'model_type'),
    (dict(architectures=['LlamaForSequenceClassification']), 'architectures'),
    (dict(num_attention_heads=3), 'num_attention_heads'),
    (dict(quantization_config={'quant_method': 'bitsandbytes'}), 'quantization_config'),
]


@pytest.mark.parametrize('changes,field', REFUSED, ids=[f for _, f in REFUSED])
def test_import_refusals(tmp_path, changes, field):
    export_hf(tiny('bytes'), tmp_path / 'hf')
    edit(tmp_path / 'hf', **changes)
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert field in one_line(e)


def test_import_refuses_weights_that_do_not_fit(tmp_path):
    export_hf(tiny('bytes'), tmp_path / 'hf')
    path = tmp_path / 'hf' / 'model.safetensors'
    tensors = read_safetensors(path)[0]
    write_safetensors(path, {**tensors, 'model.layers.0.self_attn.q_proj.bias': torch.zeros(64)})
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert 'no place for: model.layers.0.self_attn.q_proj.bias' in one_line(e)
    del tensors['model.layers.1.mlp.up_proj.weight']
    write_safetensors(path, tensors)
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert 'model.layers.1.mlp.up_proj.weight is missing' in one_line(e)
    export_hf(tiny('bytes'), tmp_path / 'hf')  # config.json and the weights disagree (config.json says the shape:
    edit(tmp_path / 'hf', num_hidden_layers=1)  # a wrong n_head, with the same shapes, cannot be seen)
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert 'no place for: model.layers.1.' in one_line(e)
    edit(tmp_path / 'hf', num_hidden_layers=2, hidden_size=32, intermediate_size=128, head_dim=8)
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert 'model.embed_tokens.weight is (320, 64), config.json makes it (320, 32)' in one_line(e)
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path))
    assert 'no config.json' in one_line(e)


def test_init_from_folder_or_checkpoint(tmp_path):
    ckpt = tiny('bytes')
    export_hf(ckpt, tmp_path / 'hf')
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    assert nca_gpt.load_checkpoint(str(tmp_path / 'hf'))['stage'] == 'lm'
    assert nca_gpt.load_checkpoint(str(tmp_path))['iter_num'] == 123  # a run's folder
    edit(tmp_path / 'hf', num_key_value_heads=1)
    with pytest.raises(SystemExit) as e:
        nca_gpt.load_checkpoint(str(tmp_path / 'hf'))
    assert str(e.value).startswith('nca_gpt.py: ') and 'num_key_value_heads=1' in str(e.value)


# ---- with transformers --------------------------------------------------------------------
def hf_load(folder):
    kw = {'dtype': torch.float32} if int(transformers.__version__.split('.')[0]) >= 5 else {'torch_dtype': torch.float32}
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw).eval()


def greedy(model, ids, n, eot):
    """The project's GPT, greedy: the whole sequence each step, stopping after end-of-text as generate does."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[0][:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            if nxt.item() == eot:
                break
    return ids


@needs_hf
@pytest.mark.parametrize('kind', ['bytes', pytest.param('gpt2', marks=needs_gpt2)])
def test_hf_logits_and_greedy_equal(tmp_path, kind):
    ckpt = tiny(kind, n_layer=2 if kind == 'bytes' else 1)
    export_hf(ckpt, tmp_path / 'hf')
    hf, ours = hf_load(str(tmp_path / 'hf')), gpt(ckpt)
    assert type(hf).__name__ == 'LlamaForCausalLM' and hf.dtype == torch.float32
    x = torch.randint(0, ckpt['vocab']['size'], (3, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = hf(x).logits, ours(x)[0]
    diff = (a - b).abs().max().item()
    print(f"{kind}: max |logit diff| {diff:.3g} (logits' max |value| {b.abs().max().item():.3g})")
    assert diff < 1e-4 * max(1.0, b.abs().max().item()) and a.shape == b.shape
    eot = ckpt['vocab']['size'] - 1
    prompt = x[:1, :8]
    out = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=eot,
                      attention_mask=torch.ones_like(prompt))
    assert out.tolist() == greedy(ours, prompt, 24, eot).tolist()


@needs_hf
@pytest.mark.parametrize('kind', ['bytes', pytest.param('gpt2', marks=needs_gpt2)])
def test_hf_tokenizer_encodes_as_text_codec(tmp_path, kind):
    export_hf(tiny(kind, n_layer=1), tmp_path / 'hf')
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'), local_files_only=True)
    encode, decode, eot = nca_gpt.text_codec(kind)
    assert tok.eos_token_id == tok.bos_token_id == eot and tok.eos_token == '<|endoftext|>'
    for text in TEXTS:
        ids = encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok(text)['input_ids'] == ids, text  # no bos is added (lm-eval's default call)
        assert tok.decode(ids) == decode(ids) == text
    assert tok.encode('a<|endoftext|>b', add_special_tokens=False) == encode('a') + [eot] + encode('b')


@needs_hf
def test_hf_made_llama_imports(tmp_path):
    """A Llama made by transformers (tied embeddings, its own config spelling) imports: the same logits."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   rms_norm_eps=torch.finfo(torch.float32).eps, tie_word_embeddings=True)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 else torch.randn_like(p) * 0.06)
    hf.save_pretrained(str(tmp_path / 'hf'))
    source = load_hf_llama(str(tmp_path / 'hf'))
    assert source['vocab']['kind'] == 'other' and source['notes'] == [source['notes'][0]]  # no tokenizer saved
    ours = gpt(source)
    assert torch.equal(ours.head.weight, ours.wte.weight)
    x = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max().item() < 1e-4
    cfg.rms_norm_eps = 1e-5
    cfg.save_pretrained(str(tmp_path / 'hf'))
    assert 'rms_norm_eps 1e-05' in load_hf_llama(str(tmp_path / 'hf'))['notes'][0]


@needs_hf
@pytest.mark.parametrize('changes,field', [(dict(num_key_value_heads=2), 'num_key_value_heads'),
                                           (dict(attention_bias=True), 'attention_bias'),
                                           (dict(intermediate_size=128), 'intermediate_size'),
                                           (dict(rope_scaling={'type': 'linear', 'rope_type': 'linear', 'factor': 2.0}), 'rope_')])
def test_hf_made_misfits_refused(tmp_path, changes, field):
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    for k, v in changes.items():
        setattr(cfg, k, v)
    if 'rope_scaling' in changes and hasattr(cfg, 'rope_parameters'):  # transformers 5 keeps the rope here
        cfg.rope_parameters = {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / 'hf'))
    with pytest.raises(HFError) as e:
        load_hf_llama(str(tmp_path / 'hf'))
    assert field in one_line(e)


@needs_hf
def test_hf_loads_bfloat16_export(tmp_path):
    """A bfloat16 export: config.json says bfloat16 (both spellings); read in float32 it is this GPT with its weights
    rounded to bfloat16, to the bit of the logits' computation."""
    ckpt = tiny('bytes')
    export_hf(ckpt, tmp_path / 'hf', 'bfloat16')
    cfg = json.load(open(tmp_path / 'hf' / 'config.json'))
    assert cfg['torch_dtype'] == cfg['dtype'] == 'bfloat16'
    rounded = {**ckpt, 'model': {k: v.bfloat16().float() for k, v in ckpt['model'].items()}}
    x = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        diff = (hf_load(str(tmp_path / 'hf'))(x).logits - gpt(rounded)(x)[0]).abs().max().item()
    assert diff < 1e-5, diff


def test_eval_export_task(tmp_path, capsys):
    die = lambda msg: sys.exit(f"eval.py: {msg}")
    eval_export('run/ckpt.pt', tiny('bytes'), str(tmp_path / 'hf'), '', die)
    assert 'LlamaForCausalLM with the bytes tokenizer' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        eval_export('out-nca/ckpt.pt', tiny('nca', stage='nca'), str(tmp_path / 'nca'), 'float32', die)
    assert str(e.value).startswith('eval.py: cannot export out-nca/ckpt.pt: a checkpoint of --stage nca')
