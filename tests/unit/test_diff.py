"""kedit_core.diff on real recorded entities (tests/fixtures/wikidata, see SOURCES.md) and on
small edits of them made in the test."""
from __future__ import annotations

import copy
import json

import pytest

from kedit_core.diff import (
    EntityFormatError,
    current_statements,
    diff_entities,
    normalise_snak,
    normalise_time,
    parse_entity,
    term_changes,
)
from tests.conftest import FIXTURES

WD = FIXTURES / "wikidata"
URI = "http://www.wikidata.org/entity/"


def load(name: str, eid: str | None = None) -> dict:
    return parse_entity(json.loads((WD / name).read_text()), eid)


def item(qid: str) -> dict:
    return {"type": "wikibase-entityid", "value": {"entity-type": "item", "numeric-id": int(qid[1:]), "id": qid}}


def tval(t: str, precision: int = 11) -> dict:
    return {"type": "time", "value": {"time": t, "timezone": 0, "before": 0, "after": 0, "precision": precision,
                                      "calendarmodel": URI + "Q1985727"}}


def snak(pid: str, datatype: str, dv: dict) -> dict:
    return {"snaktype": "value", "property": pid, "datatype": datatype, "datavalue": dv}


def stmt(pid: str, datatype: str, dv: dict, rank: str = "normal", guid: str = "X", quals: dict | None = None) -> dict:
    return {"id": f"Q1${guid}", "type": "statement", "rank": rank, "mainsnak": snak(pid, datatype, dv),
            "qualifiers": quals or {}}


def test_q42_real_revisions_give_exactly_the_changed_facts():
    old = load("wbgetentities-Q6-Q42-P31.json", "Q42")  # revision 196015688
    new = load("wbgetentities-Douglas-Adams.json")
    changes = diff_entities(old, new, revid=2, timestamp="2015-03-01T00:00:00Z", old_revid=196015688)
    got = {(c.property, c.kind, json.dumps(c.old_value), json.dumps(c.new_value, sort_keys=True)) for c in changes}
    assert got == {
        ("P800", "added", "null", json.dumps({"id": "Q902712", "type": "wikibase-item"})),
        ("P1263", "added", "null", json.dumps({"type": "string", "value": "731/000023662"})),
        ("P1695", "added", "null", json.dumps({"type": "string", "value": "A11573065"})),
        ("P1816", "added", "null", json.dumps({"type": "string", "value": "mp60152"})),
    }
    assert all(c.subject == "Q42" and c.revid == 2 and c.old_revid == 196015688 for c in changes)
    # P569/P570 changed only their serialisation (+00000001952 -> +1952) and P735 only gained a
    # normal-rank value next to a preferred one: neither is a fact change.
    assert not {"P569", "P570", "P735"} & {c.property for c in changes}


def test_time_normalisation_keeps_precision_and_ignores_padding():
    assert normalise_time("+00000001952-03-11T00:00:00Z", 11) == "+1952-03-11T00:00:00Z"
    assert normalise_time("+1952-01-01T00:00:00Z", 9) == "+1952-00-00T00:00:00Z"
    assert normalise_time("+1952-03-11T00:00:00Z", 10) == "+1952-03-00T00:00:00Z"
    assert normalise_time("-0500-00-00T00:00:00Z", 9) == "-0500-00-00T00:00:00Z"
    _, v = normalise_snak(snak("P569", "time", tval("+00000002001-05-11T00:00:00Z")))
    assert v == {"type": "time", "time": "+2001-05-11T00:00:00Z", "precision": 11, "calendar": "Q1985727"}


def test_new_head_of_government_with_start_and_end_is_one_update():
    old = load("wbgetentities-Q32063953.json", "Q32063953")  # real Karlsruhe (Q1040)
    new = copy.deepcopy(old)
    for s in new["claims"]["P6"]:
        if s["mainsnak"]["datavalue"]["value"]["id"] == "Q1443774":  # the current (preferred) mayor
            s["rank"] = "normal"
            s["qualifiers"]["P582"] = [snak("P582", "time", tval("+2024-05-01T00:00:00Z"))]
    new["claims"]["P6"].append(stmt("P6", "wikibase-item", item("Q999000101"), "preferred", "NEW",
                                    {"P580": [snak("P580", "time", tval("+2024-05-01T00:00:00Z"))]}))
    changes = diff_entities(old, new, revid=10)
    assert len(changes) == 1
    c = changes[0]
    assert (c.subject, c.property, c.kind, c.datatype) == ("Q1040", "P6", "updated", "wikibase-item")
    assert c.old_value == {"type": "wikibase-item", "id": "Q1443774"}
    assert c.new_value == {"type": "wikibase-item", "id": "Q999000101"}
    assert c.qualifiers["P580"][0]["time"] == "+2024-05-01T00:00:00Z"
    assert c.qualifiers["replaced_end"]["time"] == "+2024-05-01T00:00:00Z"


def test_population_update_via_preferred_rank_and_quantity_shape():
    old = load("wbgetentities-Q32063953.json", "Q32063953")
    new = copy.deepcopy(old)
    for s in new["claims"]["P1082"]:
        s["rank"] = "normal"
    new["claims"]["P1082"].append(stmt("P1082", "quantity", {"type": "quantity", "value": {
        "amount": "+308707", "unit": "1", "upperBound": "+308710", "lowerBound": "+308700"}}, "preferred", "POP",
        {"P585": [snak("P585", "time", tval("+2023-12-31T00:00:00Z"))]}))
    [c] = diff_entities(old, new)
    assert c.kind == "updated" and c.property == "P1082"
    assert c.old_value == {"type": "quantity", "amount": "+307755", "unit": "1"}
    assert c.new_value == {"type": "quantity", "amount": "+308707", "unit": "1", "lower": "+308700", "upper": "+308710"}
    _, area = normalise_snak(snak("P2046", "quantity", {"type": "quantity", "value": {
        "amount": "+173.46", "unit": URI + "Q712226"}}))
    assert area == {"type": "quantity", "amount": "+173.46", "unit": "Q712226"}


def test_deprecated_statements_are_ignored():
    old = load("wbgetentities-Q1.json")
    deprecated = [(p, i) for p, ss in old["claims"].items() for i, s in enumerate(ss) if s["rank"] == "deprecated"]
    assert deprecated, "fixture Q1 has a deprecated statement"
    new = copy.deepcopy(old)
    p, i = deprecated[0]
    new["claims"][p][i]["mainsnak"] = snak(p, "string", {"type": "string", "value": "changed but deprecated"})
    assert diff_entities(old, new) == []
    new["claims"][p][i]["rank"] = "preferred"  # promoting it makes it the current value
    changes = diff_entities(old, new)
    assert [c.property for c in changes] and all(c.property == p for c in changes)


def test_in_place_edit_of_one_value_among_many_is_an_update_and_an_extra_value_is_added():
    old = {"id": "Q1", "claims": {"P800": [stmt("P800", "wikibase-item", item("Q10"), guid="A"),
                                           stmt("P800", "wikibase-item", item("Q11"), guid="B")]}}
    new = copy.deepcopy(old)
    new["claims"]["P800"][0]["mainsnak"]["datavalue"] = item("Q12")
    new["claims"]["P800"].append(stmt("P800", "wikibase-item", item("Q13"), guid="C"))
    new["claims"]["P800"].append(stmt("P800", "wikibase-item", item("Q14"), guid="D"))
    changes = diff_entities(old, new)
    kinds = sorted((c.kind, (c.old_value or {}).get("id"), c.new_value["id"]) for c in changes)
    assert kinds == [("added", None, "Q13"), ("added", None, "Q14"), ("updated", "Q10", "Q12")]


def test_somevalue_and_novalue_are_explicit_values():
    ent = load("entity-Q22002395.json")
    changes = diff_entities(None, ent)
    assert {"type": "somevalue"} in [c.new_value for c in changes]
    new = copy.deepcopy(ent)
    pid = next(p for p, ss in ent["claims"].items() if ss[0]["mainsnak"]["snaktype"] == "value")
    for s in new["claims"][pid]:
        s["mainsnak"] = {"snaktype": "novalue", "property": pid, "datatype": s["mainsnak"]["datatype"]}
    [c] = [c for c in diff_entities(ent, new) if c.property == pid]
    assert c.kind == "updated" and c.new_value == {"type": "novalue"}


def test_unknown_datatype_and_malformed_values_are_recorded_not_crashes():
    old = {"id": "Q1", "claims": {}}
    new = {"id": "Q1", "claims": {
        "P9000": [stmt("P9000", "wikibase-frobnicator", {"type": "frob", "value": {"x": 1}})],
        "P569": [stmt("P569", "time", {"type": "time", "value": {"time": "yesterday", "precision": 11}})],
        "P1": [{"mainsnak": {"snaktype": "value", "property": "P1", "datatype": "string"}, "rank": "normal"}],
    }}
    changes = {c.property: c for c in diff_entities(old, new)}
    assert changes["P9000"].new_value["type"] == "unsupported"
    assert changes["P9000"].datatype == "wikibase-frobnicator"
    assert "unreadable time" in changes["P569"].new_value["error"]
    assert changes["P1"].new_value["error"] == "value snak without value"


def test_other_datatypes_normalise_to_the_documented_shapes():
    bielefeld = load("entity-Q2112.json")
    coords = [c.new_value for c in diff_entities(None, bielefeld) if c.datatype == "globe-coordinate"]
    assert coords and set(coords[0]) == {"type", "latitude", "longitude", "precision"}
    assert 51 < coords[0]["latitude"] < 53
    roth = load("entity-Q328212.json")
    [name] = [c.new_value for c in diff_entities(None, roth) if c.property == "P1477"]
    assert name == {"type": "monolingualtext", "text": "Veronica Roth", "language": "es"}
    urls = [c for c in diff_entities(None, roth) if c.datatype == "url"]
    assert urls and set(urls[0].new_value) == {"type", "value"} and urls[0].new_value["type"] == "url"


def test_legacy_internal_format_reads_like_the_current_one():
    legacy = {"entity": ["item", 64], "label": {"en": "Berlin"}, "description": {"en": "capital of Germany"},
              "links": {"enwiki": {"name": "Berlin", "badges": []}},
              "claims": [{"m": ["value", 31, "wikibase-entityid", {"entity-type": "item", "numeric-id": 515}],
                          "q": [], "g": "q64$1", "rank": 1, "refs": []},
                         {"m": ["value", 1082, "quantity", {"amount": "+3500000", "unit": "1"}],
                          "q": [["value", 585, "time", {"time": "+00000002012-00-00T00:00:00Z", "precision": 9,
                                                         "calendarmodel": URI + "Q1985727"}]],
                          "g": "q64$2", "rank": 1},
                         {"m": ["somevalue", 6], "q": [], "g": "q64$3", "rank": 0}]}
    current = parse_entity(legacy)
    assert current["id"] == "Q64" and current["labels"]["en"]["value"] == "Berlin"
    changes = {c.property: c for c in diff_entities(None, legacy)}
    assert changes["P31"].new_value == {"type": "wikibase-item", "id": "Q515"}
    assert changes["P1082"].qualifiers["P585"][0]["time"] == "+2012-00-00T00:00:00Z"
    assert "P6" not in changes  # rank 0 = deprecated
    newer = copy.deepcopy(current)
    newer["claims"]["P31"][0]["mainsnak"]["datavalue"] = item("Q1637706")
    [c] = diff_entities(legacy, newer)
    assert (c.kind, c.old_value["id"], c.new_value["id"]) == ("updated", "Q515", "Q1637706")


def test_entity_shapes_and_errors():
    assert parse_entity("") is None
    with pytest.raises(EntityFormatError, match="missing"):
        parse_entity(json.loads((WD / "wbgetentities-missing.json").read_text()), "-1")
    with pytest.raises(EntityFormatError, match="valid JSON"):
        parse_entity('{"claims": {"P31": [')
    with pytest.raises(EntityFormatError, match="several|expected one"):
        parse_entity(json.loads((WD / "wbgetentities-Q6-Q42-P31.json").read_text()))
    with pytest.raises(EntityFormatError, match="not an entity"):
        parse_entity(json.loads((WD / "error-maxlag.json").read_text()))


def test_terms_only_edit_has_no_fact_change_but_term_parts():
    old = load("entity-Q646148.json")
    new = copy.deepcopy(old)
    new["descriptions"]["en"]["value"] = "Danish politician (1931-2016)"
    assert diff_entities(old, new) == []
    assert term_changes(old, new) == {"descriptions"}


def test_ended_statements_are_not_current():
    kahn = load("wbgetentities-Oliver-Kahn.json")
    from kedit_core.diff import _statements

    p54 = _statements(kahn)["P54"]
    assert len(current_statements(p54)) == 2
    ended = copy.deepcopy(kahn)
    ended["claims"]["P54"][0]["qualifiers"] = {"P582": [snak("P582", "time", tval("+2008-06-30T00:00:00Z"))]}
    [c] = diff_entities(kahn, ended)
    assert c.kind == "removed" and c.old_value["id"] == "Q15789"


def test_kedit_diff_command_on_the_real_q42_revisions():
    import typer
    from typer.testing import CliRunner

    from flows.commands import diff_cmd

    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keep `diff` a subcommand, as in the real CLI
        pass

    diff_cmd.register(app)
    old, new = str(WD / "wbgetentities-Q6-Q42-P31.json"), str(WD / "wbgetentities-Douglas-Adams.json")
    res = CliRunner().invoke(app, ["diff", old, new, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {(r["subject"], r["property"], r["kind"]) for r in rows} == {
        ("Q42", "P800", "added"), ("Q42", "P1263", "added"), ("Q42", "P1695", "added"), ("Q42", "P1816", "added")}
    assert all({"subject", "property", "kind", "old", "new"} <= set(r) for r in rows)
    text = CliRunner().invoke(app, ["diff", old, new])
    assert text.exit_code == 0 and "Q42: 4 fact changes" in text.output and "Q902712" in text.output
    bad = CliRunner().invoke(app, ["diff", str(WD / "wbgetentities-Q1.json"), str(WD / "error-maxlag.json")])
    assert bad.exit_code != 0 and "not an entity" in str(bad.exception)


def _relabel(entity: dict, old_type: str, new_type: str, pids: set[str] | None = None) -> list[str]:
    """Relabel every `old_type` main snak (of `pids`, else all) to `new_type` in place; the touched P-ids."""
    touched = []
    for pid, stmts in entity["claims"].items():
        for s in stmts:
            main = s["mainsnak"]
            if main.get("datatype") == old_type and (pids is None or pid in pids):
                main["datatype"] = new_type
                touched.append(pid)
    return sorted(set(touched))


def test_datatype_relabel_with_the_same_value_is_no_change():
    # Wikidata's 2016 migration relabelled identifier properties `string` -> `external-id` and
    # left every value as it was: Bielefeld as it would have read before it, and after.
    after = load("entity-Q2112.json")
    before = copy.deepcopy(after)
    relabelled = _relabel(before, "external-id", "string")
    assert len(relabelled) >= 5  # real identifiers, so the test is not vacuous
    assert diff_entities(before, after) == []
    assert diff_entities(after, before) == []  # and a relabel back is no change either
    # A relabel among other plain-string datatypes (string -> url) is the same value too.
    again = copy.deepcopy(before)
    _relabel(again, "string", "url", {relabelled[0]})
    assert diff_entities(before, again) == []


def test_datatype_relabel_with_a_new_value_is_still_an_update():
    after = load("entity-Q2112.json")
    before = copy.deepcopy(after)
    relabelled = _relabel(before, "external-id", "string")
    pid = relabelled[0]
    stmt_before = next(s for s in before["claims"][pid] if s["rank"] != "deprecated")
    old_text = stmt_before["mainsnak"]["datavalue"]["value"]
    stmt_before["mainsnak"]["datavalue"]["value"] = old_text + "-old"
    changes = diff_entities(before, after)
    assert [(c.property, c.kind) for c in changes] == [(pid, "updated")]
    [c] = changes
    assert c.old_value == {"type": "string", "value": old_text + "-old"}
    assert c.new_value == {"type": "external-id", "value": old_text}
    assert c.datatype == "external-id"
