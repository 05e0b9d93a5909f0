"""A polite, resilient client for the Wikidata (MediaWiki) action API, built on `requests`.

What it asks for:
- `recent_changes(start, end)`: `list=recentchanges` in namespace 0 (edits and new items),
  oldest first, following `continue` to the end -> `RevisionRef`s;
- `fetch_revisions(revids)` / `entities_at_revisions(revids)`: entity JSON at given revisions
  (`prop=revisions`, 50 ids a request, the MediaWiki limit for content; fewer when 50 large
  items together are over `max_body_bytes`);
- `item_revisions(item, start, end)`: one item's revision history in a date range (backfill
  beyond the 30 days recent changes keep);
- `labels(ids)`: English labels via `wbgetentities` (50 ids a request, language fallback);
- `users_info(names)`: edit count and registration date (to spot new accounts).

Etiquette (https://meta.wikimedia.org/wiki/User-Agent_policy, API:Etiquette): a descriptive
User-Agent with a contact, `maxlag=5` with the server's `Retry-After` honoured, exponential
backoff with jitter on 429 / 5xx / timeouts / truncated answers, gzip, one request at a time,
and a rate limit. `endpoint` is configurable so tests and the demo point it at
`connectors.replay.ReplayServer`.

The server is not trusted: a `Retry-After` (seconds or an HTTP date) is capped at
`max_retry_after_s`; each HTTP request must be answered in full within `deadline_s` (a
watchdog cuts a connection whose status and headers are still arriving; the body is streamed,
so a body dripped slowly fails there too; both are retried like a timeout); a body
over `max_body_bytes` (declared, sent, or once decompressed) is refused; and an answer of the
wrong shape (not a JSON object, `error` not an object, a change without `revid`, a
continuation sent twice, ...) is a `WikidataError` with a one-line reason, never an
AttributeError / KeyError or an endless loop.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests
import urllib3

from kedit_core.diff import EntityFormatError, parse_entity
from kedit_core.diff import json_kind  # one wording for a JSON value's type in every error message
from kedit_core.errors import KeditError
from kedit_core.revision import RevisionRef

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://www.wikidata.org/w/api.php"
DEFAULT_CONTACT = "https://github.com/kedit/kedit (set KEDIT_CONTACT to your e-mail)"
BATCH = 50  # MediaWiki's per-request limit for revids with content and for wbgetentities ids
REVPROPS = "content|ids|timestamp|tags|user|comment|flags"


class WikidataError(KeditError):
    """The Wikidata API could not give an answer; the message says what happened."""


class WikidataTooLarge(WikidataError):
    """An answer over the client's max_body_bytes (not retried: the same request gets the same answer)."""


class _Retry(Exception):
    """One attempt failed in a way a later attempt may not (a slow or broken answer)."""


def _malformed(what: str) -> WikidataError:
    return WikidataError(f"malformed Wikidata API answer: {what}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed(f"{where} is {json_kind(value)}, not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _malformed(f"{where} is {json_kind(value)}, not a list")
    return value


def _one_line(text: str, n: int = 200) -> str:
    return " ".join(text.split())[:n]


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter that knows the socket of the request waiting for its answer, so the
    client's watchdog can cut it at the request's deadline (urllib3 exposes no total read
    deadline). Only the waiting socket is cut: the connection is not reused afterwards."""

    def __init__(self) -> None:
        self.waiting: Any = None
        self.was_cut = False
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        adapter = self

        def tracked(base: type) -> type:
            class Tracked(base):  # type: ignore[misc, valid-type]
                def getresponse(self, *a: Any, **kw: Any) -> Any:
                    adapter.waiting = self.sock
                    try:
                        return super().getresponse(*a, **kw)
                    finally:
                        adapter.waiting = None
            return Tracked

        for scheme, pool in (("http", urllib3.HTTPConnectionPool), ("https", urllib3.HTTPSConnectionPool)):
            cls = type(f"Tracked{pool.__name__}", (pool,), {"ConnectionCls": tracked(pool.ConnectionCls)})
            self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, scheme: cls}

    def cut(self) -> None:
        sock = self.waiting
        if sock is not None:
            self.was_cut = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _short_error(exc: BaseException) -> str:
    """The root cause of a connection error in a few words (requests nests it three deep)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "Temporary failure in name resolution", "No route to host"):
        if marker in text:
            return f"{type(exc).__name__}: {marker}"
    return f"{type(exc).__name__}: {_one_line(text, 160)}"


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
    bytes: int = 0  # body bytes received, as sent (compressed)
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
        max_retry_after_s: float = 120.0,
        deadline_s: float = 120.0,
        max_body_bytes: int = 50 * 2**20,
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
        self.max_retry_after_s = max_retry_after_s  # a longer Retry-After is waited this long
        self.deadline_s = deadline_s  # one HTTP request, connect to last byte
        self.max_body_bytes = max_body_bytes  # one answer, before and after decompression
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._last_request = 0.0
        self._one_at_a_time = threading.Lock()  # etiquette: never two requests in flight
        self.stats = ClientStats()
        self.session = requests.Session()
        self._watch = _DeadlineAdapter()
        self.session.mount("http://", self._watch)
        self.session.mount("https://", self._watch)
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

    def _retry_after(self, headers: Any) -> float | None:
        """The server's Retry-After (delta seconds or an HTTP date), capped at max_retry_after_s."""
        value = (headers.get("Retry-After") or "").strip()
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:  # "-0000": UTC by RFC 5322
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if seconds != seconds:  # NaN
            return None
        seconds = max(0.0, seconds)
        if seconds > self.max_retry_after_s:
            log.warning("the server asked to wait %s (Retry-After: %s); waiting max_retry_after_s=%.0fs",
                        f"{seconds:.0f}s" if seconds < 1e9 else "forever", value[:40], self.max_retry_after_s)
            seconds = self.max_retry_after_s
        return seconds

    def _get(self, params: dict[str, Any]) -> tuple[int, Any, bytes]:
        """One HTTP GET: (status, headers, decoded body), within deadline_s and max_body_bytes.
        Raises _Retry for an answer a later attempt may get right, WikidataError for one it won't."""
        deadline = time.monotonic() + self.deadline_s
        timeout = min(self.timeout_s, self.deadline_s)
        # requests' timeout bounds each socket read, so status and headers dripped a byte at a
        # time would never trip it: a watchdog cuts the connection at the deadline instead.
        watchdog = threading.Timer(self.deadline_s, self._watch.cut)
        watchdog.daemon = True
        self._watch.was_cut = False
        watchdog.start()
        resp = None
        try:
            resp = self.session.get(self.endpoint, params=params, timeout=(timeout, timeout), stream=True)
        except (requests.ConnectionError, urllib3.exceptions.HTTPError, ConnectionError, OSError):
            if not self._watch.was_cut:
                raise
        finally:
            watchdog.cancel()
        if self._watch.was_cut:  # cut mid-headers: an error, or what http.client had so far
            if resp is not None:
                resp.close()
            raise _Retry(f"no status and headers within deadline_s={self.deadline_s:g}")
        try:
            status = resp.status_code
            # An error page is read only far enough to quote it.
            limit = self.max_body_bytes if status < 400 else 64 * 1024
            declared = resp.headers.get("Content-Length", "")
            if status < 400 and declared.isdigit() and int(declared) > limit:
                raise WikidataTooLarge(f"the answer from {self.endpoint} declares {int(declared)} bytes, over "
                                    f"max_body_bytes={limit}; refused unread")
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise _Retry(f"answer not complete within deadline_s={self.deadline_s:g} "
                                 f"({size} bytes received)")
                # read1: whatever has arrived (at most 64 KiB); read() would wait for a full chunk,
                # and a body dripped byte by byte would never reach the deadline check.
                chunk = resp.raw.read1(64 * 1024, decode_content=False)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    if status >= 400:
                        break
                    raise WikidataTooLarge(f"the answer from {self.endpoint} is over max_body_bytes={limit}; "
                                        "refused after reading that much")
                chunks.append(chunk)
            self.stats.bytes += size
            body = self._decode(b"".join(chunks), resp.headers.get("Content-Encoding", ""), limit)
            return status, resp.headers, body
        finally:
            resp.close()

    def _decode(self, raw: bytes, encoding: str, limit: int) -> bytes:
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            return raw
        if enc not in ("gzip", "x-gzip", "deflate"):
            raise WikidataError(f"the answer from {self.endpoint} has an unsupported Content-Encoding {enc!r}")
        d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise _Retry(f"corrupt {enc} answer ({exc})") from exc
        if len(out) > limit:
            raise WikidataTooLarge(f"the answer from {self.endpoint} is over max_body_bytes={limit} once "
                                f"decompressed ({len(raw)} bytes {enc}); refused")
        if not d.eof:
            raise _Retry(f"truncated {enc} answer")
        return out

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
                    status, headers, body = self._get(params)
                finally:
                    self.stats.http_s += time.perf_counter() - t0
            except _Retry as exc:
                reason, wait = str(exc), self._backoff(attempt)
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError, ConnectionError,
                    TimeoutError) as exc:
                reason, wait = _short_error(exc), self._backoff(attempt)
            else:
                if status == 429 or status >= 500:
                    reason = f"HTTP {status}"
                    wait = self._retry_after(headers) or self._backoff(attempt)
                elif status >= 400:
                    hint = " (Wikimedia refuses clients without a descriptive User-Agent: set KEDIT_CONTACT)" \
                        if status == 403 else ""
                    text = _one_line(body.decode("utf-8", "replace"))
                    raise WikidataError(f"HTTP {status} from {self.endpoint}{hint}: {text or '(empty body)'}")
                else:
                    try:
                        data = json.loads(body)
                    except (ValueError, RecursionError) as exc:  # a cut-off body: the connection dropped mid-answer
                        reason = f"invalid or truncated JSON ({_one_line(str(exc) or type(exc).__name__, 120)})"
                        wait = self._backoff(attempt)
                    else:
                        if not isinstance(data, dict):
                            raise _malformed(f"the answer is {json_kind(data)}, not a JSON object")
                        error = data.get("error")
                        if not error:
                            return data
                        if not isinstance(error, dict):
                            raise _malformed(f"'error' is {json_kind(error)}, not an object: "
                                             f"{_one_line(json.dumps(error, default=str), 160)}")
                        if error.get("code") != "maxlag":
                            raise WikidataAPIError(_one_line(str(error.get("code")), 80),
                                                   _one_line(str(error.get("info", ""))))
                        # Replication lag above maxlag: the server says how long to stay away.
                        reason = f"maxlag: {_one_line(str(error.get('info', '')))}"
                        wait = self._retry_after(headers) or float(self.maxlag)
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
        seen: set[str] = set()
        while True:
            data = self.request({**params, **cont})
            yield data
            if "continue" not in data:
                return
            cont = _obj(data["continue"], "'continue'")
            if not all(isinstance(v, (str, int)) for v in cont.values()):
                raise _malformed(f"'continue' holds a value that is not a string: {_one_line(json.dumps(cont), 160)}")
            token = json.dumps(cont, sort_keys=True)
            if token in seen:  # a server answering the same page again would keep us here forever
                raise _malformed(f"the continuation {_one_line(token, 160)} came twice; stopped instead of looping")
            seen.add(token)

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
            rows = _list(_obj(data.get("query"), "'query'").get("recentchanges"), "query.recentchanges")
            refs = [_rc_ref(rc) for rc in rows]
            for ref in refs:
                if ref.timestamp >= end_s:  # rcend is inclusive; windows are half-open
                    continue
                yield ref

    # ------------------------------------------------------------------ revisions

    @staticmethod
    def _read_revision(page: dict[str, Any], rev: dict[str, Any], batch: RevisionBatch) -> None:
        if not isinstance(rev, dict):
            raise _malformed(f"a revision of {page.get('title', '?')} is {json_kind(rev)}, not an object")
        revid = _int_field(rev, "revid", f"a revision of {page.get('title', '?')}")
        try:
            WikidataClient._read_revision_fields(page, rev, revid, batch)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            batch.entities.pop(revid, None)
            batch.problems[revid] = f"malformed revision in the API answer: {type(exc).__name__}: {exc}"

    @staticmethod
    def _read_revision_fields(page: dict[str, Any], rev: dict[str, Any], revid: int, batch: RevisionBatch) -> None:
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
        todo = list(_chunks(wanted, BATCH))
        while todo:
            chunk = todo.pop(0)
            params = {"action": "query", "prop": "revisions", "revids": "|".join(map(str, chunk)),
                      "rvprop": REVPROPS, "rvslots": "main"}
            try:
                pages = list(self._query_pages(params))
            except WikidataTooLarge as exc:
                # 50 large items can outgrow max_body_bytes together: ask for them in halves; one
                # revision alone over the limit is that revision's problem.
                if len(chunk) > 1:
                    log.warning("revisions answer over max_body_bytes for %d ids; asking in halves", len(chunk))
                    todo[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
                else:
                    batch.problems[chunk[0]] = f"answer too large: {exc}"
                continue
            for data in pages:
                query = _obj(data.get("query"), "'query'")
                for bad in _as_list(query.get("badrevids")):
                    bad_id = _int_field(_obj(bad, "a badrevids entry"), "revid", "a badrevids entry")
                    batch.problems[bad_id] = "no such revision (deleted or never existed)"
                for page in _list(query.get("pages"), "query.pages"):
                    page = _obj(page, "a page")
                    for rev in _list(page.get("revisions"), f"the revisions of {page.get('title', '?')}"):
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
            for page in _list(_obj(data.get("query"), "'query'").get("pages"), "query.pages"):
                page = _obj(page, "a page")
                if _flag(page, "missing"):
                    raise WikidataError(f"item {item} does not exist")
                for rev in _list(page.get("revisions"), f"the revisions of {item}"):
                    if not isinstance(rev, dict) or str(rev.get("timestamp", "")) < end_s:
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
        for eid, ent in _obj(data.get("entities"), "'entities'").items():
            ent = _obj(ent, f"entities.{eid}")
            if "missing" in ent:
                continue

            def term(part: str) -> tuple[str | None, str | None]:
                t = (ent.get(part) or {}).get(lang)
                return (t.get("value"), t.get("language")) if isinstance(t, dict) else (None, None)

            try:
                label, label_lang = term("labels")
                description, _ = term("descriptions")
                aliases = tuple(a.get("value", "") for a in (ent.get("aliases") or {}).get(lang, []) or [])
            except (AttributeError, TypeError) as exc:
                raise _malformed(f"the terms of {eid}: {exc}") from exc
            out[eid] = EntityLabel(eid, label, description, aliases, label_lang)
        return out

    def users_info(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{user: {"editcount": int | None, "registration": ISO str | None}} for registered users."""
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted({n for n in names if n}), BATCH):
            data = self.request({"action": "query", "list": "users", "ususers": "|".join(chunk),
                                 "usprop": "editcount|registration"})
            for u in _list(_obj(data.get("query"), "'query'").get("users"), "query.users"):
                u = _obj(u, "a user")
                if _flag(u, "missing") or _flag(u, "invalid"):
                    continue
                if not isinstance(u.get("name"), str):
                    raise _malformed(f"a user has no name: {_one_line(json.dumps(u, default=str), 160)}")
                out[u["name"]] = {"editcount": u.get("editcount"), "registration": u.get("registration")}
        return out


def _as_list(value: Any) -> list[dict[str, Any]]:
    # formatversion=2 gives lists; formatversion=1 gives objects keyed by id.
    if isinstance(value, dict):
        return list(value.values())
    return _list(value, "a list field")


def _int_field(d: dict[str, Any], key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _malformed(f"{where} has no {key}" if value is None else f"{where}: {key} is {json_kind(value)}")
    try:
        return int(value)
    except ValueError:
        raise _malformed(f"{where}: {key} {value!r} is not a number") from None


def _rc_ref(rc: Any) -> RevisionRef:
    """One `list=recentchanges` row as a RevisionRef; a row without what it must hold is an error."""
    if not isinstance(rc, dict):
        raise _malformed(f"a recent change is {json_kind(rc)}, not an object")
    where = f"recent change rcid {rc.get('rcid', '?')}"
    revid = _int_field(rc, "revid", where)
    old_revid = _int_field(rc, "old_revid", where) if rc.get("old_revid") else 0
    for key in ("title", "timestamp"):
        if not isinstance(rc.get(key), str):
            raise _malformed(f"{where} has no {key}" if rc.get(key) is None else f"{where}: {key} is {json_kind(rc[key])}")
    tags = rc.get("tags") or ()
    if not isinstance(tags, (list, tuple)):
        raise _malformed(f"{where}: tags is {json_kind(tags)}, not a list")
    return RevisionRef(
        item=rc["title"], revid=revid, old_revid=old_revid, timestamp=rc["timestamp"],
        user="" if _flag(rc, "userhidden") else str(rc.get("user", "")),
        is_bot=_flag(rc, "bot"), is_anon=_flag(rc, "anon"), tags=tuple(str(t) for t in tags),
        comment=str(rc.get("comment", "") or ""), kind=str(rc.get("type", "edit")),
    )
