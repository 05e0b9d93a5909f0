"""A loopback HTTP server that answers like the Wikidata action API from a recorded folder,
so the real `requests` client runs end to end without the internet (tests, demo, benchmark).

Folder layout (see data/wikidata_day/SOURCES.md for one):
    recentchanges-*.json   `list=recentchanges` answers (MediaWiki shape, formatversion=2);
                           their rows are merged and re-paged for whatever window is asked
    revisions/<revid>.json {"title": "Q42", "pageid": 138, "revision": {revid, parentid, timestamp,
                           user, comment, tags, [texthidden]}, "entity": {...} | null}
                           (or "content": "<raw text>" to serve a body that is not valid JSON)
    labels.json            a `wbgetentities` answer holding every entity's labels
    users.json             {"UserName": {"editcount": 3, "registration": "2024-05-01T00:00:00Z"}}

Handled: action=query&list=recentchanges (rcstart/rcend/rcdir=newer, continuation),
action=query&prop=revisions&revids=... or &titles=...&rvstart&rvend (continuation),
action=wbgetentities&ids=..., action=query&list=users. Failures can be injected for the next
matching requests: maxlag, an HTTP status (429, 500, ...) with any Retry-After (seconds or an
HTTP date), a slow answer (client timeout), a truncated body, a body dripped slowly
(`drip`) or status and headers dripped (`drip_headers`), a given raw body with or without its Content-Length (`body`: oversized, gzip bombs,
garbage), and the real answer rewritten by a function (`answer`: wrong shapes, repeated
continuations).

Hand-written on http.server because the job is tiny and must run anywhere with the stdlib.
"""
from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Failure:
    kind: str  # maxlag | status | slow | truncate | drip | drip_headers | body | answer
    status: int = 500
    retry_after: float | str | None = None  # seconds, or a string sent as is (an HTTP date)
    delay_s: float = 0.0  # slow: before answering; drip: between two bytes of the body
    match: dict[str, str] = field(default_factory=dict)  # only requests with these params
    body: bytes = b""  # body: sent as the answer (status `status`)
    declare_length: bool = True  # body: without Content-Length, the end of the body is the connection's
    headers: dict[str, str] = field(default_factory=dict)  # body: extra headers (e.g. Content-Encoding)
    transform: Callable[[Any], Any] | None = None  # answer: the real answer -> what is sent as JSON

    def matches(self, params: dict[str, str]) -> bool:
        return all(params.get(k) == v for k, v in self.match.items())


class RecordedWiki:
    """The recorded data, indexed for answering queries."""

    def __init__(self, folder: str | Path, page_size: int | None = None, rev_page_size: int = 50):
        self.folder = Path(folder)
        self.rev_page_size = rev_page_size  # below 50 forces revision continuation (tests)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"replay folder {self.folder} does not exist")
        self.changes: list[dict[str, Any]] = []
        first_page = None
        for f in sorted(self.folder.glob("recentchanges*.json")):
            rows = json.loads(f.read_text(encoding="utf-8"))["query"]["recentchanges"]
            first_page = first_page or len(rows)
            self.changes.extend(rows)
        self.changes.sort(key=lambda r: (r["timestamp"], r["rcid"]))
        # Re-page like the recording did unless told otherwise.
        self.page_size = page_size or first_page or 500
        self.revisions: dict[int, dict[str, Any]] = {}
        for f in sorted((self.folder / "revisions").glob("*.json")):
            rec = json.loads(f.read_text(encoding="utf-8"))
            self.revisions[int(rec["revision"]["revid"])] = rec
        labels = self.folder / "labels.json"
        self.entities = json.loads(labels.read_text(encoding="utf-8"))["entities"] if labels.exists() else {}
        users = self.folder / "users.json"
        self.users = json.loads(users.read_text(encoding="utf-8")) if users.exists() else {}

    # -------------------------------------------------------------- answers

    def recentchanges(self, p: dict[str, str]) -> dict[str, Any]:
        start, end = p.get("rcstart", ""), p.get("rcend", "\uffff")
        rows = [r for r in self.changes if start <= r["timestamp"] <= end]
        if "rccontinue" in p:
            ts, rcid = p["rccontinue"].split("|")
            rows = [r for r in rows if (r["timestamp"], r["rcid"]) >= (ts, int(rcid))]
        limit = self.page_size if p.get("rclimit", "max") == "max" else int(p["rclimit"])
        page, rest = rows[:limit], rows[limit:]
        out: dict[str, Any] = {"batchcomplete": True, "query": {"recentchanges": page}}
        if rest:
            out["continue"] = {"rccontinue": f"{rest[0]['timestamp']}|{rest[0]['rcid']}", "continue": "-||"}
        return out

    def _rev_json(self, rec: dict[str, Any]) -> dict[str, Any]:
        rev = dict(rec["revision"])
        if rev.get("texthidden"):
            rev["slots"] = {"main": {"texthidden": True}}
            return rev
        content = rec["content"] if "content" in rec else json.dumps(rec.get("entity") or {}, ensure_ascii=False)
        rev["slots"] = {"main": {"contentmodel": "wikibase-item", "contentformat": "application/json",
                                 "content": content}}
        return rev

    def revisions_by_id(self, p: dict[str, str]) -> dict[str, Any]:
        ids = sorted(int(x) for x in p["revids"].split("|") if x)
        if len(ids) > 50:
            return {"error": {"code": "toomanyvalues", "info": "Too many values supplied for parameter \"revids\". The limit is 50."}}
        if "rvcontinue" in p:
            ids = [r for r in ids if r >= int(p["rvcontinue"])]
        ids, rest = ids[: self.rev_page_size], ids[self.rev_page_size:]
        pages: dict[str, dict[str, Any]] = {}
        bad = []
        for r in ids:
            rec = self.revisions.get(r)
            if rec is None:
                bad.append({"revid": r, "missing": True})
                continue
            page = pages.setdefault(rec["title"], {"pageid": rec.get("pageid", 0), "ns": 0, "title": rec["title"],
                                                   "revisions": []})
            page["revisions"].append(self._rev_json(rec))
        query: dict[str, Any] = {"pages": list(pages.values())}
        if bad:
            query["badrevids"] = bad
        if rest:
            return {"continue": {"rvcontinue": str(rest[0]), "continue": "||"}, "query": query}
        return {"batchcomplete": True, "query": query}

    def revisions_by_title(self, p: dict[str, str]) -> dict[str, Any]:
        title = p["titles"]
        start, end = p.get("rvstart", ""), p.get("rvend", "\uffff")
        recs = sorted((r for r in self.revisions.values() if r["title"] == title
                       and start <= r["revision"]["timestamp"] <= end), key=lambda r: r["revision"]["revid"])
        if not recs:
            exists = any(r["title"] == title for r in self.revisions.values())
            page_info = {"ns": 0, "title": title} if exists else {"ns": 0, "title": title, "missing": True}
            return {"batchcomplete": True, "query": {"pages": [page_info]}}
        if "rvcontinue" in p:
            recs = [r for r in recs if r["revision"]["revid"] >= int(p["rvcontinue"].split("|")[-1])]
        limit = min(int(p.get("rvlimit", "50")), self.rev_page_size)
        page, rest = recs[:limit], recs[limit:]
        out: dict[str, Any] = {"query": {"pages": [{"pageid": page[0].get("pageid", 0), "ns": 0, "title": title,
                                                    "revisions": [self._rev_json(r) for r in page]}]}}
        if rest:
            out["continue"] = {"rvcontinue": f"{rest[0]['revision']['timestamp']}|{rest[0]['revision']['revid']}",
                               "continue": "||"}
        else:
            out["batchcomplete"] = True
        return out

    def wbgetentities(self, p: dict[str, str]) -> dict[str, Any]:
        lang = p.get("languages", "en")
        out = {}
        for eid in p["ids"].split("|"):
            ent = self.entities.get(eid)
            if ent is None or "missing" in ent:
                out[eid] = {"id": eid, "missing": ""}
                continue
            trimmed: dict[str, Any] = {"id": eid, "type": ent.get("type", "item")}
            for part in ("labels", "descriptions", "aliases"):
                terms = ent.get(part) or {}
                trimmed[part] = {lang: terms[lang]} if lang in terms else {}
            out[eid] = trimmed
        return {"entities": out, "success": 1}

    def users_answer(self, p: dict[str, str]) -> dict[str, Any]:
        users = []
        for name in p["ususers"].split("|"):
            info = self.users.get(name)
            users.append({"name": name, **info} if info else {"name": name, "missing": True})
        return {"batchcomplete": True, "query": {"users": users}}

    def answer(self, p: dict[str, str]) -> dict[str, Any]:
        action = p.get("action")
        if action == "wbgetentities":
            return self.wbgetentities(p)
        if action == "query":
            if p.get("list") == "recentchanges":
                return self.recentchanges(p)
            if p.get("list") == "users":
                return self.users_answer(p)
            if p.get("prop") == "revisions" and "revids" in p:
                return self.revisions_by_id(p)
            if p.get("prop") == "revisions" and "titles" in p:
                return self.revisions_by_title(p)
        return {"error": {"code": "badvalue", "info": f"replay server cannot answer {sorted(p.items())[:6]}"}}


class ReplayServer:
    """`with ReplayServer(folder) as url:` or `url = server.start()` ... `server.stop()`."""

    def __init__(self, folder: str | Path, page_size: int | None = None, gzip_answers: bool = True,
                 rev_page_size: int = 50):
        self.wiki = RecordedWiki(folder, page_size=page_size, rev_page_size=rev_page_size)
        self.gzip_answers = gzip_answers
        self.failures: list[Failure] = []
        self.requests: list[dict[str, Any]] = []  # params and headers of every request seen
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def inject(self, kind: str, times: int = 1, **kw: Any) -> None:
        """Make the next `times` matching requests fail (kind: maxlag | status | slow | truncate |
        drip | body | answer; see `Failure`)."""
        with self._lock:
            self.failures.extend(Failure(kind=kind, **kw) for _ in range(times))

    def _take_failure(self, params: dict[str, str]) -> Failure | None:
        with self._lock:
            for i, f in enumerate(self.failures):
                if f.matches(params):
                    return self.failures.pop(i)
        return None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/w/api.php"

    def start(self) -> str:
        self._httpd = _ReplayHTTPServer(self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="wikidata-replay", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _ReplayHTTPServer(ThreadingHTTPServer):
    """The loopback server; its handlers answer for `replay`."""

    daemon_threads = True

    def __init__(self, replay: ReplayServer):
        self.replay = replay
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    """One request: the recorded answer, unless an injected failure matches it."""

    protocol_version = "HTTP/1.1"
    server: _ReplayHTTPServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        replay = self.server.replay
        params = {k: v[-1] for k, v in parse_qs(urlparse(self.path).query).items()}
        with replay._lock:
            replay.requests.append({"params": params, "headers": dict(self.headers)})
        failure = replay._take_failure(params)
        headers: dict[str, str] = {}
        if failure and failure.retry_after is not None:
            ra = failure.retry_after
            headers["Retry-After"] = ra if isinstance(ra, str) else str(int(ra))
        if failure and failure.kind == "body":
            self._send_given_body(failure, headers)
            return
        if failure and failure.kind == "status":
            self._send(failure.status, b'{"error": "injected"}', headers)
            return
        if failure and failure.kind == "maxlag":
            self._send_maxlag(headers)
            return
        if failure and failure.kind == "slow":
            time.sleep(failure.delay_s)
        payload = self._answer(replay, params, failure)
        if failure and failure.kind == "drip_headers":
            self._drip_headers(payload, failure.delay_s)
            return
        if failure and failure.kind == "drip":
            self._drip_body(payload, failure.delay_s)
            return
        if failure and failure.kind == "truncate":
            payload = payload[: max(1, len(payload) // 2)]
        if replay.gzip_answers and "gzip" in self.headers.get("Accept-Encoding", ""):
            payload = gzip.compress(payload, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._send(200, payload, headers)

    def _answer(self, replay: ReplayServer, params: dict[str, str], failure: Failure | None) -> bytes:
        """The recorded wiki's answer as JSON bytes, rewritten by an `answer` failure."""
        try:
            payload = json.dumps(replay.wiki.answer(params), ensure_ascii=False).encode("utf-8")
        except (KeyError, ValueError) as exc:
            payload = json.dumps({"error": {"code": "badvalue", "info": str(exc)}}).encode()
        if failure and failure.kind == "answer" and failure.transform is not None:
            payload = json.dumps(failure.transform(json.loads(payload)), ensure_ascii=False).encode("utf-8")
        return payload

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_given_body(self, failure: Failure, headers: dict[str, str]) -> None:
        """A `body` failure: its raw body, with its Content-Length or ended by closing the connection."""
        headers.update(failure.headers)
        if failure.declare_length:
            self._send(failure.status, failure.body, headers)
            return
        self.send_response(failure.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for i in range(0, len(failure.body), 65536):
                self.wfile.write(failure.body[i:i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_maxlag(self, headers: dict[str, str]) -> None:
        body = {"error": {"code": "maxlag", "info": "Waiting for 10.64.16.27: 7 seconds lagged",
                          "host": "10.64.16.27", "lag": 7}}
        headers["X-Database-Lag"] = "7"
        self._send(200, json.dumps(body).encode(), headers)

    def _drip_headers(self, payload: bytes, delay_s: float) -> None:
        """Status line and headers a byte at a time, then the body."""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nX-Padding: {'x' * 200}\r\n\r\n").encode()
        try:
            for i in range(len(head)):
                self.wfile.write(head[i:i + 1])
                self.wfile.flush()
                time.sleep(delay_s)
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True

    def _drip_body(self, payload: bytes, delay_s: float) -> None:
        """The whole length announced, then the body a byte at a time."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True
