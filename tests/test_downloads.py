"""prepare_data.py's downloads against a local server on 127.0.0.1 (a listing's sha256, a server that ignores Range,
HTTP 429, a --max_tokens budget reached inside a shard), and eval.py compare's --png with and without matplotlib.
Offline, seconds."""
import builtins
import hashlib
import json
import os

import pytest

from conftest import ROOT  # noqa: F401 (puts the repository on sys.path)
from test_eval import write_log
from test_prepare import DOCS, expected_tokens, jsonl_gz, read_bin, run
import eval as ev

API = '/api/datasets/codeparrot/codeparrot-clean/tree/main'
RESOLVE = '/datasets/codeparrot/codeparrot-clean/resolve/main'


def serve_listed(server, shards, sha=True):
    """codeparrot's shards, listed with their size and (as Hugging Face lists large files) their sha256 as the LFS oid."""
    items = []
    for i, docs in enumerate(shards):
        name, body = f'file-{i + 1:012d}.json.gz', jsonl_gz([{'content': d} for d in docs])
        server.files[f'{RESOLVE}/{name}'] = body
        lfs = {'oid': hashlib.sha256(body).hexdigest(), 'size': len(body)} if sha else None
        items.append({'type': 'file', 'path': name, 'size': len(body), 'lfs': lfs})
    server.files[API] = json.dumps(items).encode()
    return [f'{RESOLVE}/file-{i + 1:012d}.json.gz' for i in range(len(shards))]


def test_a_download_is_checked_against_the_listings_sha256(server, tmp_path, gpt2_ranks):
    paths = serve_listed(server, [DOCS[:30], DOCS[30:]])
    good = server.files[paths[0]]
    server.files[paths[0]] = good[:-8] + bytes(b ^ 0xFF for b in good[-8:])  # same size, other bytes
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode != 0 and 'sha256 mismatch' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-2000:]
    raw = tmp_path / 'codeparrot' / 'raw'
    assert not (raw / 'file-000000000001.json.gz').exists() and not (raw / 'file-000000000001.json.gz.part').exists()
    server.files[paths[0]] = good  # fixed upstream: the rerun fetches it again and goes on
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / 'codeparrot' / 'meta.json').read_text())
    assert [f['sha256'] for f in meta['fetched']] == [hashlib.sha256(server.files[q]).hexdigest() for q in paths]


def test_a_server_that_ignores_range_is_read_from_the_start(server, tmp_path, gpt2_ranks):
    paths = serve_listed(server, [DOCS])
    server.faults[paths[0]] = ['cut', 'norange']  # cut half-way; then the resume's Range is ignored: 200, whole file
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    size = len(server.files[paths[0]])
    assert [r for q, r in server.log if q == paths[0]] == [None, f'bytes={size // 2}-']
    assert (tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz').read_bytes() == server.files[paths[0]]
    assert read_bin(tmp_path, 'codeparrot', 'train') == expected_tokens([DOCS])['train']


def test_http_429_is_retried(server, tmp_path, gpt2_ranks):
    paths = serve_listed(server, [DOCS])
    server.faults[API] = ['429']
    server.faults[paths[0]] = ['429', '429']
    p = run(server, 'codeparrot', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count('HTTP 429; retrying') == 3
    assert [q for q, _ in server.log] == [API, API, paths[0], paths[0], paths[0]]
    assert read_bin(tmp_path, 'codeparrot', 'train') == expected_tokens([DOCS])['train']


def test_max_tokens_reached_inside_a_shard(server, tmp_path, gpt2_ranks):
    """prepare_data.py tokenises 1,024 documents at a time and stops once the budget is met: inside the first shard
    of 2,500 documents here; the second shard is never fetched."""
    docs = [f'doc {i}: ' + 'word ' * (i % 5) for i in range(2500)]
    paths = serve_listed(server, [docs, DOCS])
    p = run(server, 'codeparrot', '--max_tokens=100', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / 'codeparrot' / 'meta.json').read_text())
    assert meta['documents'] == 1024 and meta['max_tokens'] == 100 and len(meta['fetched']) == 1
    assert paths[1] not in [q for q, _ in server.log]
    want = expected_tokens([docs[:1024]])
    assert read_bin(tmp_path, 'codeparrot', 'train') == want['train'] and len(want['train']) >= 100


@pytest.fixture
def two_arms(tmp_path, monkeypatch):
    write_log(tmp_path / 'base-s1', [(0, 5.0), (200, 3.0), (400, 2.0)])
    write_log(tmp_path / 'nca-s1', [(0, 5.0), (200, 2.5), (400, 1.9)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, 'runs', 'base=base-s*,nca=nca-s*')
    monkeypatch.setattr(ev, 'baseline', '')
    monkeypatch.setattr(ev, 'png', str(tmp_path / 'compare.png'))
    return tmp_path


def test_compare_png_with_matplotlib(two_arms, capsys):
    pytest.importorskip('matplotlib')
    result = ev.eval_compare(None)
    png = (two_arms / 'compare.png').read_bytes()
    assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 5000
    assert f"wrote {two_arms / 'compare.png'}" in capsys.readouterr().out
    assert result['arms']['nca']['final_loss'] == 1.9


def test_compare_png_without_matplotlib(two_arms, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split('.')[0] == 'matplotlib':
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # as Python raises it
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_matplotlib)
    result = ev.eval_compare(None)
    out = capsys.readouterr().out
    assert 'no matplotlib: the plot is skipped (pip install matplotlib); the table and JSON are whole' in out
    assert not (two_arms / 'compare.png').exists()
    assert result['arms']['nca']['final_loss'] == 1.9 and result['baseline'] == 'base'
    assert sorted(os.listdir(two_arms)) == ['base-s1', 'nca-s1']
