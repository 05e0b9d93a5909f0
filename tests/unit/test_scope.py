"""What a deployment follows and the settings around it: the `follow` scope (all items, a
list of items, a sitelink floor) read from settings and applied while ingesting the
recorded day (replayed from 127.0.0.1 into a DuckDB file), one default for bot edits, and
the User-Agent contact from KEDIT_CONTACT."""
from __future__ import annotations

import logging

import pytest

from flows.services.ingest import ingest_window
from connectors.replay import ReplayServer
from connectors.wikidata import WikidataClient
from flows.services import steps
from flows.services.settings import PipelineSettings
from kedit_core.filters import FilterConfig, FollowSpecError, parse_follow
from storage import wikidata_store
from storage.db import open_db
from tests.conftest import DAY_END as END
from tests.conftest import DAY_START as START


def _ingest(server: ReplayServer, db, follow: str) -> dict[int, tuple[str, str | None]]:
    cfg = steps.filter_config(PipelineSettings(follow=follow))
    client = WikidataClient(endpoint=server.url, rate_limit_per_s=None)
    try:
        ingest_window(client, db, START, END, cfg)
    finally:
        client.close()
    return {r["revid"]: (r["status"], r["reason"]) for r in wikidata_store.revision_rows(db)}


def test_follow_is_read_as_all_a_list_of_items_or_a_sitelink_floor():
    assert parse_follow("all") == (None, 0) and parse_follow("") == (None, 0) and parse_follow(None) == (None, 0)
    assert parse_follow("Q42, Q1040") == (frozenset({"Q42", "Q1040"}), 0)
    assert parse_follow(["Q42"]) == (frozenset({"Q42"}), 0)
    assert parse_follow("sitelinks>=25") == (None, 25) and parse_follow("sitelinks >= 3") == (None, 3)
    with pytest.raises(FollowSpecError, match=r"'Douglas Adams' is not an item id; use 'all', a comma-separated"):
        parse_follow("Q42,Douglas Adams")
    with pytest.raises(FollowSpecError, match="'sitelinks>5' is not an item id"):
        PipelineSettings(follow="sitelinks>5")  # refused when the settings are made, before any work


def test_follow_comes_from_the_environment_and_reaches_the_filter(monkeypatch):
    monkeypatch.setenv("KEDIT_FOLLOW", "sitelinks>=10")
    cfg = steps.filter_config(PipelineSettings.from_env())
    assert (cfg.follow_items, cfg.min_sitelinks) == (None, 10)


def test_a_list_of_items_keeps_only_their_edits(server, kedit_home):
    db = open_db(kedit_home / "scope.duckdb")
    status = _ingest(server, db, "Q1040,Q42")
    assert status[2150000103] == ("diffed", None) and status[2150000109] == ("diffed", None)  # Q1040
    assert status[2150000101] == ("diffed", None)  # Q42
    assert status[2150000104] == ("filtered", "not followed: Q131261 is not in the followed items")
    assert status[2150000106] == ("filtered", "not followed: Q571 is not in the followed items")
    assert {c.subject for c in wikidata_store.get_fact_changes(db)} == {"Q1040", "Q42"}


def test_a_sitelink_floor_drops_items_below_it_with_the_count(server, kedit_home):
    db = open_db(kedit_home / "scope.duckdb")
    status = _ingest(server, db, "sitelinks>=1")
    # The new item for the new mayor has no sitelink yet; the recorded real items keep one (enwiki).
    assert status[2150000102] == ("filtered", "not followed: 0 sitelinks (follow: sitelinks>=1)")
    dropped = [r for r in wikidata_store.fact_change_rows(db) if r["subject"] == "Q999000101"]
    assert dropped and {(r["status"], r["reason"]) for r in dropped} == {
        ("filtered", "not followed: 0 sitelinks (follow: sitelinks>=1)")}
    assert status[2150000103] == ("diffed", None) and status[2150000105] == ("diffed", None)
    everything = _ingest(server, open_db(kedit_home / "all.duckdb"), "all")
    assert everything[2150000102] == ("diffed", None)


def test_bot_edits_are_off_by_default_everywhere():
    assert PipelineSettings().allow_bots is False and FilterConfig().allow_bots is False
    assert steps.filter_config(PipelineSettings.from_env()).allow_bots is False


def test_the_user_agent_contact_comes_from_kedit_contact(server, monkeypatch, caplog):
    monkeypatch.setenv("KEDIT_CONTACT", "wikidata-ops@example.net")
    settings = PipelineSettings.from_env(endpoint=server.url, rate_limit_per_s=0)
    assert settings.user_agent_contact == "wikidata-ops@example.net"
    client = settings.wikidata_client()
    try:
        list(client.recent_changes(START, END))
    finally:
        client.close()
    ua = server.requests[0]["headers"]["User-Agent"]
    assert ua.startswith("kedit/") and "(wikidata-ops@example.net)" in ua
    # Without one, the real API gets a User-Agent naming the variable, and the operator a warning.
    monkeypatch.delenv("KEDIT_CONTACT")
    with caplog.at_level(logging.WARNING, logger="connectors.wikidata"):
        anonymous = PipelineSettings.from_env().wikidata_client()
    anonymous.close()
    assert "set KEDIT_CONTACT" in anonymous.user_agent
    assert any("set KEDIT_CONTACT" in r.getMessage() for r in caplog.records)
