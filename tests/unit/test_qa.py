"""Fact changes -> edit cases: wording, every probe kind, every filter, the real Q42 revisions."""
import json
from pathlib import Path

import pytest

from kedit_core.diff import diff_entities, parse_entity
from kedit_core.qa import QAConfig, SubjectFacts, build_cases, dict_labels
from kedit_core.types import EditCase, FactChange

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "wikidata"  # byte-exact copies (SOURCES.md)
LABEL_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "labels" / "q42_labels.json"

LABELS = {
    "Q64": "Berlin", "Q1055": "Hamburg", "Q183": "Germany", "Q350": "Cambridge", "Q90": "Paris",
    "Q142": "France", "Q1001": "Kai Wegner", "Q1002": "Franziska Giffey", "Q1003": "Peter Tschentscher",
    "Q1004": "Emmanuel Macron", "Q1005": "Bonn", "Q2000": "Category:Capitals", "Q2001": "Mercury",
    "Q2002": "Mercury (disambiguation)", "Q2003": "Freddie Mercury", "Q5": "human", "Q4167410": "disambiguation page",
    "Q2004": "politician", "Q2005": "lawyer", "Q2006": "Anne", "Q2007": "Anne Smith", "Q2008": "Smith",
    "Q3000": "Paul", "Q3001": "BBC", "Q3002": "ITV",
    "P6": "head of government", "P9999": "favourite colour", "P1263": "NNDB people ID",
}


def item(q):
    return {"type": "wikibase-item", "id": q}


def change(subject, pid, old, new, kind=None, revid=1, datatype=None):
    kind = kind or ("updated" if old and new else "added" if new else "removed")
    dt = datatype or (new or old or {}).get("type")
    return FactChange(subject, pid, old, new, kind, revid, "2024-05-01T00:00:00Z", datatype=dt)


@pytest.fixture
def facts():
    return SubjectFacts(
        {
            "Q64": {"P6": [item("Q1001")], "P17": [item("Q183")],
                    "P1082": [{"type": "quantity", "amount": "+3755251", "unit": "1"}]},
            "Q1055": {"P6": [item("Q1003")], "P17": [item("Q183")]},
            "Q90": {"P6": [item("Q1004")]},
            "Q183": {"P36": [item("Q64")]},
        }
    )


def build(changes, facts=None, labels=LABELS, **cfg):
    return build_cases(changes, dict_labels(labels), facts, QAConfig(**cfg))


def test_update_becomes_cloze_case_with_question_and_old_answer(facts):
    ch = change("Q64", "P6", item("Q1002"), item("Q1001"))
    rep = build([ch], facts)
    assert rep.dropped == [] and len(rep.cases) == 1
    case = rep.cases[0]
    assert case.prompt == "The head of government of Berlin is"
    assert case.question == "Who is the head of government of Berlin?"
    assert (case.target_new, case.target_old) == ("Kai Wegner", "Franziska Giffey")
    assert case.prompt[slice(*case.subject_span)] == "Berlin"
    assert case.case_id == f"wd-{ch.change_id}" and case.change_id == ch.change_id
    # stable: the same change gives the same id, and the case survives a JSON round trip
    assert build([ch], facts).cases[0].case_id == case.case_id
    assert EditCase.from_json(case.to_json()) == case
    assert rep.specific_template == 1 and case.meta["template"] == "specific"


def test_paraphrases_are_held_out_from_the_edit(facts):
    case = build([change("Q64", "P6", item("Q1002"), item("Q1001"))], facts).cases[0]
    paras = case.probes_of("paraphrase")
    assert len({p.prompt for p in paras}) >= 3
    assert all(p.prompt != case.prompt and "Berlin" in p.prompt and p.answer == "Kai Wegner" for p in paras)


def test_negation_probes_pp_pn(facts):
    case = build([change("Q64", "P6", item("Q1002"), item("Q1001"))], facts).cases[0]
    neg = {p.meta["polarity"]: p for p in case.probes_of("negation")}
    assert neg["new"].prompt == "Is it true that the head of government of Berlin is Kai Wegner?"
    assert neg["new"].answer == "Yes"
    assert neg["old"].prompt == "Is it true that the head of government of Berlin is Franziska Giffey?"
    assert neg["old"].answer == "No"
    assert neg["new_negated"].prompt == "Is it true that the head of government of Berlin is not Kai Wegner?"
    assert neg["new_negated"].answer == "No"


def test_locality_other_subjects_same_relation(facts):
    case = build([change("Q64", "P6", item("Q1002"), item("Q1001"))], facts).cases[0]
    loc = {p.prompt: p.answer for p in case.probes_of("locality_other")}
    # cloze form, as the edit itself: the unedited model continues it with an answer
    assert loc == {"The head of government of Hamburg is": "Peter Tschentscher",
                   "The head of government of Paris is": "Emmanuel Macron"}


def test_locality_other_skips_subjects_changed_in_the_same_batch(facts):
    rep = build([change("Q64", "P6", item("Q1002"), item("Q1001")),
                 change("Q1055", "P6", item("Q1002"), item("Q1003"))], facts)
    assert all("Hamburg" not in p.prompt for p in rep.cases[0].probes_of("locality_other"))


def test_locality_same_subject_other_relations(facts):
    case = build([change("Q64", "P6", item("Q1002"), item("Q1001"))], facts).cases[0]
    loc = {p.prompt: p.answer for p in case.probes_of("locality_same")}
    assert loc == {"Berlin is located in the country": "Germany", "The population of Berlin is": "3,755,251"}


def test_multihop_through_the_new_object(facts):
    case = build([change("Q183", "P36", item("Q1005"), item("Q64"))], facts).cases[0]
    assert case.prompt == "The capital of Germany is" and case.target_new == "Berlin"
    hops = {p.prompt: p.answer for p in case.probes_of("multihop")}
    assert hops["Who is the head of government of the capital of Germany?"] == "Kai Wegner"
    assert hops["What is the population of the capital of Germany?"] == "3,755,251"
    assert all(p.meta["hops"][0] == "P36" for p in case.probes_of("multihop"))


def test_no_facts_means_no_locality_or_multihop():
    case = build([change("Q183", "P36", item("Q1005"), item("Q64"))]).cases[0]
    kinds = {p.kind for p in case.probes}
    assert kinds == {"paraphrase", "negation"}


# ----------------------------------------------------------------------------- filters


def only_reason(rep):
    assert rep.cases == [] and len(rep.dropped) == 1, rep
    return rep.dropped[0].reason


def test_removal_produces_no_case():
    assert only_reason(build([change("Q64", "P6", item("Q1002"), None)])) == "removed"


def test_updates_only_for_single_valued_relations():
    rep = build([change("Q2007", "P106", item("Q2004"), item("Q2005"))])
    assert only_reason(rep) == "multi_valued_update"
    # an addition to a multi-valued relation is a fact of its own
    added = build([change("Q2007", "P106", None, item("Q2005"))])
    assert [c.target_new for c in added.cases] == ["lawyer"] and added.cases[0].target_old is None


def test_answer_in_question_is_dropped():
    # "Anne" is the given name of "Anne Smith": the question would give the answer away
    rep = build([change("Q2007", "P735", None, item("Q2006"))])
    assert only_reason(rep) == "answer_in_question"


def test_answer_length_limit():
    labels = dict(LABELS, Q3000="Paul " * 20)
    rep = build([change("Q2007", "P26", None, item("Q3000"))], labels=labels)
    assert only_reason(rep) == "answer_too_long"
    rep = build([change("Q2007", "P26", None, item("Q3000"))], max_answer_chars=3)
    assert only_reason(rep) == "answer_too_long"


def test_category_template_and_disambiguation_subjects_are_dropped():
    assert only_reason(build([change("Q2000", "P17", None, item("Q183"))])) == "meta_subject"
    assert only_reason(build([change("Q2002", "P17", None, item("Q183"))])) == "meta_subject"
    facts = SubjectFacts({"Q2001": {"P31": [item("Q4167410")]}})
    rep = build([change("Q2001", "P17", None, item("Q183"))], facts)
    assert only_reason(rep) == "meta_subject" and "disambiguation" in rep.dropped[0].detail


def test_unlabelled_subject_and_value():
    assert only_reason(build([change("Q777", "P17", None, item("Q183"))])) == "subject_unlabelled"
    assert only_reason(build([change("Q64", "P17", None, item("Q778"))])) == "new_value_unlabelled"


@pytest.mark.parametrize("kind", ["somevalue", "novalue"])
def test_somevalue_and_novalue_give_no_case(kind):
    rep = build([change("Q64", "P6", item("Q1002"), {"type": kind}, datatype="wikibase-item")])
    assert only_reason(rep) == f"new_value_{kind}"


def test_identifiers_are_not_qa_facts():
    ext = change("Q2007", "P214", None, {"type": "external-id", "value": "113230702"})
    assert only_reason(build([ext])) == "datatype_excluded"
    old_style = change("Q2007", "P1263", None, {"type": "string", "value": "731/000023662"})
    assert only_reason(build([old_style])) == "identifier_like"


def test_no_template_and_no_label():
    rep = build([change("Q64", "P8888", None, item("Q183"))])
    assert only_reason(rep) == "no_template"


def test_fallback_template_from_property_label():
    rep = build([change("Q64", "P9999", None, item("Q3001"))])
    case = rep.cases[0]
    assert case.prompt == "The favourite colour of Berlin is" and case.meta["template"] == "fallback"
    assert rep.fallback_template == 1 and rep.specific_template == 0
    # fallback relations are treated as multi-valued: an update is not a replacement
    assert only_reason(build([change("Q64", "P9999", item("Q3002"), item("Q3001"))])) == "multi_valued_update"


def test_later_change_of_same_fact_supersedes_earlier():
    rep = build([change("Q64", "P6", item("Q1002"), item("Q1003"), revid=1),
                 change("Q64", "P6", item("Q1003"), item("Q1001"), revid=2)])
    assert [c.target_new for c in rep.cases] == ["Kai Wegner"]
    assert rep.reasons() == {"superseded": 1}
    # several values of a multi-valued relation are separate facts
    rep = build([change("Q2007", "P106", None, item("Q2004")), change("Q2007", "P106", None, item("Q2005"))])
    assert sorted(c.target_new for c in rep.cases) == ["lawyer", "politician"]


def test_unchanged_rendering_is_dropped():
    a = {"type": "time", "time": "+1952-03-11T00:00:00Z", "precision": 11}
    b = {"type": "time", "time": "+00000001952-03-11T00:00:00Z", "precision": 11}
    assert only_reason(build([change("Q2007", "P569", a, b)])) == "unchanged_answer"


def test_self_reference_is_dropped():
    assert only_reason(build([change("Q64", "P1376", None, item("Q64"))])) == "self_reference"


def test_one_label_lookup_per_build(facts):
    calls = []

    def lookup(ids):
        calls.append(list(ids))
        return {i: LABELS[i] for i in ids if i in LABELS}

    build_cases([change("Q64", "P6", item("Q1002"), item("Q1001")), change("Q183", "P36", None, item("Q64"))],
                lookup, facts)
    assert len(calls) == 1 and {"Q64", "Q1001", "Q1002", "Q183", "Q1003", "Q1004"} <= set(calls[0])


# ----------------------------------------------------------------------------- real revisions


def _q42_pair():
    old = json.loads((RECORDED / "wbgetentities-Q6-Q42-P31.json").read_text())
    new = json.loads((RECORDED / "wbgetentities-Douglas-Adams.json").read_text())
    return parse_entity(old, "Q42"), parse_entity(new, "Q42")


@pytest.fixture
def q42_labels():
    return json.loads(LABEL_FIXTURE.read_text())["labels"]


def test_real_q42_revisions(q42_labels):
    old, new = _q42_pair()
    changes = diff_entities(old, new)
    rep = build_cases(changes, dict_labels(q42_labels), SubjectFacts.from_entities([new]))
    assert [(c.relation, c.prompt, c.target_new) for c in rep.cases] == [
        ("P800", "A notable work of Douglas Adams is", "Dirk Gently's Holistic Detective Agency")]
    case = rep.cases[0]
    assert "Which work is Douglas Adams known for?" in [p.prompt for p in case.probes_of("paraphrase")]
    same = {p.prompt: p.answer for p in case.probes_of("locality_same")}
    assert same["Douglas Adams was born in"] == "Cambridge"
    # the three added identifiers are recorded as dropped, with their reason
    assert {(d.property, d.reason) for d in rep.dropped} == {
        ("P1263", "identifier_like"), ("P1695", "identifier_like"), ("P1816", "identifier_like")}


def test_every_item_and_date_fact_of_q42_reads_naturally(q42_labels):
    _, new = _q42_pair()
    rep = build_cases(diff_entities(None, new), dict_labels(q42_labels), SubjectFacts.from_entities([new]))
    by_prop = {c.relation: c for c in rep.cases}
    assert by_prop["P569"].prompt == "The date of birth of Douglas Adams is"
    assert by_prop["P569"].target_new == "11 March 1952" and by_prop["P570"].target_new == "11 May 2001"
    assert by_prop["P19"].question == "Where was Douglas Adams born?"
    assert by_prop["P509"].target_new == "myocardial infarction"
    for case in rep.cases:  # nothing a person would reject outright
        texts = [case.prompt, case.question] + [p.prompt for p in case.probes]
        assert all("Douglas Adams" in t for t in texts[:2])
        assert not any(t.count("{") or "Q" + "42" in t for t in texts)
        assert case.target_new not in case.question
    reasons = rep.reasons()
    assert reasons["answer_in_question"] == 2  # given name "Douglas", family name "Adams"
    assert reasons["new_value_unlabelled"] >= 1


def test_most_recent_value_by_point_in_time_wins_within_a_revision():
    def pop(amount, year):
        return FactChange("Q64", "P1082", None, {"type": "quantity", "amount": amount, "unit": "1"}, "added", 5,
                          "2024-05-01T00:00:00Z",
                          qualifiers={"P585": [{"type": "time", "time": f"+{year}-00-00T00:00:00Z", "precision": 9}]},
                          datatype="quantity")

    rep = build([pop("+3700000", 2022), pop("+3755251", 2023), pop("+3600000", 2019)])
    assert [c.target_new for c in rep.cases] == ["3,755,251"]
    assert rep.reasons() == {"superseded": 2}


# ----------------------------------------------------------------------------- aliases


ALIASES = {"Q1001": ["Wegner", "Kai Peter Wegner"], "Q1002": ["Giffey", "Franziska Süllke"],
           "Q64": ["Berlin, Germany"], "Q1005": ["Bundesstadt Bonn"]}


def test_item_aliases_reach_the_case_from_the_label_lookup(facts):
    ch = change("Q64", "P6", item("Q1002"), item("Q1001"))
    case = build_cases([ch], dict_labels(LABELS, ALIASES), facts).cases[0]
    assert case.target_new == "Kai Wegner" and case.target_old == "Franziska Giffey"  # unchanged
    assert case.meta["aliases"] == ["Wegner", "Kai Peter Wegner"]
    assert case.meta["old_aliases"] == ["Giffey", "Franziska Süllke"]
    # an alias lookup given explicitly wins over the label lookup's own
    case = build_cases([ch], dict_labels(LABELS, ALIASES), facts, aliases=lambda ids: {"Q1001": ["K. Wegner"]}).cases[0]
    assert case.meta["aliases"] == ["K. Wegner"] and case.meta["old_aliases"] == []
    # a plain callable label lookup: no item aliases, but the fields are there
    case = build([ch], facts).cases[0]
    assert case.meta["aliases"] == [] and case.meta["old_aliases"] == []


def test_item_alias_shared_with_the_old_value_is_left_out(facts):
    aliases = {"Q1001": ["Wegner", "Berlin mayor"], "Q1002": ["Berlin mayor", "Giffey"]}
    case = build_cases([change("Q64", "P6", item("Q1002"), item("Q1001"))], dict_labels(LABELS, aliases),
                       facts).cases[0]
    assert case.meta["aliases"] == ["Wegner"] and case.meta["old_aliases"] == ["Giffey"]


def test_quantity_and_date_cases_get_their_other_renderings():
    pop = change("Q64", "P1082", {"type": "quantity", "amount": "+3600000", "unit": "1"},
                 {"type": "quantity", "amount": "+3755251", "unit": "1"})
    born = change("Q64", "P569", None, {"type": "time", "time": "+1879-03-14T00:00:00Z", "precision": 11})
    rep = build([pop, born])
    by = {c.relation: c for c in rep.cases}
    assert by["P1082"].target_new == "3,755,251" and by["P1082"].meta["aliases"] == ["3755251"]
    assert by["P1082"].meta["old_aliases"] == ["3600000", "3.6 million"]
    assert by["P569"].target_new == "14 March 1879"
    assert by["P569"].meta["aliases"] == ["March 14, 1879", "1879-03-14", "14th March 1879", "March 14th, 1879"]
    assert by["P569"].meta["old_aliases"] == []


def test_multihop_probe_answer_gets_its_aliases(facts):
    case = build_cases([change("Q183", "P36", item("Q1005"), item("Q64"))], dict_labels(LABELS, ALIASES),
                       facts).cases[0]
    assert case.meta["aliases"] == ["Berlin, Germany"] and case.meta["old_aliases"] == ["Bundesstadt Bonn"]
    hops = {p.answer: p.meta["aliases"] for p in case.probes_of("multihop")}
    assert hops["Kai Wegner"] == ["Wegner", "Kai Peter Wegner"]
    assert hops["3,755,251"] == ["3755251"]


def test_entities_at_hand_bring_their_own_aliases():
    berlin = {"id": "Q64", "labels": {"en": {"language": "en", "value": "Berlin"}},
              "aliases": {"en": [{"language": "en", "value": "Berlin, Germany"}],
                          "de": [{"language": "de", "value": "Spree-Athen"}]}, "claims": {}}
    facts = SubjectFacts.from_entities([berlin])
    assert facts.aliases["Q64"] == ["Berlin, Germany"]  # the label's language only
    asked = []
    lookup = dict_labels(LABELS, {"Q64": ["from the lookup"]})
    inner = lookup.aliases
    lookup.aliases = lambda ids: asked.append(list(ids)) or inner(ids)
    case = build_cases([change("Q183", "P36", item("Q1005"), item("Q64"))], lookup, facts).cases[0]
    assert case.meta["aliases"] == ["Berlin, Germany"]
    assert asked == [["Q1005"]]  # one alias lookup, only for what the entities do not give


def test_cached_label_lookup_serves_aliases_to_build_cases(tmp_path, facts):
    from flows.services.labels import CachedLabelLookup
    from connectors.wikidata import EntityLabel
    from storage import wikidata_store
    from storage.db import open_db

    class Client:
        def __init__(self):
            self.asked = []

        def labels(self, ids, lang="en"):
            self.asked += list(ids)
            return {i: EntityLabel(i, LABELS[i], None, tuple(ALIASES.get(i, ()))) for i in ids if i in LABELS}

    db = open_db(tmp_path / "labels.duckdb")
    client = Client()
    ch = change("Q64", "P6", item("Q1002"), item("Q1001"))
    case = build_cases([ch], CachedLabelLookup(client, db), facts).cases[0]
    assert case.meta["aliases"] == ["Wegner", "Kai Peter Wegner"]
    assert case.meta["old_aliases"] == ["Giffey", "Franziska Süllke"]
    # a new lookup over the same cache reads labels and aliases from the cache, not the API
    asked_before = list(client.asked)
    case = build_cases([ch], CachedLabelLookup(client, db), facts).cases[0]
    assert client.asked == asked_before and case.meta["aliases"] == ["Wegner", "Kai Peter Wegner"]
    wikidata_store.put_labels(db, [("Q1001", "Kai Wegner", None, ())])  # cached without aliases
    assert CachedLabelLookup(None, db).aliases(["Q1001", "Q1002"]) == {"Q1002": ["Giffey", "Franziska Süllke"]}
