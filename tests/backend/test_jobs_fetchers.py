"""`jobs._get_fetcher` keeps one ImageFetcher per Label Studio base URL, for a bounded number of URLs (hostnames
arrive with requests)."""

from __future__ import annotations

import gc
from collections import OrderedDict

import pytest

from backend import jobs
from backend.settings import Settings


@pytest.fixture()
def fetchers(monkeypatch: pytest.MonkeyPatch) -> OrderedDict:
    cache: OrderedDict = OrderedDict()
    monkeypatch.setattr(jobs, "_fetchers", cache)
    monkeypatch.setattr(jobs, "FETCHER_CACHE_SIZE", 4)
    return cache


def test_a_reused_hostname_gets_the_same_fetcher_and_the_cache_stays_bounded(fetchers) -> None:
    settings = Settings(label_studio_url=None)
    kept = jobs._get_fetcher(settings, "http://ls-kept.test")
    assert jobs._get_fetcher(settings, "http://ls-kept.test/") is kept
    for n in range(10):
        jobs._get_fetcher(settings, f"http://ls-{n}.test")
        assert len(fetchers) <= 4
        assert jobs._get_fetcher(settings, "http://ls-kept.test") is kept  # recently used: never evicted
    assert list(fetchers) == ["http://ls-7.test", "http://ls-8.test", "http://ls-9.test", "http://ls-kept.test"]
    jobs._get_fetcher(settings, "http://ls-0.test")  # evicted earlier: made again, evicting the oldest
    assert list(fetchers) == ["http://ls-8.test", "http://ls-9.test", "http://ls-kept.test", "http://ls-0.test"]


def test_an_evicted_fetcher_stays_usable_while_held_and_is_closed_once_let_go(fetchers) -> None:
    settings = Settings(label_studio_url=None)
    evicted = jobs._get_fetcher(settings, "http://ls-first.test")
    client = evicted._client
    for n in range(4):
        jobs._get_fetcher(settings, f"http://ls-{n}.test")
    assert "http://ls-first.test" not in fetchers
    assert not client.is_closed  # a thread still fetching with it is not cut off
    del evicted
    gc.collect()
    assert client.is_closed


def test_with_label_studio_url_set_every_hostname_shares_one_fetcher(fetchers) -> None:
    settings = Settings(label_studio_url="http://ls.test:8080")
    first = jobs._get_fetcher(settings, "http://elsewhere.test")
    assert jobs._get_fetcher(settings, None) is first
    assert list(fetchers) == ["http://ls.test:8080"]
