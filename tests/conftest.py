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
    nca_gpt._rule_sets.clear()
    return nca_gpt

# offline, tiktoken cannot download GPT-2's ranks: use ../shared/tiktoken-cache when it is there (README: Installing)
_cache = os.path.join(ROOT, '..', 'shared', 'tiktoken-cache')
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(_cache):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(_cache)
