"""A polite, resilient client for the Wikidata (MediaWiki) action API, built on `requests`.

What it asks for:
- `recent_changes(start, end)`: `list=recentchanges` in namespace 0 (edits and new items),
  oldest first, following `continue` to the end -> `RevisionRef`s;
- `fetch_revisions(revids)` / `entities_at_revisions(revids)`: entity JSON at given revisions
  (`prop=revisions`, 50 ids a request, the MediaWiki limit for content);
- `item_revisions(item, start, end)`: one item's revision history in a date range (backfill
  beyond the 30 days recent changes keep);
- `labels(ids)`: English labels via `wbgetentities` (50 ids a request, language fallback);
- `users_info(names)`: edit count and registration date (to spot new accounts).

Etiquette (https://meta.wikimedia.org/wiki/User-Agent_policy, API:Etiquette): a descriptive
User-Agent with a contact, `maxlag=5` with the server's `Retry-After` honoured, exponential
backoff with jitter on 429 / 5xx / timeouts / truncated answers, gzip (requests sends
`Accept-Encoding: gzip` and decodes it), one request at a time, and a rate limit.
`endpoint` is configurable so tests and the demo point it at `connectors.replay.ReplayServer`.
"""
from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests

from kedit_core.diff import EntityFormatError, parse_entity
from kedit_core.errors import KeditError
from kedit_core.revision import RevisionRef

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://www.wikidata.org/w/api.php"
DEFAULT_CONTACT = "https://github.com/kedit/kedit (set KEDIT_CONTACT to your e-mail)"
BATCH = 50  # MediaWiki's per-request limit for revids with content and for wbgetentities ids
REVPROPS = "content|ids|timestamp|tags|user|comment|flags"


class WikidataError(KeditError):
    """The Wikidata API could not give an answer; the message says what happened."""


class WikidataAPIError(WikidataError):
    """The API answered with an error that retrying will not fix."""

    def __init__(self, code: str, info: str):
        super().__init__(f"Wikidata API error {code}: {info}")
        self.code = code


@dataclass(frozen=True)
class EntityLabel:
    id: str
    label: str | None
    description: str | None = None
    aliases: tuple[str, ...] = ()
    lang: str | None = None  # the language the label is really in (fallback may differ from "en")


@dataclass
class RevisionBatch:
    """Entities at revisions, with each revision's metadata and why any could not be read."""

    entities: dict[int, dict[str, Any] | None] = field(default_factory=dict)  # None = empty page
    refs: dict[int, RevisionRef] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    waited_s: float = 0.0
    bytes: int = 0
    http_s: float = 0.0  # wall time inside HTTP calls (the API's latency plus transfer)


def iso(ts: datetime | str) -> str:
    """ISO 8601 UTC with a Z, as MediaWiki writes timestamps."""
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _flag(d: dict[str, Any], key: str) -> bool:
    # formatversion=2 writes booleans; formatversion=1 writes "" for true and omits false.
    return key in d and d[key] is not False


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class WikidataClient:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        user_agent: str | None = None,
        contact: str | None = None,
        rate_limit_per_s: float | None = 5.0,
        max_retries: int = 5,
        timeout_s: float = 30.0,
        maxlag: int = 5,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ):
        contact = contact or os.environ.get("KEDIT_CONTACT")
        if not contact:
            if endpoint == DEFAULT_ENDPOINT:  # Wikimedia's User-Agent policy asks for a way to reach the operator
                log.warning("no contact for the Wikidata User-Agent: set KEDIT_CONTACT to your e-mail or URL")
            contact = DEFAULT_CONTACT
        self.endpoint = endpoint
        self.user_agent = user_agent or f"kedit/0.1 ({contact}) python-requests/{requests.__version__}"
        self.min_interval_s = 1.0 / rate_limit_per_s if rate_limit_per_s else 0.0
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.maxlag = maxlag
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._last_request = 0.0
        self._one_at_a_time = threading.Lock()  # etiquette: never two requests in flight
        self.stats = ClientStats()
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": self.user_agent, "Accept-Encoding": "gzip"})

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> WikidataClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ one request, with retries

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.stats.waited_s += seconds
            self._sleep(seconds)

    def _throttle(self) -> None:
        if self.min_interval_s:
            gap = self._last_request + self.min_interval_s - time.monotonic()
            self._wait(gap)
        self._last_request = time.monotonic()

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter in [0.5, 1.5): many clients retrying do not stampede together.
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt) * (0.5 + self._rng.random())

    @staticmethod
    def _retry_after(resp: requests.Response) -> float | None:
        value = resp.headers.get("Retry-After")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                return None

    def request(self, params: dict[str, Any]) -> dict[str, Any]:
        """One API call (GET), retried on lag, throttling, server errors, timeouts and broken JSON."""
        with self._one_at_a_time:
            return self._request(params)

    def _request(self, params: dict[str, Any]) -> dict[str, Any]:
        params = {**params, "format": "json", "formatversion": "2", "maxlag": self.maxlag}
        reason = ""
        for attempt in range(self.max_retries + 1):
            self._throttle()
            wait: float
            try:
                self.stats.requests += 1
                t0 = time.perf_counter()
                try:
                    resp = self.session.get(self.endpoint, params=params, timeout=self.timeout_s)
                    _ = resp.content  # read the body inside the timed span
                finally:
                    self.stats.http_s += time.perf_counter() - t0
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                reason, wait = f"{type(exc).__name__}: {exc}", self._backoff(attempt)
            else:
                self.stats.bytes += len(resp.content)
                if resp.status_code == 429 or resp.status_code >= 500:
                    reason = f"HTTP {resp.status_code}"
                    wait = self._retry_after(resp) or self._backoff(attempt)
                elif resp.status_code >= 400:
                    raise WikidataError(f"HTTP {resp.status_code} from {self.endpoint}: {resp.text[:200]}")
                else:
                    try:
                        data = resp.json()
                    except ValueError as exc:  # a cut-off body: the connection dropped mid-answer
                        reason, wait = f"invalid or truncated JSON ({exc})", self._backoff(attempt)
                    else:
                        error = data.get("error") if isinstance(data, dict) else None
                        if not error:
                            return data
                        if error.get("code") != "maxlag":
                            raise WikidataAPIError(str(error.get("code")), str(error.get("info", "")))
                        # Replication lag above maxlag: the server says how long to stay away.
                        reason = f"maxlag: {error.get('info', '')}"
                        wait = self._retry_after(resp) or float(self.maxlag)
            if attempt == self.max_retries:
                break
            self.stats.retries += 1
            log.warning("wikidata request failed (%s); retry %d/%d in %.1fs", reason, attempt + 1,
                        self.max_retries, wait)
            self._wait(wait)
        raise WikidataError(f"Wikidata API at {self.endpoint} failed {self.max_retries + 1} times; last: {reason}")

    def _query_pages(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every page of a query, following MediaWiki's `continue` protocol to the end."""
        cont: dict[str, Any] = {}
        while True:
            data = self.request({**params, **cont})
            yield data
            if "continue" not in data:
                return
            cont = data["continue"]

    # ------------------------------------------------------------------ recent changes

    def recent_changes(self, start: datetime | str, end: datetime | str) -> Iterator[RevisionRef]:
        """Edits and item creations in namespace 0 with start <= timestamp < end, oldest first."""
        start_s, end_s = iso(start), iso(end)
        params = {
            "action": "query", "list": "recentchanges", "rcnamespace": "0", "rctype": "edit|new",
            "rcdir": "newer", "rcstart": start_s, "rcend": end_s, "rclimit": "max",
            "rcprop": "title|ids|timestamp|user|flags|tags|comment",
        }
        for data in self._query_pages(params):
            for rc in (data.get("query") or {}).get("recentchanges", []):
                if rc.get("timestamp", "") >= end_s:  # rcend is inclusive; windows are half-open
                    continue
                yield RevisionRef(
                    item=rc["title"], revid=int(rc["revid"]), old_revid=int(rc.get("old_revid") or 0),
                    timestamp=rc["timestamp"], user="" if _flag(rc, "userhidden") else rc.get("user", ""),
                    is_bot=_flag(rc, "bot"), is_anon=_flag(rc, "anon"), tags=tuple(rc.get("tags") or ()),
                    comment=rc.get("comment", "") or "", kind=rc.get("type", "edit"),
                )

    # ------------------------------------------------------------------ revisions

    @staticmethod
    def _read_revision(page: dict[str, Any], rev: dict[str, Any], batch: RevisionBatch) -> None:
        revid = int(rev["revid"])
        batch.refs[revid] = RevisionRef(
            item=page.get("title", ""), revid=revid, old_revid=int(rev.get("parentid") or 0),
            timestamp=rev.get("timestamp", ""), user="" if _flag(rev, "userhidden") else rev.get("user", ""),
            is_bot=False, is_anon=_flag(rev, "anon"), tags=tuple(rev.get("tags") or ()),
            comment=rev.get("comment", "") or "", kind="new" if not rev.get("parentid") else "edit",
        )
        slot = (rev.get("slots") or {}).get("main") or {}
        if _flag(rev, "texthidden") or _flag(slot, "texthidden"):
            batch.problems[revid] = "content hidden (revision deleted or suppressed)"
            return
        content = slot.get("content", slot.get("*"))
        if content is None:
            batch.problems[revid] = "revision has no main-slot content"
            return
        try:
            batch.entities[revid] = parse_entity(content)
        except EntityFormatError as exc:
            batch.problems[revid] = f"unreadable entity JSON: {exc}"

    def fetch_revisions(self, revids: Iterable[int]) -> RevisionBatch:
        """Entities at the given revisions (50 a request); unreadable ones land in `problems`."""
        batch = RevisionBatch()
        wanted = sorted({int(r) for r in revids if r})
        for chunk in _chunks(wanted, BATCH):
            params = {"action": "query", "prop": "revisions", "revids": "|".join(map(str, chunk)),
                      "rvprop": REVPROPS, "rvslots": "main"}
            for data in self._query_pages(params):
                query = data.get("query") or {}
                for bad in _as_list(query.get("badrevids")):
                    batch.problems[int(bad["revid"])] = "no such revision (deleted or never existed)"
                for page in query.get("pages", []):
                    for rev in page.get("revisions", []):
                        self._read_revision(page, rev, batch)
            for r in chunk:
                if r not in batch.entities and r not in batch.problems:
                    batch.problems[r] = "revision missing from the API answer"
        return batch

    def entities_at_revisions(self, revids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{revid: entity JSON}; revisions that cannot be read are left out (see fetch_revisions)."""
        batch = self.fetch_revisions(revids)
        for revid, why in batch.problems.items():
            log.warning("revision %d skipped: %s", revid, why)
        return {r: e for r, e in batch.entities.items() if e is not None}

    def item_revisions(self, item: str, start: datetime | str, end: datetime | str) -> Iterator[RevisionBatch]:
        """One item's revisions with start <= timestamp < end, oldest first, one batch per API page."""
        start_s, end_s = iso(start), iso(end)
        params = {"action": "query", "prop": "revisions", "titles": item, "rvprop": REVPROPS, "rvslots": "main",
                  "rvdir": "newer", "rvstart": start_s, "rvend": end_s, "rvlimit": str(BATCH)}
        for data in self._query_pages(params):
            batch = RevisionBatch()
            for page in (data.get("query") or {}).get("pages", []):
                if _flag(page, "missing"):
                    raise WikidataError(f"item {item} does not exist")
                for rev in page.get("revisions", []):
                    if rev.get("timestamp", "") < end_s:
                        self._read_revision(page, rev, batch)
            yield batch

    # ------------------------------------------------------------------ labels and users

    def labels(self, ids: Iterable[str], lang: str = "en") -> dict[str, EntityLabel]:
        """Labels of entities (missing entities are left out); `lang` with MediaWiki's fallback chain."""
        out: dict[str, EntityLabel] = {}
        wanted = sorted(set(ids))
        for chunk in _chunks(wanted, BATCH):
            try:
                out.update(self._labels_chunk(chunk, lang))
            except WikidataAPIError as exc:
                # One malformed or deleted id fails the whole request: ask one by one instead.
                if len(chunk) == 1:
                    log.warning("no label for %s: %s", chunk[0], exc)
                    continue
                for one in chunk:
                    try:
                        out.update(self._labels_chunk([one], lang))
                    except WikidataAPIError as exc1:
                        log.warning("no label for %s: %s", one, exc1)
        return out

    def _labels_chunk(self, ids: list[str], lang: str) -> dict[str, EntityLabel]:
        data = self.request({"action": "wbgetentities", "ids": "|".join(ids), "props": "labels|descriptions|aliases",
                             "languages": lang, "languagefallback": "1"})
        out = {}
        for eid, ent in (data.get("entities") or {}).items():
            if "missing" in ent:
                continue

            def term(part: str) -> tuple[str | None, str | None]:
                t = (ent.get(part) or {}).get(lang)
                return (t.get("value"), t.get("language")) if isinstance(t, dict) else (None, None)

            label, label_lang = term("labels")
            description, _ = term("descriptions")
            aliases = tuple(a.get("value", "") for a in (ent.get("aliases") or {}).get(lang, []) or [])
            out[eid] = EntityLabel(eid, label, description, aliases, label_lang)
        return out

    def users_info(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{user: {"editcount": int | None, "registration": ISO str | None}} for registered users."""
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted({n for n in names if n}), BATCH):
            data = self.request({"action": "query", "list": "users", "ususers": "|".join(chunk),
                                 "usprop": "editcount|registration"})
            for u in (data.get("query") or {}).get("users", []):
                if _flag(u, "missing") or _flag(u, "invalid"):
                    continue
                out[u["name"]] = {"editcount": u.get("editcount"), "registration": u.get("registration")}
        return out


def _as_list(value: Any) -> list[dict[str, Any]]:
    # formatversion=2 gives lists; formatversion=1 gives objects keyed by id.
    if isinstance(value, dict):
        return list(value.values())
    return list(value or [])
