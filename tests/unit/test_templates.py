"""The property template table: size, required properties, shape of every row, parse errors."""
import pytest

from kedit_core.templates import (
    TemplateTableError,
    coverage,
    fallback_template,
    negate_cloze,
    parse_table,
    template_for,
    templates,
)

REQUIRED = ["P6", "P35", "P39", "P54", "P108", "P69", "P26", "P36", "P1082", "P169", "P488", "P286",
            "P17", "P131", "P106", "P569", "P570"]


def test_table_covers_at_least_150_item_date_quantity_properties():
    table = templates()
    targeted = [t for t in table.values() if t.datatype in ("wikibase-item", "time", "quantity")]
    assert len(targeted) >= 150
    for pid in REQUIRED:
        assert pid in table, pid
    assert table["P569"].datatype == "time" and table["P1082"].datatype == "quantity"


def test_every_row_is_complete_and_distinct():
    for pid, t in templates().items():
        assert t.label and t.specific, pid
        assert "{subject}" in t.cloze and not t.cloze.endswith((" ", "?")), pid
        assert len(set(t.questions)) >= 3, pid
        assert all("{subject}" in q and q.endswith(("?", ".")) for q in t.questions), pid
        assert t.prompt("Xyz") not in t.question_forms("Xyz"), pid  # the edit wording is held out
        assert " not" in t.negation and t.negation != t.cloze, pid
        assert "Xyz" in t.object_phrase("Xyz"), pid


def test_single_valued_flags_match_the_relation():
    table = templates()
    assert table["P6"].single_valued and table["P36"].single_valued and table["P569"].single_valued
    assert not table["P106"].single_valued and not table["P800"].single_valued


def test_filled_forms_use_subject_verbatim_even_with_braces():
    t = templates()["P36"]
    assert t.prompt("Foo {bar}") == "The capital of Foo {bar} is"
    assert t.negated("France") == "The capital of France is not"
    assert t.statement("France", "Paris") == "The capital of France is Paris"


def test_negate_cloze_inserts_not_after_first_auxiliary():
    assert negate_cloze("{subject} was born in") == "{subject} was not born in"
    assert negate_cloze("The population of {subject} is") == "The population of {subject} is not"
    assert negate_cloze("{subject} works in") is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("P1 | i1 | x | | The x of is | Q {subject}? ; R {subject}? ; S {subject}? | |", "lacks {subject}"),
        ("P1 | i1 | x | | The x of {subject} is | Q {subject}? ; R {subject}? | |", "three questions"),
        ("P1 | z1 | x | | The x of {subject} is | Q {subject}? ; R {subject}? ; S {subject}? | |", "bad kind"),
        ("Q1 | i1 | x | | The x of {subject} is | Q {subject}? ; R {subject}? ; S {subject}? | |", "bad property id"),
        ("P1 | i1 | x | | {subject} works in | Q {subject}? ; R {subject}? ; S {subject}? | |", "negation"),
        ("P1 | i1 | x | | The x of {subject} is | Q {subject}? ; Q {subject}? ; S {subject}? | |", "repeated"),
    ],
)
def test_malformed_rows_name_the_line(line, message):
    with pytest.raises(TemplateTableError, match=message) as err:
        parse_table("# header\n" + line, source="t.txt")
    assert "t.txt line 2" in str(err.value)


def test_duplicate_property_is_rejected():
    row = "P1 | i1 | x | | The x of {subject} is | Q {subject}? ; R {subject}? ; S {subject}? | |"
    with pytest.raises(TemplateTableError, match="twice"):
        parse_table(row + "\n" + row)


def test_fallback_from_label_and_aliases():
    t = fallback_template("P9999", "favourite colour", "wikibase-item", aliases=["preferred colour"])
    assert not t.specific and not t.single_valued
    assert t.prompt("Ann") == "The favourite colour of Ann is"
    assert "What is the preferred colour of Ann?" in t.question_forms("Ann")
    assert len(t.questions) >= 3
    assert template_for("P9999", "favourite colour").label == "favourite colour"
    assert template_for("P9999") is None
    assert template_for("P9999", "P9999") is None  # an unlabelled id is no label
    assert template_for("P6").specific


def test_coverage_counts_specific_and_uncovered():
    rep = coverage(["P6", "P6", "P9999", "P36"])
    assert (rep.total, rep.specific) == (4, 3)
    assert rep.share == 0.75 and rep.uncovered == {"P9999": 1}
