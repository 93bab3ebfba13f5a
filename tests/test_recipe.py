"""--recipe=authors trains as the authors' code does (commit bdd1c71); each test fails if a row of README's table
"This code and the authors' code" stops being true."""
import math

import pytest
import torch

from conftest import ROOT  # noqa: F401  (puts nca_gpt on the path)
from test_train import FAST, lm_data, read_log, run, train_losses  # noqa: F401  (lm_data is a fixture)


def checkpoint(out_dir):
    return torch.load(out_dir / 'ckpt.pt', weights_only=False)


def test_authors_recipe_builds_their_models_and_transfer_drops_the_head_bias(tmp_path, lm_data):
    d = 32  # FAST's width
    run(*FAST, '--stage=nca', '--recipe=authors', '--max_iters=0', f'--out_dir={tmp_path / "s1"}')
    s1 = checkpoint(tmp_path / 's1')
    sd, args = s1['model'], s1['model_args']
    # stage 1 (utils/models.py, CustomLlamaModel): an nn.Linear(d, 64000) head with a bias, at torch's init
    assert args['vocab_size'] == 64000 and sd['head.weight'].shape == (64000, d) and 'head.bias' in sd
    for k in ('head.weight', 'head.bias'):
        assert sd[k].abs().max() <= 1 / math.sqrt(d) and abs(sd[k].std() - 1 / math.sqrt(3 * d)) < 0.01, k
    # HF's initialiser: every other Linear and the embedding N(0, 0.02), residual projections not scaled
    assert abs(sd['wte.weight'].std() - 0.02) < 0.001
    for k in ('blocks.0.attn.proj.weight', 'blocks.1.mlp.down.weight', 'blocks.0.attn.qkv.weight'):
        assert abs(sd[k].std() - 0.02) < 0.002, k
    assert s1['config']['recipe'] == 'authors' and s1['config']['grad_clip'] == 0

    # stage 2 (DownstreamLlamaLM.reinit_embeddings): nn.Embedding N(0, 1), nn.Linear U(+-1/sqrt(d)) without a bias,
    # the exact vocabulary (50,257 rows); the blocks are stage 1's
    p = run(*FAST, '--stage=lm', '--recipe=authors', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64',
            '--max_iters=0', f'--init_from={tmp_path / "s1"}', f'--out_dir={tmp_path / "s2"}')
    assert 'recipes differ' not in p.stdout
    sd2 = checkpoint(tmp_path / 's2')['model']
    assert sd2['wte.weight'].shape == (50257, d) and abs(sd2['wte.weight'].std() - 1) < 0.01
    assert 'head.bias' not in sd2 and sd2['head.weight'].abs().max() <= 1 / math.sqrt(d)
    assert abs(sd2['head.weight'].std() - 1 / math.sqrt(3 * d)) < 0.002
    assert all(torch.equal(sd2[k], v) for k, v in sd.items() if not k.startswith(('wte.', 'head.')))

    # the scratch baseline under the authors' recipe gets the same fresh embedding and head; the project's does not
    run(*FAST, '--stage=lm', '--recipe=authors', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64',
        '--max_iters=0', f'--out_dir={tmp_path / "scratch"}')
    assert abs(checkpoint(tmp_path / 'scratch')['model']['wte.weight'].std() - 1) < 0.01
    p = run(*FAST, '--stage=lm', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64', '--max_iters=0',
            f'--init_from={tmp_path / "s1"}', f'--out_dir={tmp_path / "project"}')
    assert 'was trained under --recipe=authors, this stage runs under --recipe=project' in p.stdout
    sd3 = checkpoint(tmp_path / 'project')['model']
    assert abs(sd3['wte.weight'].std() - 0.02) < 0.001 and abs(sd3['head.weight'].std() - 0.02) < 0.001


def test_project_recipe_scales_residual_projections(nca):
    torch.manual_seed(0)
    model = nca.GPT(64, n_layer=8, n_head=2, n_embd=64, block_size=64)
    assert abs(model.blocks[0].attn.proj.weight.std() - 0.02 / 4) < 0.0005   # 0.02 / sqrt(2 x 8)
    assert abs(model.blocks[0].attn.qkv.weight.std() - 0.02) < 0.001 and model.head.bias is None


def hand_update(nca, args, clip_sum):
    """One AdamW update of 2 micro-steps written out by hand: the gradient of the summed (clip_sum) or mean losses,
    clipped at --grad_clip. -> the new weights, the norm before clipping."""
    nca.configure(args)
    nca.device = 'cpu'
    nca.vocab = nca.stage_vocab()
    torch.manual_seed(nca.seed)  # as train() does before building the model
    model = nca.GPT(vocab_size=-(-nca.vocab['size'] // 64) * 64, n_layer=nca.n_layer, n_head=nca.n_head,
                    n_embd=nca.n_embd, block_size=nca.block_size)
    losses = [model(*nca.get_batch('train', i))[1] for i in range(2)]
    (sum(losses) if clip_sum else sum(losses) / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), nca.grad_clip)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': matrices, 'weight_decay': nca.weight_decay},
                             {'params': vectors, 'weight_decay': 0.0}], lr=nca.get_lr(0), betas=(nca.beta1, nca.beta2))
    opt.step()
    return model.state_dict(), norm.item()


@pytest.mark.parametrize('clip_sum', [True, False])
def test_clip_sum_clips_the_summed_micro_step_gradients(nca, tmp_path, clip_sum):
    args = [*FAST, '--stage=nca', '--gradient_accumulation_steps=2', '--max_iters=1', '--eval_interval=1',
            '--learning_rate=1e-2', '--warmup_iters=0', '--grad_clip=0.5', f'--clip_sum={clip_sum}', f'--out_dir={tmp_path}']
    run(*args)
    trained = checkpoint(tmp_path)['model']
    want, norm = hand_update(nca, args, clip_sum)
    other, other_norm = hand_update(nca, [*args, f'--clip_sum={not clip_sum}'], not clip_sum)
    # the threshold lies between the mean's norm and the sum's: only the sum is clipped, so the rules differ
    assert min(norm, other_norm) < 0.5 < max(norm, other_norm)
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    assert diff(trained, want) < 1e-6 < 1e-4 < diff(trained, other)


def test_decay_all_decays_the_norms(tmp_path):
    common = [*FAST, '--stage=nca', '--max_iters=1', '--eval_interval=1', '--weight_decay=0.5', '--learning_rate=1e-2']
    for flag in ('true', 'false'):
        run(*common, f'--decay_all={flag}', f'--out_dir={tmp_path / flag}')
    on, off = (checkpoint(tmp_path / f)['model']['norm.weight'] for f in ('true', 'false'))
    # the same first step but for AdamW's decoupled decay, which takes lr x 0.5 x the weight (1 at init) more
    assert torch.allclose(off - on, torch.full_like(on, 1e-2 * 0.5), atol=1e-6)


def test_warmup_zero_is_the_authors_lambda(nca):
    nca.learning_rate, nca.warmup_iters, nca.lr_decay_iters, nca.min_lr = 1.0, 10, 20, 0.0
    nca.warmup_zero = True
    assert [nca.get_lr(i) for i in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert nca.get_lr(15) == pytest.approx(0.5) and nca.get_lr(20) == 0.0  # LambdaLR's cosine, to 0
    nca.warmup_zero = False
    assert nca.get_lr(0) == pytest.approx(1 / 11) and nca.get_lr(10) == 1.0


def test_authors_recipe_resumes_bit_exactly(tmp_path):
    args = [*FAST, '--stage=nca', '--recipe=authors', '--pad_vocab=64', '--eval_interval=2', '--warmup_iters=2',
            '--lr_decay_iters=6']  # dropout 0.1 is on: the RNG is in the checkpoint
    run(*args, '--max_iters=6', f'--out_dir={tmp_path / "straight"}')
    run(*args, '--max_iters=3', f'--out_dir={tmp_path / "split"}')
    run(*args, '--max_iters=6', f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    straight, split = train_losses(tmp_path / 'straight'), train_losses(tmp_path / 'split')
    assert len(straight) == 6 and straight == split


# The paper preset against the authors' shell scripts: (stage, key, value, where the value comes from)
NCA_SH, OWT_SH, ARGS = 'scripts/prepretraining/nca_prepretraining.sh', 'scripts/pretraining/owt_ft.sh', 'utils/training_args.py'
PAPER = [
    ('nca', 'n_layer', 24, f'{NCA_SH}: --n_layer 24'),
    ('nca', 'n_head', 32, f'{NCA_SH}: --n_head 32'),
    ('nca', 'n_embd', 2048, f'{NCA_SH}: --n_embd 2048'),
    ('nca', 'block_size', 1024, f'{NCA_SH}: --seq_len 1024'),
    ('nca', 'batch_size', 16, f'{NCA_SH}: --batch_size 16'),
    ('nca', 'gradient_accumulation_steps', 2, f'{NCA_SH}: --grad_accumulation_steps 2'),
    ('nca', 'learning_rate', 1e-4, f'{NCA_SH}: --learning_rate 1e-4'),
    ('nca', 'grid', 12, f'{NCA_SH}: --grid 12'),
    ('nca', 'patch', 2, f'{NCA_SH}: --patch 2'),
    ('nca', 'n_states', 10, f'{NCA_SH}: --num_colors 10'),
    ('nca', 'temperature', 1e-4, f'{NCA_SH}: --temperature 1e-4'),
    ('nca', 'num_rules', 16000, f'{NCA_SH}: --train_num_rules 16000'),
    ('nca', 'num_val_rules', 2000, f'{NCA_SH}: --val_num_rules 2000'),
    ('nca', 'gzip_lower', 0.5, f'{NCA_SH}: --filter_rules_threshold 0.5'),
    ('nca', 'gzip_upper', 1.0, f'{NCA_SH}: --filter_rules_upper_bound 1.0'),
    ('nca', 'burn_in', 10, f'{NCA_SH}: --init_rollout_steps 10'),
    ('nca', 'pad_vocab', 64000, f'{NCA_SH}: --vocab_size 64000'),
    ('nca', 'max_iters', 5000, f'{NCA_SH}: --warmup 10 (epochs) x --train_num_sim 500 x 16 x 2 / 16 / 2 updates'),
    ('nca', 'stop_at_peak', True, f'{NCA_SH}: the checkpoint at the end of warm-up (MODEL_FILE ..._10_CHECKPOINT)'),
    ('nca', 'grad_clip', 0.0, f'{NCA_SH}: no --grad_clip_enable ({ARGS}: default False)'),
    ('nca', 'weight_decay', 0.0, 'src/nca_ppt.py: torch.optim.Adam(model.parameters(), lr=args.lr)'),
    ('nca', 'beta2', 0.999, 'src/nca_ppt.py: torch.optim.Adam, default betas'),
    ('nca', 'dropout', 0.1, 'utils/models.py: create_llama_model, attention_dropout=0.1'),
    ('nca', 'head_bias', True, 'utils/models.py: CustomLlamaModel, nn.Linear(self.n_embd, self.output_vocab)'),
    ('nca', 'scale_residual', False, 'utils/models.py: LlamaModel(config), HF init N(0, 0.02) for every Linear'),
    ('nca', 'nca_loss', 'all', 'src/nca_ppt.py: NCADataset masks only negative ids, START/END are targets'),
    ('nca', 'rule_resample', 0, "src/nca_ppt.py: `if(epoch+1 % args.generate_rules == 0)`, true at epoch 0 only"),
    ('nca', 'warmup_zero', True, 'utils/util.py: get_lr_scheduler, current_step / warmup_steps'),
    ('lm', 'learning_rate', 5e-4, f'{OWT_SH}: --lr 5e-4'),
    ('lm', 'weight_decay', 1e-4, f'{OWT_SH}: --weight_decay 0.0001'),
    ('lm', 'decay_all', True, 'src/openwebtext_pt.py: torch.optim.AdamW(model.parameters(), ...)'),
    ('lm', 'grad_clip', 1.0, f'{OWT_SH}: --grad_clip 1.0 --grad_clip_enable 1'),
    ('lm', 'clip_sum', True, 'src/openwebtext_pt.py: scaler.scale(loss).backward(), loss not divided by 32'),
    ('lm', 'batch_size', 16, f'{ARGS}: OpenWebText batch_size default 16'),
    ('lm', 'gradient_accumulation_steps', 32, f'{ARGS}: gradient_accumulation_steps default 32'),
    ('lm', 'block_size', 1024, f'{ARGS}: pt_seq_len default 1024'),
    ('lm', 'min_lr', 0.0, 'utils/util.py: get_lr_scheduler, cosine to 0'),
    ('lm', 'warmup_zero', True, 'utils/util.py: get_lr_scheduler, current_step / warmup_steps'),
    ('lm', 'beta2', 0.999, 'src/openwebtext_pt.py: torch.optim.AdamW, default betas'),
    ('lm', 'dropout', 0.1, 'utils/models.py: create_llama_model, attention_dropout=0.1'),
    ('lm', 'emb_init', 'torch', 'utils/models.py: reinit_embeddings, nn.Embedding / nn.Linear(bias=False)'),
    ('lm', 'head_bias', False, 'utils/models.py: reinit_embeddings, nn.Linear(..., bias=False)'),
    ('lm', 'pad_vocab', 1, 'src/openwebtext_pt.py: DownstreamLlamaLM(vocab_size=tokenizer.n_vocab)'),
    ('lm', 'dtype', 'float16', f'{OWT_SH}: --mixed_precision fp16 (on a GPU)'),
]


@pytest.mark.parametrize('stage,key,value,source', PAPER, ids=[f'{s}-{k}' for s, k, *_ in PAPER])
def test_paper_preset_is_the_authors_scripts(nca, stage, key, value, source):
    nca.configure([f'--stage={stage}', '--preset=paper', '--device=cuda'])
    assert getattr(nca, key) == value, source


def test_paper_preset_warmup_is_a_tenth(nca):
    nca.configure(['--stage=lm', '--preset=paper', '--device=cuda'])
    assert nca.warmup_iters == nca.max_iters // 10 and nca.lr_decay_iters == nca.max_iters  # owt_ft.sh: --warmup 0.1


def test_a_recipe_on_the_cpu_trains_in_float32(nca):
    nca.configure(['--stage=lm', '--recipe=authors', '--device=cpu'])
    assert nca.dtype == '' and nca.clip_sum is True
    nca.configure(['--stage=lm', '--recipe=authors', '--device=cpu', '--clip_sum=false', '--emb_init=normal'])
    assert (nca.clip_sum, nca.emb_init) == (False, 'normal')  # each item can be switched back on its own


def test_authors_recipe_lm_resumes_bit_exactly(tmp_path, lm_data):
    run(*FAST, '--stage=nca', '--recipe=authors', '--pad_vocab=64', '--max_iters=1', '--eval_interval=1',
        f'--out_dir={tmp_path / "s1"}')
    args = [*FAST, '--stage=lm', '--recipe=authors', '--dataset=toy', f'--data_dir={lm_data}', '--block_size=64',
            '--gradient_accumulation_steps=2', '--eval_interval=2', '--warmup_iters=2', '--lr_decay_iters=6',
            f'--init_from={tmp_path / "s1"}']  # dropout, the summed clipping, decay on every parameter
    run(*args, '--max_iters=6', f'--out_dir={tmp_path / "straight"}')
    run(*args, '--max_iters=3', f'--out_dir={tmp_path / "split"}')
    run(*args, '--max_iters=6', f'--out_dir={tmp_path / "split"}', '--init_from=resume')
    straight, split = train_losses(tmp_path / 'straight'), train_losses(tmp_path / 'split')
    assert len(straight) == 6 and straight == split
