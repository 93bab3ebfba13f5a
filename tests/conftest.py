import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nca_gpt  # noqa: E402


@pytest.fixture
def nca(monkeypatch):
    """nca_gpt on the CPU with its config restored after the test."""
    for k in nca_gpt.config_keys:
        monkeypatch.setattr(nca_gpt, k, getattr(nca_gpt, k))
    monkeypatch.setattr(nca_gpt, 'device', 'cpu')
    nca_gpt.rule_set.cache_clear()
    return nca_gpt


def pytest_addoption(parser):
    parser.addoption('--slow', action='store_true', help='also run the tests marked slow (minutes each on a CPU)')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: minutes on a CPU; skipped unless pytest is given --slow')


def pytest_collection_modifyitems(config, items):
    if not config.getoption('--slow'):
        for item in items:
            if 'slow' in item.keywords:
                item.add_marker(pytest.mark.skip(reason='slow: run with `python -m pytest -q tests --slow`'))

# offline, tiktoken cannot download GPT-2's ranks: point TIKTOKEN_CACHE_DIR (tiktoken's own variable) or
# NCA_TIKTOKEN_CACHE at a folder that holds them (README: Installing)
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.environ.get('NCA_TIKTOKEN_CACHE'):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(os.environ['NCA_TIKTOKEN_CACHE'])


@pytest.fixture(scope='session')
def gpt2_ranks():
    """For a test that needs GPT-2's tokenizer: skipped, in one line that says how to provide the ranks, where
    tiktoken can neither find them in its cache nor fetch them (offline). CI sets TIKTOKEN_CACHE_DIR: it runs all."""
    import tiktoken
    try:
        tiktoken.get_encoding('r50k_base')
    except Exception as e:  # offline: requests' ConnectionError, a proxy's error
        pytest.skip(f"GPT-2's ranks are unavailable ({type(e).__name__}): put r50k_base.tiktoken in a folder as "
                    f"0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4 and set TIKTOKEN_CACHE_DIR to it (README: Installing)")


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 for the download tests (tests/fixture_server.py)."""
    from fixture_server import FixtureServer
    s = FixtureServer()
    yield s
    s.close()


@pytest.fixture
def pd(monkeypatch):
    """prepare_data run in this process, its config restored after the test."""
    import prepare_data
    for k in prepare_data.config_keys:
        monkeypatch.setattr(prepare_data, k, getattr(prepare_data, k))
    return prepare_data
