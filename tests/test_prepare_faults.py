"""prepare_data.py's faults that must lose nothing (issue 28). A fault of the machine (GPT-2's ranks missing, a disk
that is full or refuses a write) is told from a fault of the data (a download that fails its checksum or cannot be
read as its format): only a corrupt file is deleted; otherwise the downloads and finished shards are kept, the error
is one line, and a rerun resumes. Offline, seconds."""
import errno
import gzip
import json
import os

import pytest

from conftest import ROOT  # noqa: F401 (puts the repository on sys.path)
from fixture_server import serve_benchmarks
from test_prepare import DOCS, jsonl_gz, run
import prepare_data

API = '/api/datasets/codeparrot/codeparrot-clean/tree/main'
SHARD = '/datasets/codeparrot/codeparrot-clean/resolve/main/file-000000000001.json.gz'


def serve_one_shard(server):
    body = jsonl_gz([{'content': d} for d in DOCS])
    server.files[SHARD] = body
    server.files[API] = json.dumps([{'type': 'file', 'path': os.path.basename(SHARD), 'size': len(body)}]).encode()
    return body


def byte_corpus(server, tmp_path, *extra):
    """The arguments of an in-process run on the served shard, as bytes: no GPT-2 ranks needed."""
    return ['codeparrot', '--tokenizer=bytes', f'--data_dir={tmp_path}', f'--hf_base={server.url}',
            '--val_fraction=0.2', *extra]


def failing_open(monkeypatch, pd, err, fails):
    """Make prepare_data's open() raise OSError(err) for the paths and modes where fails(path, mode) holds."""
    real_open = open

    def fake_open(file, mode='r', *args, **kwargs):
        if fails(str(file), mode):
            raise OSError(err, os.strerror(err), str(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(pd, 'open', fake_open, raising=False)  # found before the builtin


def test_missing_gpt2_ranks_are_named_before_anything_is_downloaded(server, tmp_path):
    """Offline with an empty ranks cache, the old script fetched the first shard, failed to fetch the ranks inside
    the tokenizer, called the good download corrupt and deleted it."""
    serve_one_shard(server)
    empty = tmp_path / 'empty-cache'
    empty.mkdir()
    offline = 'http://127.0.0.1:9'  # a proxy that refuses: tiktoken cannot fetch the ranks; 127.0.0.1 is direct
    env = {**os.environ, 'TIKTOKEN_CACHE_DIR': str(empty), 'NO_PROXY': '127.0.0.1', 'no_proxy': '127.0.0.1',
           'HTTPS_PROXY': offline, 'https_proxy': offline, 'HTTP_PROXY': offline, 'http_proxy': offline}
    p = run(server, 'codeparrot', data_dir=tmp_path / 'data', env=env)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for words in ('r50k_base.tiktoken', '0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4', 'TIKTOKEN_CACHE_DIR', str(empty)):
        assert words in p.stderr, p.stderr
    assert server.log == []  # nothing fetched, not even the listing
    # a byte corpus needs no ranks: it is made, without its gzip ratio
    p = run(server, 'codeparrot', '--tokenizer=bytes', data_dir=tmp_path / 'data', env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / 'data' / 'codeparrot' / 'meta.json').read_text())['gzip_ratio'] is None


@pytest.mark.parametrize('err', [errno.ENOSPC, errno.EACCES, errno.EFBIG])
def test_an_error_writing_tokens_keeps_the_download(server, tmp_path, pd, monkeypatch, err):
    body = serve_one_shard(server)
    failing_open(monkeypatch, pd, err, lambda path, mode: os.sep + 'tokens' + os.sep in path and 'w' in mode)
    args = byte_corpus(server, tmp_path, '--retries=0')
    with pytest.raises(SystemExit) as e:
        pd.main(args)
    message = str(e.value)
    assert os.strerror(err) in message and 'rerun' in message and 'corrupt' not in message, message
    assert '\n' not in message
    assert (tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz').read_bytes() == body
    assert not [f for f in os.listdir(tmp_path / 'codeparrot' / 'tokens') if f.endswith('.part')]
    monkeypatch.delattr(pd, 'open')  # the disk is fixed: the rerun tokenises the kept download, fetching nothing
    server.log.clear()
    pd.main(args)
    assert server.log == [] and (tmp_path / 'codeparrot' / 'meta.json').exists()


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux), a device that is always full')
def test_a_disk_that_fills_while_tokens_are_written_keeps_the_download(server, tmp_path, pd, monkeypatch):
    """The write itself fails (ENOSPC from /dev/full), and so does the flush when the file is closed."""
    body = serve_one_shard(server)
    real_open = open

    def full_disk(file, mode='r', *args, **kwargs):
        if str(file).endswith('.bin.part'):
            real_open(file, mode).close()  # the .part file exists, as on a disk that filled up after opening it
            return real_open('/dev/full', mode)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(pd, 'open', full_disk, raising=False)
    with pytest.raises(SystemExit) as e:
        pd.main(byte_corpus(server, tmp_path))
    assert os.strerror(errno.ENOSPC) in str(e.value) and 'rerun' in str(e.value), str(e.value)
    assert (tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz').read_bytes() == body
    assert not [f for f in os.listdir(tmp_path / 'codeparrot' / 'tokens') if f.endswith('.part')]


def test_an_error_writing_train_bin_keeps_the_finished_shards(server, tmp_path, pd, monkeypatch):
    """The old script let this OSError out as a traceback."""
    serve_one_shard(server)
    failing_open(monkeypatch, pd, errno.ENOSPC, lambda path, mode: '.bin.tmp' in path)
    args = byte_corpus(server, tmp_path)
    with pytest.raises(SystemExit) as e:
        pd.main(args)
    assert os.strerror(errno.ENOSPC) in str(e.value) and 'rerun' in str(e.value) and '\n' not in str(e.value)
    assert (tmp_path / 'codeparrot' / 'tokens' / '00000.json').exists()
    assert not (tmp_path / 'codeparrot' / 'train.bin').exists()
    monkeypatch.delattr(pd, 'open')
    server.log.clear()
    pd.main(args)
    assert server.log == [] and (tmp_path / 'codeparrot' / 'meta.json').exists()


def test_a_download_that_cannot_be_written_is_not_retried_as_a_network_error(server, tmp_path, pd, monkeypatch):
    """The old script retried a refused write with back-off, then blamed the network and named a mirror option."""
    serve_one_shard(server)
    failing_open(monkeypatch, pd, errno.EACCES, lambda path, mode: path.endswith('.json.gz.part'))
    with pytest.raises(SystemExit) as e:
        pd.main(byte_corpus(server, tmp_path, '--retries=1'))
    message = str(e.value)
    assert os.strerror(errno.EACCES) in message and 'file-000000000001.json.gz.part' in message, message
    assert 'mirror' not in message and 'giving up' not in message, message
    assert [q for q, _ in server.log].count(SHARD) == 1


def test_a_benchmark_file_that_cannot_be_read_is_kept(server, tmp_path, pd, monkeypatch):
    """The old script called an unreadable file corrupt and deleted it."""
    serve_benchmarks(server, pd)

    def reading_train(path, mode):
        return path.endswith('raw/train.jsonl') and mode in ('r', 'rt')
    failing_open(monkeypatch, pd, errno.EACCES, reading_train)
    with pytest.raises(SystemExit) as e:
        pd.main(['gsm8k', f'--data_dir={tmp_path}', f'--github_base={server.url}', '--allow_unpinned=true'])
    message = str(e.value)
    assert os.strerror(errno.EACCES) in message and 'corrupt' not in message and 'rerun' in message, message
    assert (tmp_path / 'gsm8k' / 'raw' / 'train.jsonl').exists()


def test_a_corrupt_bigbench_task_is_named_deleted_and_fetched_again(server, tmp_path):
    """The old script let json's error out as a traceback, and kept the file."""
    serve_benchmarks(server, prepare_data)
    task = f'/google/BIG-bench/{prepare_data.bigbench_commit}/bigbench/benchmark_tasks/winowhy/task.json'
    good = server.files[task]
    server.files[task] = good[:len(good) // 2]  # cut short
    p = run(server, 'bbl', '--allow_unpinned=true', data_dir=tmp_path)
    local = tmp_path / 'bbl' / 'raw' / 'winowhy.json'
    assert p.returncode != 0 and 'corrupt' in p.stderr and local.name in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and not local.exists()
    server.files[task] = good
    server.log.clear()
    p = run(server, 'bbl', '--allow_unpinned=true', data_dir=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [q for q, _ in server.log if not q.startswith('/repos/')] == [task]  # the other tasks' files were kept


@pytest.mark.parametrize('fault', ['not gzip', 'cut short'])
def test_a_shard_that_is_not_its_format_is_corrupt_and_deleted(server, tmp_path, fault):
    """gzip's 'not a gzipped file' is an OSError, as a full disk is: it must still count as corrupt."""
    good = serve_one_shard(server)
    server.files[SHARD] = b'<html>rate limited</html>' if fault == 'not gzip' else good[:len(good) // 2]
    server.files[API] = json.dumps([{'type': 'file', 'path': os.path.basename(SHARD)}]).encode()  # no size
    p = run(server, 'codeparrot', '--tokenizer=bytes', data_dir=tmp_path)
    assert p.returncode != 0 and 'corrupt shard' in p.stderr and 'deleted' in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'codeparrot' / 'raw' / 'file-000000000001.json.gz').exists()


def test_a_corrupt_parquet_shard_is_named_and_deleted(server, tmp_path):
    """The old script let pyarrow's error out as a traceback, and kept the file."""
    pytest.importorskip('pyarrow')
    name = 'train-00000-of-00114-abc123.parquet'
    server.files[f'/datasets/open-web-math/open-web-math/resolve/main/data/{name}'] = b'PAR1' + b'\0' * 100
    server.files['/api/datasets/open-web-math/open-web-math/tree/main/data'] = \
        json.dumps([{'type': 'file', 'path': f'data/{name}'}]).encode()
    p = run(server, 'openwebmath', '--tokenizer=bytes', data_dir=tmp_path)
    assert p.returncode != 0 and 'corrupt shard' in p.stderr and name in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'openwebmath' / 'raw' / name).exists()


def test_a_source_without_the_text_field_names_the_option(server, tmp_path):
    """The old script called the user's file a corrupt shard (KeyError)."""
    src = tmp_path / 'docs.jsonl.gz'
    src.write_bytes(gzip.compress(b''.join(json.dumps({'body': d}).encode() + b'\n' for d in DOCS)))
    p = run(server, 'mine', f'--source={src}', '--tokenizer=bytes', data_dir=tmp_path / 'data')
    assert p.returncode != 0 and '--text_field' in p.stderr and "'text'" in p.stderr, p.stderr[-2000:]
    assert 'corrupt' not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert src.exists()

