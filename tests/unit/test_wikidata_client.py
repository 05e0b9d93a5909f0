"""WikidataClient against a real HTTP server on 127.0.0.1 (connectors.replay) replaying the
recorded day (data/wikidata_day, see its SOURCES.md) and small folders built in the test.
Waits go through an injected `sleep` that records them, so retries cost no wall time."""
from __future__ import annotations

import json
import shutil

import pytest

from connectors.replay import ReplayServer
from connectors.wikidata import WikidataAPIError, WikidataClient, WikidataError
from tests.conftest import DAY_END as END
from tests.conftest import DAY_START as START
from tests.conftest import WIKIDATA_DAY as DAY


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(srv: ReplayServer, **kw) -> tuple[WikidataClient, Sleeps]:
    sleeps = Sleeps()
    kw.setdefault("rate_limit_per_s", None)
    kw.setdefault("timeout_s", 5)
    return WikidataClient(endpoint=srv.url, sleep=sleeps, seed=0, **kw), sleeps


def test_recent_changes_follow_continuation_across_pages(server):
    client, _ = client_for(server, contact="ops@example.org")
    refs = list(client.recent_changes(START, END))
    assert len(refs) == 12 and client.stats.requests == 3  # pages of 5, 5, 2
    assert [r.timestamp for r in refs] == sorted(r.timestamp for r in refs)
    rc_params = [r["params"] for r in server.requests]
    assert "rccontinue" not in rc_params[0] and rc_params[1]["rccontinue"].startswith("2024-05-01T")
    assert all(p["rcdir"] == "newer" and p["rcnamespace"] == "0" and p["rclimit"] == "max" for p in rc_params)
    by_rev = {r.revid: r for r in refs}
    assert by_rev[2150000108].is_bot and by_rev[2150000108].user == "KrBot"
    assert by_rev[2150000106].is_anon and "mw-reverted" in by_rev[2150000106].tags
    assert by_rev[2150000102].kind == "new" and by_rev[2150000102].old_revid == 0
    # Etiquette: descriptive UA with the contact, maxlag, gzip asked for and answered.
    headers = server.requests[0]["headers"]
    assert "ops@example.org" in headers["User-Agent"] and headers["User-Agent"].startswith("kedit/")
    assert "gzip" in headers["Accept-Encoding"]
    assert rc_params[0]["maxlag"] == "5" and rc_params[0]["format"] == "json"


def test_window_is_half_open(server):
    client, _ = client_for(server)
    refs = list(client.recent_changes("2024-05-01T09:02:40Z", "2024-05-01T12:00:05Z"))
    assert [r.revid for r in refs] == [2150000103, 2150000104, 2150000105]


def test_entities_at_revisions_batches_and_continuation():
    srv = ReplayServer(DAY, rev_page_size=3)  # force the API to continue within one request batch
    with srv:
        client, _ = client_for(srv)
        revids = [196015688, 2150000101, 619336121, 2150000103, 2150000109, 2150000104, 2150000001]
        ents = client.entities_at_revisions(revids)
        assert set(ents) == set(revids)
        assert ents[196015688]["id"] == "Q42" and ents[2150000109]["id"] == "Q1040"
        rev_calls = [r["params"] for r in srv.requests if r["params"].get("prop") == "revisions"]
        assert len(rev_calls) == 3 and "rvcontinue" in rev_calls[1]


def test_more_than_50_revisions_are_split_into_requests_of_50(server):
    client, _ = client_for(server)
    many = client.fetch_revisions(list(range(1, 121)))
    assert len(many.problems) == 120 and all("no such revision" in v for v in many.problems.values())
    sizes = [len(r["params"]["revids"].split("|")) for r in server.requests if "revids" in r["params"]]
    assert sizes == [50, 50, 20]


def test_maxlag_is_honoured_with_retry_after(server):
    client, sleeps = client_for(server)
    server.inject("maxlag", retry_after=7, times=2)
    refs = list(client.recent_changes(START, END))
    assert len(refs) == 12
    assert sleeps == [7.0, 7.0] and client.stats.retries == 2


def test_maxlag_without_header_waits_maxlag_seconds(server):
    client, sleeps = client_for(server)
    server.inject("maxlag")
    client.labels(["Q42"])
    assert sleeps == [5.0]


def test_429_and_500_back_off_exponentially_with_jitter(server):
    client, sleeps = client_for(server, backoff_base_s=1.0)
    server.inject("status", status=429, retry_after=3)
    server.inject("status", status=500, times=2)
    server.inject("status", status=503)
    labels = client.labels(["Q42"])
    assert labels["Q42"].label == "Douglas Adams"
    assert sleeps[0] == 3.0  # Retry-After from the 429
    # Attempts 1, 2, 3 without Retry-After: base * 2**attempt times a jitter in [0.5, 1.5).
    for attempt, wait in zip((1, 2, 3), sleeps[1:]):
        assert 0.5 * 2 ** attempt <= wait < 1.5 * 2 ** attempt
    assert len(sleeps) == 4


def test_timeouts_and_truncated_json_are_retried(server):
    client, sleeps = client_for(server, timeout_s=0.3, backoff_base_s=0.01)
    server.inject("slow", delay_s=1.0)
    server.inject("truncate")
    refs = list(client.recent_changes(START, "2024-05-01T08:00:00Z"))
    assert [r.item for r in refs] == ["Q42"]
    assert len(sleeps) == 2 and client.stats.retries == 2


def test_gives_up_with_a_clear_error_after_max_retries(server):
    client, sleeps = client_for(server, max_retries=2, backoff_base_s=0.01)
    server.inject("status", status=502, times=3)
    with pytest.raises(WikidataError, match="failed 3 times; last: HTTP 502"):
        client.labels(["Q42"])
    assert len(sleeps) == 2


def test_other_api_errors_are_not_retried(server):
    client, sleeps = client_for(server)
    with pytest.raises(WikidataAPIError, match="badvalue"):
        client.request({"action": "query", "list": "nonsense"})
    assert sleeps == [] and client.stats.requests == 1


def test_rate_limit_spaces_requests(server):
    client, sleeps = client_for(server, rate_limit_per_s=4)
    list(client.recent_changes(START, END))  # 3 requests
    # The client waits out the rest of each 0.25 s slot (the replay answers far faster).
    assert len(sleeps) == 2 and all(0.0 < s <= 0.25 for s in sleeps)


def test_missing_entity_hidden_and_malformed_revisions(tmp_path, server):
    client, _ = client_for(server)
    labels = client.labels(["Q42", "Q6", "Q999000101"])
    assert set(labels) == {"Q42", "Q999000101"}  # Q6 is missing: left out, no crash
    assert labels["Q999000101"].label == "Lena Hartmann" and labels["Q42"].lang == "en"
    batch = client.fetch_revisions([2150000112, 2150000101, 1])
    assert batch.problems[2150000112].startswith("content hidden")
    assert batch.problems[1].startswith("no such revision")
    assert batch.refs[2150000101].user == "ExampleEditor" and batch.entities[2150000101]["id"] == "Q42"
    # A revision whose stored content is not valid JSON.
    folder = tmp_path / "broken"
    shutil.copytree(DAY, folder)
    rec = json.loads((folder / "revisions" / "2150000104.json").read_text())
    rec.pop("entity")
    rec["content"] = '{"type": "item", "id": "Q131261", "claims": {"P54": [{"mainsnak": '
    (folder / "revisions" / "2150000104.json").write_text(json.dumps(rec))
    with ReplayServer(folder) as url:
        broken = WikidataClient(endpoint=url, rate_limit_per_s=None)
        b = broken.fetch_revisions([2150000104, 2150000001])
        assert "unreadable entity JSON" in b.problems[2150000104] and 2150000001 in b.entities


def test_item_revisions_for_backfill_with_continuation():
    srv = ReplayServer(DAY, rev_page_size=1)
    with srv:
        client, _ = client_for(srv)
        pages = list(client.item_revisions("Q1040", "2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z"))
        revids = [r for p in pages for r in p.refs]
        assert revids == [2150000103, 2150000109] and len(pages) == 2
        assert pages[1].refs[2150000109].old_revid == 2150000103
        with pytest.raises(WikidataError, match="does not exist"):
            list(client.item_revisions("Q123456789", "2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z"))


def test_users_info(server):
    client, _ = client_for(server)
    info = client.users_info(["Xyzzy2024", "NoSuchUser"])
    assert info == {"Xyzzy2024": {"editcount": 3, "registration": "2024-04-30T22:10:00Z"}}
