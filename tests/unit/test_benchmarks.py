"""Benchmark readers on the shipped subsets, and bad records -> errors naming file, record, field."""
import json
from pathlib import Path

import pytest

from connectors.benchmarks import (
    BenchmarkFormatError,
    ReadReport,
    dataset_readers,
    read_counterfact,
    read_counterfact_rome,
    read_dataset,
    read_knowedit,
    read_mquake,
    read_zsre,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "benchmarks"


def test_all_readers_registered():
    assert set(dataset_readers()) >= {"zsre", "knowedit", "counterfact", "counterfact_rome", "mquake"}


def test_shipped_subsets_are_small():
    for f in DATA.glob("*_20*.json"):
        assert f.stat().st_size < 300_000, f
    assert (DATA / "mquake_hard_40.json").stat().st_size < 300_000


def test_knowedit_with_portability_and_locality():
    cases = read_knowedit(DATA / "knowedit_zsre_test_200.json")
    assert len(cases) == 200
    c = cases[0]
    assert (c.subject, c.prompt, c.target_new, c.target_old) == (
        "Epaspidoceras", "Which family does Epaspidoceras belong to?", "Noctuidae", "Aspidoceratidae")
    assert c.source == "knowedit"
    assert [p.prompt for p in c.probes_of("paraphrase")] == ["What family are Epaspidoceras?"]
    assert c.probes_of("locality_same")[0].answer == "genus"
    port = c.probes_of("portability")[0]
    assert port.answer == "Owlet moths" and port.meta["family"] == "Reasoning"
    families = {p.meta["family"] for x in cases for p in x.probes_of("portability")}
    assert families == {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}


def test_counterfact_easyedit_shape():
    cases = read_counterfact(DATA / "counterfact_edit_200.json")
    assert len(cases) == 200
    c = cases[0]
    assert (c.prompt, c.target_new, c.target_old) == ("The mother tongue of Danielle Darrieux is", "English", "French")
    assert c.prompt[slice(*c.subject_span)] == "Danielle Darrieux" and c.subject_span == (21, 38)
    assert c.probes_of("locality_other")[0].answer == "French"
    assert c.case_id == "counterfact-0"


def test_counterfact_rome_shape():
    cases = read_counterfact_rome(DATA / "counterfact_rome_format_20.json")
    assert len(cases) == 20
    c = cases[0]
    assert c.prompt == "Luigi Snozzi, who has a citizenship from" and c.subject == "Luigi Snozzi"
    assert (c.target_new, c.target_old, c.relation) == ("Singapore", "Switzerland", "P27")
    assert len(c.probes_of("paraphrase")) == 2
    assert len(c.probes_of("locality_other")) == 10
    assert all(p.answer == "Switzerland" for p in c.probes_of("locality_other"))
    assert c.meta["attribute_prompts"]


def test_mquake_one_case_per_rewrite_with_multihop_on_last():
    cases = read_mquake(DATA / "mquake_hard_40.json")
    assert len(cases) == 160
    first = cases[:4]
    assert [c.prompt for c in first] == ["Hey Jude was performed by", "The director of Madonna is",
                                         "Narendra Modi is a citizen of", "The official language of Australia is"]
    assert [c.target_new for c in first] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert {c.meta["group"] for c in first} == {"mquake-7417"}
    assert first[0].probes_of("paraphrase")[0].prompt == "Who performed Hey Jude?"
    hops = first[3].probes_of("multihop")
    assert len(hops) == 3 and all(p.answer == "Arabic" for p in hops)
    assert not first[0].probes_of("multihop")
    # a limit never splits a record's chain of edits
    assert len(read_mquake(DATA / "mquake_hard_40.json", limit=5)) == 8


@pytest.mark.parametrize(
    "kind, file, n",
    [("zsre", "zsre_mend_train_1k.json", 998), ("knowedit", "knowedit_zsre_test_200.json", 200),
     ("counterfact", "counterfact_edit_200.json", 200), ("counterfact_rome", "counterfact_rome_format_20.json", 20),
     ("mquake", "mquake_hard_40.json", 160)],
)
def test_read_dataset_by_kind(kind, file, n):
    rep = ReadReport(path=file)
    cases = read_dataset(f"{kind}:{DATA / file}", report=rep)
    assert len(cases) == n == rep.read
    assert all(c.subject in c.prompt for c in cases)


def test_read_dataset_unknown_kind():
    with pytest.raises(BenchmarkFormatError, match="unknown dataset kind 'nope'"):
        read_dataset("nope:x.json")


# ----------------------------------------------------------------------------- bad records

KE_OK = {"subject": "Foo", "prompt": "Where is Foo?", "target_new": "Bar", "ground_truth": ["Baz"],
         "rephrase_prompt": "Foo is where?", "locality": {}, "portability": {}}
CF_OK = {"case_id": 7, "prompt": "Foo speaks", "subject": "Foo", "target_new": "French", "ground_truth": "English",
         "rephrase_prompt": "Foo talks", "locality_prompt": "Bar speaks", "locality_ground_truth": "English"}
ROME_OK = {"case_id": 1, "requested_rewrite": {"prompt": "{} is a citizen of", "subject": "Foo", "relation_id": "P27",
                                               "target_new": {"str": "Peru"}, "target_true": {"str": "Chile"}},
           "paraphrase_prompts": ["Foo holds citizenship of"], "neighborhood_prompts": ["Bar is a citizen of"]}
MQ_OK = {"case_id": 9, "requested_rewrite": [ROME_OK["requested_rewrite"]], "questions": ["Q about Foo?"],
         "new_answer": "Peru", "answer": "Chile"}


def _write(tmp_path, records, name="bad.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def _drop(d, *path):
    d = json.loads(json.dumps(d))
    cur = d
    for key in path[:-1]:
        cur = cur[key]
    del cur[path[-1]]
    return d


def _set(d, value, *path):
    d = json.loads(json.dumps(d))
    cur = d
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return d


@pytest.mark.parametrize(
    "reader, good, bad, field",
    [
        (read_knowedit, KE_OK, _drop(KE_OK, "subject"), "subject"),
        (read_knowedit, KE_OK, _set(KE_OK, "  ", "target_new"), "target_new"),
        (read_knowedit, KE_OK, _set(KE_OK, {"Reasoning": [{"prompt": "x?"}]}, "portability"), "portability.Reasoning[0]"),
        (read_counterfact, CF_OK, _drop(CF_OK, "prompt"), "prompt"),
        (read_counterfact, CF_OK, _set(CF_OK, "", "target_new"), "target_new"),
        (read_counterfact_rome, ROME_OK, _drop(ROME_OK, "requested_rewrite"), "requested_rewrite"),
        (read_counterfact_rome, ROME_OK, _set(ROME_OK, {"str": ""}, "requested_rewrite", "target_new"),
         "requested_rewrite.target_new.str"),
        (read_counterfact_rome, ROME_OK, _set(ROME_OK, "Foo is a citizen of", "requested_rewrite", "prompt"), "'{}'"),
        (read_mquake, MQ_OK, _set(MQ_OK, [], "requested_rewrite"), "requested_rewrite"),
        (read_mquake, MQ_OK, _drop(MQ_OK, "new_answer"), "new_answer"),
        (read_mquake, MQ_OK, _set(MQ_OK, [], "questions"), "questions"),
    ],
)
def test_bad_record_names_file_record_and_field(tmp_path, reader, good, bad, field):
    path = _write(tmp_path, [good, bad, good])
    with pytest.raises(BenchmarkFormatError) as err:
        reader(path)
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg and field in msg
    # skipped and counted, and nothing else is lost
    report = ReadReport(path=str(path))
    cases = reader(path, skip_bad=True, report=report)
    per_record = len(reader(_write(tmp_path, [good], "one.json")))
    assert len(cases) == 2 * per_record and len(report.skipped) == 1 and "record 1" in report.skipped[0]


def test_subject_missing_from_prompt(tmp_path):
    path = _write(tmp_path, [_set(KE_OK, "Elsewhere?", "prompt")])
    with pytest.raises(BenchmarkFormatError, match="subject 'Foo' does not occur"):
        read_knowedit(path)


@pytest.mark.parametrize("reader", [read_zsre, read_knowedit, read_counterfact, read_counterfact_rome, read_mquake])
def test_file_level_errors(tmp_path, reader):
    with pytest.raises(BenchmarkFormatError, match="does not exist"):
        reader(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(BenchmarkFormatError, match="not valid JSON"):
        reader(broken)
    with pytest.raises(BenchmarkFormatError, match="expected a JSON list"):
        reader(_write(tmp_path, {"a": 1}, "obj.json"))
    with pytest.raises(BenchmarkFormatError, match="record 0"):
        reader(_write(tmp_path, ["just a string"], "str.json"))


# ----------------------------------------------------------------------------- aliases


def test_mquake_aliases_per_hop_from_the_shipped_file():
    first = read_mquake(DATA / "mquake_hard_40.json", limit=4)[:4]
    madonna, modi, australia, arabic = first
    assert madonna.meta["aliases"] == ["Madonna Ciccone", "Madonna Louise Ciccone", "Madonna Louise Veronica Ciccone"]
    # the old object of the first edit is the first hop of the original chain
    assert madonna.meta["old_aliases"] == ["Beatles", "Fab Four", "John, Paul, George, and Ringo", "The Beattles",
                                           "The Lads from Liverpool"]
    assert "Modi" in modi.meta["aliases"] and modi.meta["old_aliases"] == []  # Guy Oseary is on neither chain
    assert {"Oz", "Commonwealth of Australia"} <= set(australia.meta["aliases"])
    assert (arabic.meta["aliases"], arabic.meta["old_aliases"]) == (
        ["ar", "Arabian language", "Arabic language"], ["en", "eng", "English language"])
    hop = arabic.probes_of("multihop")[0]
    assert hop.meta["aliases"] == ["ar", "Arabian language", "Arabic language"]
    assert hop.meta["old_answer"] == "English" and hop.meta["old_aliases"] == ["en", "eng", "English language"]


def test_zsre_all_true_answers_are_old_aliases():
    cases = {c.case_id: c for c in read_zsre(DATA / "zsre_mend_train_1k.json", skip_bad=True)}
    c = cases["zsre-13"]
    assert (c.target_new, c.target_old) == ("Benedenrecht", "Beneden Merwede")
    assert c.meta["old_aliases"] == ["Noord"] and c.meta["aliases"] == []
    # a true answer that is also the new value cannot count as the old one
    c = cases["zsre-88"]
    assert (c.target_new, c.target_old) == ("Chicago Bears", "San Diego Chargers")
    assert c.meta["old_aliases"] == ["Indianapolis Colts"]


def test_knowedit_ground_truth_list_gives_old_aliases():
    cases = read_knowedit(DATA / "knowedit_zsre_test_200.json")
    c = cases[58]
    assert (c.target_new, c.target_old) == ("War of 1812", "Torstenson War")
    assert c.meta["old_aliases"] == ["Second Northern War", "Scanian War"]
    assert cases[0].meta["old_aliases"] == []  # a single ground truth
    assert all(p.meta["aliases"] == [] for p in cases[0].probes_of("portability"))  # plain-string answers
