"""Fact changes between two revisions of one Wikidata item (pure: JSON in, FactChange out).

Read top to bottom:

1. `parse_entity` accepts any shape an entity arrives in: a `wbgetentities` / Special:EntityData
   answer (`{"entities": {...}}`), a bare entity (revision content), or the legacy internal
   format found in old revisions of the XML dumps (`{"entity": "q42", "claims": [{"m": ...}]}`),
   and returns the current JSON shape.
2. `normalise_snak` turns a snak into a small value dict per datatype (the shapes below).
   Equal facts written differently (`+00000001952-03-11T..` vs `+1952-03-11T..`, a year with
   day/month set or zeroed, a full calendar URI or its Q-id) normalise to the same dict.
3. `current_statements` picks, per property, what the item says *now*: Wikidata's truthy view
   (deprecated ignored; preferred statements win over normal ones), after dropping statements
   that carry an end time (P582). So "new head of government (P580) + old one got an end date"
   leaves one current value on each side.
4. `diff_entities` compares the current values per property and pairs them: a statement that
   kept its id but changed value, or a lone removed value with a lone added one, is one
   `updated` change; anything else is `added` / `removed`.
   Values are compared by `value_key`, which ignores a plain-string value's datatype label:
   a property relabelled `string` -> `external-id` with its values untouched changes nothing.

Normalised value dicts (other modules rely on exactly these shapes):
    {"type": "wikibase-item", "id": "Q5"}            (also wikibase-property / -lexeme / ...)
    {"type": "time", "time": "+2024-05-01T00:00:00Z", "precision": 11, "calendar": "Q1985727"}
    {"type": "quantity", "amount": "+8336817", "unit": "Q11573" | "1", ["lower": .., "upper": ..]}
    {"type": <datatype>, "value": "..."}            string, external-id, url, commonsMedia, ...
    {"type": "monolingualtext", "text": "...", "language": "en"}
    {"type": "globe-coordinate", "latitude": .., "longitude": .., "precision": ..}
    {"type": "somevalue"} / {"type": "novalue"}
    {"type": "unsupported", "datatype": "...", "raw": ...}  an unknown datatype or a malformed
        value: recorded as such (filters drop it with a reason), never a crash.

`FactChange.qualifiers` holds the qualifiers of the new statement (of the old one for a
removal) as {P-id: [value dicts]}, plus "replaced_end": the end time (P582) the replaced
statement received, when it did.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kedit_core.errors import KeditError
from kedit_core.types import FactChange

ENTITY_URI = "http://www.wikidata.org/entity/"
START_TIME, END_TIME = "P580", "P582"
TERM_PARTS = ("labels", "descriptions", "aliases", "sitelinks")

# Datatypes whose value is one plain string.
STRING_DATATYPES = frozenset(
    {"string", "external-id", "url", "commonsMedia", "geo-shape", "tabular-data", "math",
     "musical-notation", "entity-schema"}
)
ENTITY_PREFIX = {"item": "Q", "property": "P", "lexeme": "L"}
# Legacy snaks and some old statements carry no datatype: infer it from the value type.
DATATYPE_OF_VALUE_TYPE = {
    "string": "string",
    "time": "time",
    "quantity": "quantity",
    "globecoordinate": "globe-coordinate",
    "monolingualtext": "monolingualtext",
}
LEGACY_RANKS = {0: "deprecated", 1: "normal", 2: "preferred"}


class EntityFormatError(KeditError):
    """An entity JSON that cannot be read; the message names the problem."""


# --------------------------------------------------------------------------- input shapes


def parse_entity(obj: Any, entity_id: str | None = None) -> dict[str, Any] | None:
    """The entity in current JSON shape, or None for an empty page (a creation's parent)."""
    if isinstance(obj, (bytes, str)):
        text = obj.decode("utf-8") if isinstance(obj, bytes) else obj
        if not text.strip():
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EntityFormatError(f"entity content is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise EntityFormatError("entity content is nested too deeply to be an entity") from exc
    if obj is None or obj == {} or obj == []:
        return None
    if not isinstance(obj, dict):
        raise EntityFormatError(f"entity JSON must be an object, got {type(obj).__name__}")
    if "entities" in obj:
        entities = obj["entities"]
        if not isinstance(entities, dict) or not entities:
            raise EntityFormatError("'entities' holds no entity")
        for key, ent in entities.items():
            if not isinstance(ent, dict):
                raise EntityFormatError(f"entities.{key} is {json_kind(ent)}, not an object")
        if entity_id is not None:
            if entity_id not in entities:
                raise EntityFormatError(f"entity {entity_id} is not in the answer (has {sorted(entities)})")
            obj = entities[entity_id]
        else:
            present = [e for e in entities.values() if "missing" not in e]
            if len(present) != 1:
                raise EntityFormatError(
                    f"expected one entity, found {len(present)} present of {sorted(entities)}; name one with entity_id"
                )
            obj = present[0]
        if "missing" in obj:
            raise EntityFormatError(f"entity {entity_id or obj.get('id', '?')} is missing")
    elif entity_id is not None and isinstance(obj.get("id"), str) and obj["id"] and obj["id"] != entity_id:
        raise EntityFormatError(f"the entity is {obj['id']}, not {entity_id}")
    if _is_legacy(obj):
        try:
            obj = upgrade_legacy_entity(obj)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise EntityFormatError(f"unreadable legacy entity: {type(exc).__name__}: {exc}") from exc
    elif "claims" not in obj and "id" not in obj and "labels" not in obj:
        raise EntityFormatError(f"not an entity: keys {sorted(obj)[:8]}")
    check_entity_shape(obj)
    return obj


def json_kind(value: Any) -> str:
    """`a list`, `a str`, `null`: how an error message names a JSON value's type."""
    if value is None:
        return "null"
    name = {"dict": "object", "list": "list", "str": "string", "int": "number", "float": "number",
            "bool": "boolean"}.get(type(value).__name__, type(value).__name__)
    return f"an {name}" if name[0] in "aeio" else f"a {name}"


def _object(value: Any, where: str) -> dict[str, Any]:
    # PHP serialises an empty object as []: both mean "nothing here".
    if isinstance(value, dict):
        return value
    if value is None or value == []:
        return {}
    raise EntityFormatError(f"{where} is {json_kind(value)}, not an object")


def check_entity_shape(entity: dict[str, Any]) -> None:
    """Raise EntityFormatError naming the first part of an entity whose JSON type is wrong.

    Checked here, once per entity: the id, `claims` a mapping of P-ids to lists, the terms
    (labels / descriptions: language -> object; aliases: language -> list of objects;
    sitelinks: site -> object). Statements and snaks are checked where they are read
    (`_statements`, only for the properties a diff touches: that keeps a diff of a large
    item cheap). A value of the right JSON type but unreadable content (a bad date, a
    missing amount) is not a shape error: it becomes an `unsupported` value."""
    eid = entity.get("id")
    if eid is not None and not isinstance(eid, str):
        raise EntityFormatError(f"id is {json_kind(eid)}, not a string")
    for pid, stmts in _object(entity.get("claims"), "claims").items():
        if not isinstance(stmts, list):
            raise EntityFormatError(f"claims.{pid} is {json_kind(stmts)}, not a list of statements")
    for part in ("labels", "descriptions", "sitelinks"):
        for key, term in _object(entity.get(part), part).items():
            if not isinstance(term, dict):
                raise EntityFormatError(f"{part}.{key} is {json_kind(term)}, not an object")
    for lang, aliases in _object(entity.get("aliases"), "aliases").items():
        if not isinstance(aliases, list) or not all(isinstance(a, dict) for a in aliases):
            raise EntityFormatError(f"aliases.{lang} is {json_kind(aliases)}, not a list of objects")


def _is_legacy(obj: dict[str, Any]) -> bool:
    # Legacy: "entity": "q42" or ["item", 42]; claims a list of {"m": snak, ...}.
    claims = obj.get("claims")
    legacy_claims = isinstance(claims, list) and bool(claims) and isinstance(claims[0], dict) and "m" in claims[0]
    return isinstance(obj.get("entity"), (str, list)) or legacy_claims or "label" in obj or "links" in obj


def _legacy_snak(snak: list[Any]) -> dict[str, Any]:
    kind, pid = snak[0], f"P{int(snak[1])}"
    out: dict[str, Any] = {"snaktype": kind, "property": pid}
    if kind == "value":
        value_type, value = snak[2], snak[3]
        out["datavalue"] = {"type": value_type, "value": value}
    return out


def upgrade_legacy_entity(obj: dict[str, Any]) -> dict[str, Any]:
    """Convert the pre-2014 internal serialisation (seen in old dump revisions) to the current one."""
    ent = obj.get("entity")
    if isinstance(ent, list):  # ["item", 42]
        eid = ENTITY_PREFIX.get(ent[0], "Q") + str(int(ent[1]))
    elif isinstance(ent, str):
        eid = ent.upper()
    else:
        eid = obj.get("id", "")
    claims: dict[str, list[dict[str, Any]]] = {}
    for c in obj.get("claims") or []:
        main = _legacy_snak(c["m"])
        qualifiers: dict[str, list[dict[str, Any]]] = {}
        for q in c.get("q") or []:
            qs = _legacy_snak(q)
            qualifiers.setdefault(qs["property"], []).append(qs)
        claims.setdefault(main["property"], []).append(
            {"id": c.get("g"), "mainsnak": main, "type": "statement",
             "rank": LEGACY_RANKS.get(c.get("rank", 1), "normal"), "qualifiers": qualifiers}
        )

    def terms(d: Any) -> dict[str, Any]:
        return {lang: {"language": lang, "value": v} for lang, v in (d or {}).items()} if isinstance(d, dict) else {}

    links = {}
    for site, v in (obj.get("links") or {}).items():
        title = v.get("name") if isinstance(v, dict) else v
        links[site] = {"site": site, "title": title}
    aliases = {lang: [{"language": lang, "value": a} for a in vals]
               for lang, vals in (obj.get("aliases") or {}).items()} if isinstance(obj.get("aliases"), dict) else {}
    return {"id": eid, "type": "item", "labels": terms(obj.get("label")), "descriptions": terms(obj.get("description")),
            "aliases": aliases, "sitelinks": links, "claims": claims}


# --------------------------------------------------------------------------- values


def _entity_id(value: dict[str, Any]) -> str:
    if value.get("id"):
        return str(value["id"])
    return ENTITY_PREFIX.get(value.get("entity-type", "item"), "Q") + str(int(value["numeric-id"]))


def _strip_entity_uri(uri: str) -> str:
    return uri[len(ENTITY_URI):] if uri.startswith(ENTITY_URI) else uri


_TIME_RE = re.compile(r"^([+-])0*(\d+)-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z$")


def normalise_time(time: str, precision: int) -> str:
    """Canonical time string: no padded year, parts finer than the precision zeroed."""
    m = _TIME_RE.match(time)
    if not m:
        raise ValueError(f"unreadable time {time!r}")
    sign, year, month, day, hh, mm, ss = m.groups()
    year = year.zfill(4)
    if precision <= 10:
        day = "00"
    if precision <= 9:
        month = "00"
    if precision <= 11:
        hh = mm = ss = "00"
    return f"{sign}{year}-{month}-{day}T{hh}:{mm}:{ss}Z"


def _datatype_of(snak: dict[str, Any]) -> str:
    if snak.get("datatype"):
        return str(snak["datatype"])
    dv = snak.get("datavalue")
    vtype = dv.get("type") if isinstance(dv, dict) else None
    if not isinstance(vtype, str):
        return "unknown"
    if vtype == "wikibase-entityid":
        value = dv.get("value")
        etype = value.get("entity-type", "item") if isinstance(value, dict) else "item"
        return f"wikibase-{etype}"
    return DATATYPE_OF_VALUE_TYPE.get(vtype, vtype)


def normalise_snak(snak: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(datatype, normalised value dict) of one snak; never raises on odd input."""
    datatype = _datatype_of(snak)
    snaktype = snak.get("snaktype", "value")
    if snaktype in ("somevalue", "novalue"):
        return datatype, {"type": snaktype}
    dv = snak.get("datavalue")
    if not isinstance(dv, dict) or "value" not in dv:
        return datatype, {"type": "unsupported", "datatype": datatype, "raw": None, "error": "value snak without value"}
    v = dv["value"]
    try:
        if datatype.startswith("wikibase-") and isinstance(v, dict):
            return datatype, {"type": datatype, "id": _entity_id(v)}
        if datatype == "time":
            precision = int(v["precision"])
            return datatype, {"type": "time", "time": normalise_time(v["time"], precision), "precision": precision,
                              "calendar": _strip_entity_uri(v.get("calendarmodel", ""))}
        if datatype == "quantity":
            out = {"type": "quantity", "amount": str(v["amount"]), "unit": _strip_entity_uri(str(v.get("unit", "1")))}
            # Current JSON says lowerBound/upperBound; some tools write lower/upper.
            for bound in ("lower", "upper"):
                raw = v.get(f"{bound}Bound", v.get(bound))
                if raw is not None:
                    out[bound] = str(raw)
            return datatype, out
        if datatype == "monolingualtext":
            return datatype, {"type": "monolingualtext", "text": str(v["text"]), "language": str(v["language"])}
        if datatype == "globe-coordinate":
            return datatype, {"type": "globe-coordinate", "latitude": float(v["latitude"]),
                              "longitude": float(v["longitude"]),
                              "precision": None if v.get("precision") is None else float(v["precision"])}
        if datatype in STRING_DATATYPES and isinstance(v, str):
            return datatype, {"type": datatype, "value": v}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return datatype, {"type": "unsupported", "datatype": datatype, "raw": v, "error": f"malformed value: {exc}"}
    return datatype, {"type": "unsupported", "datatype": datatype, "raw": v, "error": f"unknown datatype {datatype}"}


def value_key(value: dict[str, Any] | None) -> str:
    """The identity of a value: two values with the same key are the same fact.

    A plain-string value's datatype label is left out. Wikidata relabels properties without
    touching their values (2016: identifier properties went `string` -> `external-id`), so
    the same string under a new label is no change, nor is it part of one when a revert is
    matched against the edit it undoes.
    """
    if isinstance(value, dict) and value.get("type") in STRING_DATATYPES:
        value = {**value, "type": "string"}
    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Statement:
    guid: str | None
    rank: str
    datatype: str
    value: dict[str, Any]
    qualifiers: dict[str, list[dict[str, Any]]]

    @property
    def key(self) -> str:
        return value_key(self.value)

    @property
    def ended(self) -> bool:
        return bool(self.qualifiers.get(END_TIME))


def _claims(entity: dict[str, Any] | None) -> dict[str, Any]:
    claims = (entity or {}).get("claims") or {}
    if isinstance(claims, dict):
        return claims
    if isinstance(claims, list) and not claims:  # an empty claims object is serialised as [] by PHP
        return {}
    raise EntityFormatError(f"claims is {json_kind(claims)}, not an object")


def _check_snak(snak: Any, where: str) -> dict[str, Any]:
    if not isinstance(snak, dict):
        raise EntityFormatError(f"{where} is {json_kind(snak)}, not an object")
    for key in ("snaktype", "datatype", "property"):
        if key in snak and not isinstance(snak[key], str):
            raise EntityFormatError(f"{where}.{key} is {json_kind(snak[key])}, not a string")
    dv = snak.get("datavalue")
    if dv is not None:
        if not isinstance(dv, dict):
            raise EntityFormatError(f"{where}.datavalue is {json_kind(dv)}, not an object")
        if "type" in dv and not isinstance(dv["type"], str):
            raise EntityFormatError(f"{where}.datavalue.type is {json_kind(dv['type'])}, not a string")
    return snak


def _statements(entity: dict[str, Any] | None) -> dict[str, list[Statement]]:
    out: dict[str, list[Statement]] = {}
    for pid, stmts in _claims(entity).items():
        if stmts is None:
            continue
        if not isinstance(stmts, list):
            raise EntityFormatError(f"claims.{pid} is {json_kind(stmts)}, not a list of statements")
        for i, s in enumerate(stmts):
            where = f"claims.{pid}[{i}]"
            if not isinstance(s, dict):
                raise EntityFormatError(f"{where} is {json_kind(s)}, not a statement object")
            guid, rank = s.get("id"), s.get("rank", "normal")
            if guid is not None and not isinstance(guid, str):
                raise EntityFormatError(f"{where}.id is {json_kind(guid)}, not a string")
            if not isinstance(rank, str):
                raise EntityFormatError(f"{where}.rank is {json_kind(rank)}, not a string")
            main = _check_snak(s.get("mainsnak") if s.get("mainsnak") is not None else {}, f"{where}.mainsnak")
            datatype, value = normalise_snak(main)
            quals: dict[str, list[dict[str, Any]]] = {}
            for qpid, qsnaks in _object(s.get("qualifiers"), f"{where}.qualifiers").items():
                if not isinstance(qsnaks, list):
                    raise EntityFormatError(f"{where}.qualifiers.{qpid} is {json_kind(qsnaks)}, not a list of snaks")
                quals[qpid] = [normalise_snak(_check_snak(q, f"{where}.qualifiers.{qpid}[{j}]"))[1]
                               for j, q in enumerate(qsnaks)]
            out.setdefault(pid, []).append(Statement(guid, rank, datatype, value, quals))
    return out


def current_statements(statements: list[Statement]) -> list[Statement]:
    """What the item says now for one property: not deprecated, not ended, preferred over normal,
    one statement per distinct value."""
    live = [s for s in statements if s.rank != "deprecated" and not s.ended]
    preferred = [s for s in live if s.rank == "preferred"]
    chosen = preferred or live
    seen: dict[str, Statement] = {}
    for s in chosen:
        seen.setdefault(s.key, s)
    return list(seen.values())


def term_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> set[str]:
    """Which of labels / descriptions / aliases / sitelinks differ between two entities."""
    changed = set()
    for part in TERM_PARTS:
        a, b = (old or {}).get(part) or {}, (new or {}).get(part) or {}
        if value_key(a) != value_key(b):
            changed.add(part)
    return changed


def english_label(entity: dict[str, Any] | None) -> str | None:
    """The English label (en, else any en-* variant) of an entity, or None."""
    labels = (entity or {}).get("labels") or {}
    if not isinstance(labels, dict):
        return None
    for lang in ["en"] + sorted(k for k in labels if k.startswith("en-")):
        if lang in labels and isinstance(labels[lang], dict) and labels[lang].get("value"):
            return str(labels[lang]["value"])
    return None


# --------------------------------------------------------------------------- the diff


def _change(subject: str, pid: str, old: Statement | None, new: Statement | None, kind: str, revid: int,
            timestamp: str, old_revid: int | None, qualifiers: dict[str, Any]) -> FactChange:
    return FactChange(subject=subject, property=pid, old_value=old.value if old else None,
                      new_value=new.value if new else None, kind=kind, revid=revid, timestamp=timestamp,
                      qualifiers=qualifiers, old_revid=old_revid, datatype=(new or old).datatype)


def diff_entities(old: Any, new: Any, revid: int = 0, timestamp: str = "", old_revid: int | None = None,
                  subject: str | None = None) -> list[FactChange]:
    """Changed current facts between two revisions of one item (either may be None / empty)."""
    old_e, new_e = parse_entity(old), parse_entity(new)
    old_id, new_id = (old_e or {}).get("id"), (new_e or {}).get("id")
    if old_id and new_id and old_id != new_id:
        raise EntityFormatError(f"the two revisions describe different entities ({old_id} and {new_id}); "
                                "a diff compares two revisions of one item")
    subject = subject or new_id or old_id or "?"
    old_c, new_c = _claims(old_e), _claims(new_e)
    # Most edits touch one or two properties: normalise only those whose raw statements differ
    # (a deep == on parsed JSON runs in C and is far cheaper than normalising every snak).
    touched = {p for p in set(old_c) | set(new_c) if old_c.get(p) != new_c.get(p)}
    sides = []
    for side, claims in (("old", old_c), ("new", new_c)):
        try:
            sides.append(_statements({"claims": {p: claims[p] for p in touched if p in claims}}))
        except EntityFormatError as exc:
            raise EntityFormatError(f"{side} revision: {exc}") from exc
    old_s, new_s = sides
    changes: list[FactChange] = []
    for pid in sorted(touched, key=lambda p: (len(p), p)):
        old_cur, new_cur = current_statements(old_s.get(pid, [])), current_statements(new_s.get(pid, []))
        old_keys, new_keys = {s.key for s in old_cur}, {s.key for s in new_cur}
        removed = [s for s in old_cur if s.key not in new_keys]
        added = [s for s in new_cur if s.key not in old_keys]
        if not removed and not added:
            continue
        pairs: list[tuple[Statement, Statement]] = []
        # 1. Same statement id, new value: edited in place.
        for r in list(removed):
            match = next((a for a in added if r.guid and a.guid == r.guid), None)
            if match is not None:
                pairs.append((r, match))
                removed.remove(r)
                added.remove(match)
        # 2. One value out, one value in: a replacement (e.g. the old one got an end date).
        if len(removed) == 1 and len(added) == 1:
            pairs.append((removed.pop(), added.pop()))
        new_by_guid = {s.guid: s for s in new_s.get(pid, []) if s.guid}
        for r, a in pairs:
            quals: dict[str, Any] = dict(a.qualifiers)
            closed = new_by_guid.get(r.guid) if r.guid else None
            if closed is not None and closed.ended:
                quals["replaced_end"] = closed.qualifiers[END_TIME][0]
            changes.append(_change(subject, pid, r, a, "updated", revid, timestamp, old_revid, quals))
        for a in added:
            changes.append(_change(subject, pid, None, a, "added", revid, timestamp, old_revid, dict(a.qualifiers)))
        for r in removed:
            changes.append(_change(subject, pid, r, None, "removed", revid, timestamp, old_revid, dict(r.qualifiers)))
    return changes
