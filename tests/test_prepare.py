"""prepare_data.py against a local HTTP server on 127.0.0.1: formats, resume, faults, determinism. Offline."""
import gzip
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest

from conftest import ROOT
from fixture_server import FixtureServer, serve_benchmarks

sys.path.insert(0, ROOT)
import prepare_data  # noqa: E402

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) + f"\nLine {i * 31}\n"
        for i in range(60)]


def jsonl_gz(rows):
    return gzip.compress(''.join(json.dumps(r) + '\n' for r in rows).encode())


def tar_bytes(files, mode='w'):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run(server, *args, data_dir, env=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), *args, f'--data_dir={data_dir}',
                        f'--hf_base={server.url}', f'--github_base={server.url}', f'--github_api={server.url}',
                        '--val_fraction=0.2', '--retries=3'],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    return p


def expected_tokens(docs_by_shard):
    """What train.bin and val.bin must hold: tiktoken's encoding of each document plus EOT, split by the hash."""
    enc = prepare_data.gpt2_encoding()
    prepare_data.val_fraction = 0.2  # as run() passes
    out = {'train': [], 'val': []}
    for shard, docs in enumerate(docs_by_shard):
        for j, doc in enumerate(docs):
            out['val' if prepare_data.in_val(shard, j) else 'train'] += enc.encode_ordinary(doc) + [50256]
    return out


def read_bin(data_dir, name, split):
    return np.fromfile(os.path.join(data_dir, name, f'{split}.bin'), dtype=np.uint16).tolist()


def serve_codeparrot(server):
    """Two json.gz shards listed through the tree API in two pages (a Link header to the second)."""
    shards = [DOCS[:35], DOCS[35:]]
    api = '/api/datasets/codeparrot/codeparrot-clean/tree/main'
    items = []
    for i, docs in enumerate(shards):
        name = f'file-{i + 1:012d}.json.gz'
        body = jsonl_gz([{'content': d, 'repo_name': 'x'} for d in docs])
        server.files[f'/datasets/codeparrot/codeparrot-clean/resolve/main/{name}'] = body
        items.append({'type': 'file', 'path': name, 'size': len(body)})
    items.append({'type': 'file', 'path': 'README.md', 'size': 10})
    server.files[api] = lambda q: (json.dumps(items[:1] if 'cursor' not in q else items[1:]).encode(),
                                   {} if 'cursor' in q else {'Link': f'<{server.url}{api}?cursor=2>; rel="next"'})
    return shards


def test_corpus_tokens_equal_tiktoken(server, tmp_path, gpt2_ranks):
    shards = serve_codeparrot(server)
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    want = expected_tokens(shards)
    assert read_bin(tmp_path, 'codeparrot', 'train') == want['train']
    assert read_bin(tmp_path, 'codeparrot', 'val') == want['val'] and want['val']
    meta = json.load(open(tmp_path / 'codeparrot' / 'meta.json'))
    assert meta['train_tokens'] == len(want['train']) and meta['dtype'] == 'uint16' and meta['documents'] == 60
    assert [f['file'] for f in meta['fetched']] == ['file-000000000001.json.gz', 'file-000000000002.json.gz']
    assert 0 < meta['gzip_ratio']['median'] < 1
    # rerunning is a no-op: nothing is fetched again
    n = len(server.log)
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0 and 'already prepared' in p.stdout and len(server.log) == n


def test_split_is_deterministic(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    for d in ('a', 'b'):
        assert run(server, 'codeparrot', data_dir=tmp_path / d).returncode == 0
    for split in ('train', 'val'):
        assert read_bin(tmp_path / 'a', 'codeparrot', split) == read_bin(tmp_path / 'b', 'codeparrot', split)


def test_interrupted_download_resumes_and_500s_are_retried(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    path = '/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000001.json.gz'
    server.faults[path] = ['500', 'cut']
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    ranges = [r for q, r in server.log if q == path]
    size = len(server.files[path])
    assert ranges == [None, None, f'bytes={size // 2}-']  # 500, cut half-way, then only the rest
    assert open(tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz', 'rb').read() == server.files[path]


def test_killed_run_continues_where_it_stopped(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    second = '/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000002.json.gz'
    body = server.files.pop(second)  # the second shard 404s: the run stops after the first
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode != 0 and f'404 Not Found: {server.url}{second}' in p.stderr
    assert not (tmp_path / 'codeparrot' / 'meta.json').exists() and not (tmp_path / 'codeparrot' / 'train.bin').exists()
    server.files[second] = body
    server.log.clear()
    assert run(server, 'codeparrot', data_dir=tmp_path).returncode == 0
    assert [q for q, _ in server.log if 'resolve' in q] == [second]  # the first shard is not fetched again


def test_corrupt_shard_is_named_and_nothing_is_written(server, tmp_path, gpt2_ranks):
    path = '/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz'
    server.files[path] = gzip.compress(b'{"text": "fine"}\n{"text": broken json\n')
    p = run(server, 'c4', data_dir=tmp_path)
    assert p.returncode != 0 and 'corrupt shard' in p.stderr and 'c4-train.00000-of-01024.json.gz' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    left = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert not any(f.endswith(('.bin', '.part')) or f == 'meta.json' for f in left), left


def test_size_mismatch_with_the_listing_is_refused(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    server.files['/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000001.json.gz'] += b'extra'
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode != 0 and 'bytes, expected' in p.stderr
    assert not (tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz').exists()


def test_openwebtext_tar_of_xz_with_max_tokens(server, tmp_path, gpt2_ranks):
    inner = [tar_bytes({f'doc{j}.txt': d.encode() for j, d in enumerate(DOCS[k:k + 10])}) for k in (0, 10)]
    server.files['/datasets/Skylion007/openwebtext/resolve/main/subsets/urlsf_subset00.tar'] = \
        tar_bytes({f'urlsf_subset00-{k}_data.xz': lzma.compress(b) for k, b in enumerate(inner)})
    p = run(server, 'openwebtext', '--max_tokens=10', data_dir=tmp_path)  # one shard is enough
    assert p.returncode == 0, p.stderr
    want = expected_tokens([DOCS[:20]])
    assert read_bin(tmp_path, 'openwebtext', 'train') == want['train']


def test_c4_json_gz(server, tmp_path, gpt2_ranks):
    server.files['/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz'] = \
        jsonl_gz([{'text': d, 'url': 'u', 'timestamp': 't'} for d in DOCS])
    p = run(server, 'c4', '--max_tokens=100', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert read_bin(tmp_path, 'c4', 'train') == expected_tokens([DOCS])['train']


def test_openwebmath_parquet(server, tmp_path, gpt2_ranks):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({'text': DOCS, 'url': ['u'] * len(DOCS)}), buf)
    name = 'train-00000-of-00114-abc123.parquet'
    server.files[f'/datasets/open-web-math/open-web-math/resolve/main/data/{name}'] = buf.getvalue()
    server.files['/api/datasets/open-web-math/open-web-math/tree/main/data'] = \
        json.dumps([{'type': 'file', 'path': f'data/{name}', 'size': len(buf.getvalue())}]).encode()
    assert run(server, 'openwebmath', data_dir=tmp_path).returncode == 0
    assert read_bin(tmp_path, 'openwebmath', 'train') == expected_tokens([DOCS])['train']


@pytest.mark.parametrize('kind', ['folder', 'jsonl'])
def test_local_corpus(server, tmp_path, kind, gpt2_ranks):
    if kind == 'folder':
        src = tmp_path / 'texts'
        src.mkdir()
        for j, d in enumerate(DOCS):
            (src / f'{j:03d}.txt').write_text(d)
    else:
        src = tmp_path / 'docs.jsonl'
        src.write_text(''.join(json.dumps({'body': d}) + '\n' for d in DOCS))
    extra = ['--text_field=body'] if kind == 'jsonl' else []
    p = run(server, 'mine', f'--source={src}', *extra, data_dir=tmp_path / 'data')
    assert p.returncode == 0, p.stderr
    assert read_bin(tmp_path / 'data', 'mine', 'train') == expected_tokens([DOCS])['train'] and not server.log


def test_bad_names_and_addresses(server, tmp_path, gpt2_ranks):
    p = run(server, 'nope', data_dir=tmp_path)
    assert p.returncode != 0 and "unknown dataset 'nope'; known: openwebtext, c4" in p.stderr
    p = run(server, 'c4', data_dir=tmp_path)  # the server has no C4 shard
    assert p.returncode != 0 and f'404 Not Found: {server.url}/datasets/allenai/c4' in p.stderr
    assert 'Traceback' not in p.stderr


def test_benchmarks(server, tmp_path):
    gsm, he = serve_benchmarks(server, prepare_data)
    p = run(server, 'gsm8k', 'humaneval', 'bbl', '--allow_unpinned=true', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in open(tmp_path / 'gsm8k' / 'test.jsonl')]
    assert rows == gsm
    sft = [json.loads(line) for line in open(tmp_path / 'gsm8k' / 'sft_train.jsonl')]
    assert len(sft) == 98 and sft[0]['prompt'].startswith('Question: What is') and sft[0]['prompt'].endswith('Answer:\n')
    assert '<<' not in sft[0]['answer'] and sft[0]['answer'].split('\n')[-1].startswith('Final Answer: ')
    assert [json.loads(line) for line in open(tmp_path / 'humaneval' / 'test.jsonl')] == he
    bbl = [json.loads(line) for line in open(tmp_path / 'bbl' / 'test.jsonl')]
    assert {r['task'] for r in bbl} == set(prepare_data.BBL_TASKS)
    ld = [r for r in bbl if r['task'] == 'logical_deduction']
    assert len(ld) == 4 and ld[0]['subtask'] == 'three_objects' and ld[0]['choices'] == ['yes', 'no']
    assert all(r['targets'] == ['yes' if int(r['input'].split('q')[-1]) % 2 else 'no'] for r in bbl)
    bbl_sft = [json.loads(line) for line in open(tmp_path / 'bbl' / 'sft_train.jsonl')]
    assert bbl_sft and 'choice: yes\nchoice: no\n\nAnswer:\n' in bbl_sft[0]['prompt']


def test_a_whole_part_file_is_finished_not_refetched(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    path = '/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000001.json.gz'
    raw = tmp_path / 'codeparrot' / 'raw'
    raw.mkdir(parents=True)
    (raw / 'file-000000000001.json.gz.part').write_bytes(server.files[path])  # killed just before the rename
    assert run(server, 'codeparrot', data_dir=tmp_path).returncode == 0
    assert [r for q, r in server.log if q == path] == [f'bytes={len(server.files[path])}-']  # answered 416


def corrupt_gzip(data):
    """data with one byte flipped where zlib itself fails ('invalid distance too far back' and the like), not only
    the CRC check at the end."""
    for i in range(len(data) // 2, len(data)):
        bad = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        try:
            gzip.decompress(bad)
        except zlib.error:
            return bad
        except (OSError, EOFError):
            pass


@pytest.mark.parametrize('where', ['served', 'in raw/'])
def test_a_corrupt_gzip_is_named_deleted_and_fetched_again(server, tmp_path, where, request):
    if where == 'served':  # a C4 shard with one byte changed in transit
        request.getfixturevalue('gpt2_ranks')
        path = '/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz'
        good = jsonl_gz([{'text': d} for d in DOCS])
        server.files[path] = corrupt_gzip(good)
        name, local, args = 'c4', tmp_path / 'c4' / 'raw' / 'c4-train.00000-of-01024.json.gz', ['--max_tokens=100']
    else:  # HumanEval.jsonl.gz damaged on disk after an earlier download
        serve_benchmarks(server, prepare_data)
        path = f'/openai/human-eval/{prepare_data.humaneval_commit}/data/HumanEval.jsonl.gz'
        good = server.files[path]
        name, local = 'humaneval', tmp_path / 'humaneval' / 'raw' / 'HumanEval.jsonl.gz'
        args = ['--allow_unpinned=true']  # the fixture is not the pinned file
        local.parent.mkdir(parents=True)
        local.write_bytes(corrupt_gzip(good))
    p = run(server, name, *args, data_dir=tmp_path)
    assert p.returncode != 0 and 'zlib.error' not in p.stderr and 'corrupt' in p.stderr and local.name in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not local.exists()
    server.files[path] = good
    server.log.clear()
    p = run(server, name, *args, data_dir=tmp_path)  # the rerun fetches it again
    assert p.returncode == 0, p.stderr
    assert [q for q, _ in server.log] == [path] and local.read_bytes() == good


def test_a_500_on_the_listing_is_retried(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    api = '/api/datasets/codeparrot/codeparrot-clean/tree/main'
    server.faults[api] = ['500']
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [q for q, _ in server.log].count(api) == 3  # the 500, then the two pages


def test_a_cached_listing_follows_hf_base_to_a_mirror(server, tmp_path, gpt2_ranks):
    serve_codeparrot(server)
    second = '/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000002.json.gz'
    del server.files[second]  # the first run stops there, with the listing cached
    assert run(server, 'codeparrot', data_dir=tmp_path).returncode != 0
    assert (tmp_path / 'codeparrot' / 'raw' / 'listing.json').exists()
    server.files.clear()  # the old address serves nothing now
    server.log.clear()
    mirror = FixtureServer()
    try:
        serve_codeparrot(mirror)
        p = run(mirror, 'codeparrot', data_dir=tmp_path)
        assert p.returncode == 0, p.stderr
        assert [q for q, _ in mirror.log if 'resolve' in q] == [second] and not server.log
    finally:
        mirror.close()


def test_benchmark_files_are_checked_against_their_pinned_sha256(server, tmp_path, pd, monkeypatch, capsys):
    serve_benchmarks(server, pd)
    base = f'/openai/grade-school-math/{pd.gsm8k_commit}/grade_school_math/data'
    for split in ('train', 'test'):  # pin the fixture's bytes
        sha = hashlib.sha256(server.files[f'{base}/{split}.jsonl']).hexdigest()
        monkeypatch.setitem(pd.PINNED_SHA256, f'gsm8k/{split}.jsonl', sha)
    args = ['gsm8k', f'--github_base={server.url}', '--retries=0']
    pd.main(args + [f'--data_dir={tmp_path / "a"}'])
    assert (tmp_path / 'a' / 'gsm8k' / 'meta.json').exists()
    # a same-length edit that stays valid JSON is refused, deleted, and the way to accept it is named
    server.files[f'{base}/test.jsonl'] = server.files[f'{base}/test.jsonl'].replace(b'#### 198', b'#### 199')
    with pytest.raises(SystemExit) as e:
        pd.main(args + [f'--data_dir={tmp_path / "b"}'])
    assert 'test.jsonl: sha256' in str(e.value) and 'is not the pinned' in str(e.value)
    assert '--allow_unpinned=true' in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'b' / 'gsm8k' / 'meta.json').exists()
    assert not (tmp_path / 'b' / 'gsm8k' / 'raw' / 'test.jsonl').exists()
    pd.main(args + [f'--data_dir={tmp_path / "b"}', '--allow_unpinned=true'])
    assert 'test.jsonl is not the pinned version' in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / 'b' / 'gsm8k' / 'test.jsonl')]
    assert rows[99]['answer'].endswith('#### 199')
