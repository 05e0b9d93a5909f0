"""Build the recorded demo week (2024-05-01 .. 2024-05-06, UTC) in this folder from the real
entity bodies the recorded day uses (data/wikidata_day/build.py, which loads them from
tests/fixtures/wikidata/, copied byte for byte from public projects; see SOURCES.md there).

Run: python data/wikidata_week/build.py   (deterministic; rewrites the folder's JSON files)

The day's twelve revisions are spread over the week, and six revisions are added (ids
2150000301..306), so the week holds what a month of nightly runs meets: a vandal edit that
survives the settle window and is undone 50 h later, a subject edited on several nights,
a value corrected after it was applied, a real town's name held in quarantine. Everything beyond
the real bodies is constructed and said so in SOURCES.md.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("wikidata_day_build", HERE.parent / "wikidata_day" / "build.py")
day = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(day)  # the day's bodies (real ones trimmed, constructed ones) and helpers

item, snak, statement, time_value = day.item, day.snak, day.statement, day.time_value

# ----------------------------------------------------------------------------- bodies

# Karlsruhe (Q1040): the day's new mayor (karlsruhe_1), then on 05-02 a vandal replaces her
# (preferred P6 value) with a placeholder "Homer Simpson", the same afternoon the 2023
# population is entered with two digits swapped (380,707), on 05-04 the vandal edit is undone
# (50 h later, past the 48 h settle window), on 05-05 the population is corrected to 308,707
# (the recorded day's figure: the body is karlsruhe_2 again).
karlsruhe_vandal = copy.deepcopy(day.karlsruhe_1)
for s in karlsruhe_vandal["claims"]["P6"]:
    if s["rank"] == "preferred":
        s["mainsnak"]["datavalue"] = item("Q999000105")


def _with_population(body: dict, amount: str) -> dict:
    out = copy.deepcopy(body)
    for s in out["claims"]["P1082"]:
        s["rank"] = "normal"
    out["claims"]["P1082"].append(statement(
        "Q1040", "5B2C1D7E-0A11-4C55-9F00-000000000002", "P1082", "quantity",
        {"type": "quantity", "value": {"amount": amount, "unit": "1"}}, "preferred",
        {"P585": [snak("P585", "time", time_value("+2023-12-31T00:00:00Z"))]}))
    return out


karlsruhe_vandal_typo = _with_population(karlsruhe_vandal, "+380707")
karlsruhe_undone_typo = _with_population(day.karlsruhe_1, "+380707")  # the undo keeps the later edit
karlsruhe_corrected = _with_population(day.karlsruhe_1, "+308707")  # == the day's karlsruhe_2
assert karlsruhe_corrected == day.karlsruhe_2

# Oliver Kahn (Q131261): the day's transfer to SV Rheinau 1921 on 05-02, then on 05-06 on to
# a placeholder club "SG Hardtwald 1922" (Q999000106): SV Rheinau's statement gets an end
# date, a new one a start date. (Karlsruher SC would not do: Kahn's real P54 already lists it.)
kahn_2 = copy.deepcopy(day.kahn_1)
for s in kahn_2["claims"]["P54"]:
    if s["mainsnak"]["datavalue"]["value"].get("id") == "Q999000102":
        s.setdefault("qualifiers", {})["P582"] = [snak("P582", "time", time_value("+2024-05-05T00:00:00Z"))]
        s["qualifiers-order"] = list(s["qualifiers"])
kahn_2["claims"]["P54"].append(statement(
    "Q131261", "5B2C1D7E-0A11-4C55-9F00-000000000006", "P54", "wikibase-item", item("Q999000106"), "normal",
    {"P580": [snak("P580", "time", time_value("+2024-05-06T00:00:00Z"))]}))

# Lena Hartmann (placeholder Q999000101): a place of birth "Bitche" (placeholder Q999000107
# for the commune in Moselle, France). The profanity tripwire matches the stem "bitch" in it:
# a false positive held in quarantine for an operator to release (`kedit quarantine`).
lena_2 = copy.deepcopy(day.new_mayor)
lena_2["claims"]["P19"] = [statement("Q999000101", "A3", "P19", "wikibase-item", item("Q999000107"))]

# ----------------------------------------------------------------------------- revisions

# Base revisions ("before" bodies, real) as in the recorded day.
BASE = day.BASE
_DAY_EDITS = {e[0]: e for e in day.EDITS}


def _day_edit(revid: int, date: str) -> tuple:
    """One of the recorded day's revisions, moved to `date` (same time of day, user, body)."""
    revid, parent, title, pageid, tod, user, kind, flags, tags, comment, body = _DAY_EDITS[revid]
    return (revid, parent, title, pageid, f"{date}T{tod}Z", user, kind, flags, tags, comment, body)


VANDAL, TYPO, UNDO, CORRECTION, KAHN_2, BIRTHPLACE = (2150000301, 2150000302, 2150000303, 2150000304, 2150000305,
                                                      2150000306)
EDITS = [
    # 2024-05-01: Douglas Adams' later real body, the new mayor item, Karlsruhe's new mayor,
    # a bot edit and a description-only edit
    _day_edit(2150000101, "2024-05-01"),
    _day_edit(2150000102, "2024-05-01"),
    _day_edit(2150000103, "2024-05-01"),
    _day_edit(2150000108, "2024-05-01"),
    _day_edit(2150000110, "2024-05-01"),
    # 2024-05-02: a vandal edit nobody reverts for 50 h, the transfer, a vandal edit of "book"
    # undone within minutes, the population entered with a typo
    (VANDAL, 2150000103, "Q1040", 1374, "2024-05-02T08:00:00Z", "Spassvogel", "edit", {}, [],
     "/* wbsetclaim-update:2||1 */ [[Property:P6]]: [[Q999000105]]", karlsruhe_vandal),
    _day_edit(2150000104, "2024-05-02"),
    _day_edit(2150000106, "2024-05-02"),
    _day_edit(2150000107, "2024-05-02"),
    (TYPO, VANDAL, "Q1040", 1374, "2024-05-02T14:30:00Z", "Stadtchronist", "edit", {}, [],
     "/* wbeditentity-update:0| */ population 2023", karlsruhe_vandal_typo),
    # 2024-05-03 (the night the demo misses): an award, profanity from a new account (quarantined),
    # a revision whose content was suppressed
    _day_edit(2150000105, "2024-05-03"),
    _day_edit(2150000111, "2024-05-03"),
    _day_edit(2150000112, "2024-05-03"),
    # 2024-05-04: the vandal edit of 05-02 08:00 undone, 50 h later
    (UNDO, TYPO, "Q1040", 1374, "2024-05-04T10:00:00Z", "Patroller", "edit", {}, ["mw-undo"],
     f"/* undo:0||{VANDAL}|Spassvogel */", karlsruhe_undone_typo),
    # 2024-05-05: the population typo corrected
    (CORRECTION, UNDO, "Q1040", 1374, "2024-05-05T09:12:00Z", "Stadtchronist", "edit", {}, [],
     "/* wbsetclaim-update:2||1 */ [[Property:P1082]]: 308,707 (typo: 380,707)", karlsruhe_corrected),
    # 2024-05-05: a place of birth the profanity tripwire holds back (a real town's name)
    (BIRTHPLACE, 2150000102, "Q999000101", 999000101, "2024-05-05T16:20:00Z", "Stadtchronist", "edit", {}, [],
     "/* wbcreateclaim-create:1| */ [[Property:P19]]: [[Q999000107]]", lena_2),
    # 2024-05-06: Oliver Kahn moves on
    (KAHN_2, 2150000104, "Q131261", 127473, "2024-05-06T11:40:00Z", "KickerFan", "edit", {}, [],
     "/* wbeditentity-update:0| */ transfer", kahn_2),
]
EDITS.sort(key=lambda e: e[4])

VALUE_LABELS = {
    **day.VALUE_LABELS,
    "Q999000105": ("Homer Simpson", "vandal's placeholder item"),  # (p)
    "Q999000106": ("SG Hardtwald 1922", "football club (placeholder)"),  # (p)
    "Q999000107": ("Bitche", "commune in Moselle, France (placeholder id)"),  # (k) label, (p) id
}
USERS = {
    **day.USERS,
    "Spassvogel": {"editcount": 40, "registration": "2022-02-02T00:00:00Z"},
}
LAST_BODIES = [day.q42_new, karlsruhe_corrected, lena_2, kahn_2, day.roth_2, day.book_0, day.bielefeld_1,
               day.chr_1]
PAGE_SIZE = 5


def main() -> None:
    revdir = HERE / "revisions"
    revdir.mkdir(exist_ok=True)
    for f in revdir.glob("*.json"):
        f.unlink()

    for revid, parent, title, pageid, ts, body in BASE:
        day.write_rev(revdir, revid, parent, title, pageid, ts, "RecordedUser", [], "", body)
    rows = []
    for i, (revid, parent, title, pageid, ts, user, kind, flags, tags, comment, body) in enumerate(EDITS):
        day.write_rev(revdir, revid, parent, title, pageid, ts, user, tags, comment, body,
                  {"anon": True} if flags.get("anon") else None)
        row = {"type": kind, "ns": 0, "title": title, "pageid": pageid, "revid": revid, "old_revid": parent,
               "rcid": 2300001001 + i, "user": user, "bot": bool(flags.get("bot")), "new": kind == "new",
               "minor": bool(flags.get("minor")), "timestamp": ts, "comment": comment, "tags": tags}
        if flags.get("anon"):
            row["anon"] = True
        if body is None:
            row["commenthidden"] = True
            row["comment"] = ""
        rows.append(row)
    for f in HERE.glob("recentchanges-*.json"):
        f.unlink()
    pages = [rows[i:i + PAGE_SIZE] for i in range(0, len(rows), PAGE_SIZE)]
    for n, page in enumerate(pages, 1):
        answer: dict = {"batchcomplete": True, "query": {"recentchanges": page}}
        if n < len(pages):
            nxt = pages[n][0]
            answer["continue"] = {"rccontinue": f"{nxt['timestamp']}|{nxt['rcid']}", "continue": "-||"}
        (HERE / f"recentchanges-{n}.json").write_text(json.dumps(answer, indent=1, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    entities = {}
    for body in LAST_BODIES:
        entities[body["id"]] = {"id": body["id"], "type": "item", "labels": body.get("labels", {}),
                                "descriptions": body.get("descriptions", {}), "aliases": body.get("aliases", {})}
    for qid, (label, desc) in VALUE_LABELS.items():
        entities[qid] = {"id": qid, "type": "item", "labels": {"en": {"language": "en", "value": label}},
                         "descriptions": {"en": {"language": "en", "value": desc}}, "aliases": {}}
    (HERE / "labels.json").write_text(json.dumps({"entities": entities, "success": 1}, indent=1,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    (HERE / "users.json").write_text(json.dumps(USERS, indent=1) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {len(rows)} recent changes in {len(pages)} pages, {len(BASE) + len(EDITS)} revisions; "
          f"folder {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
