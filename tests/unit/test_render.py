"""Answers rendered per datatype from the diff's normalised values; never a Q-id in text."""
import pytest

from kedit_core.render import (
    Unrenderable,
    format_number,
    ids_needed,
    item_aliases,
    normalise_form,
    prune_aliases,
    quantity_aliases,
    render_value,
    time_aliases,
    value_aliases,
)

LABELS = {"Q64": "Berlin", "Q1234": "furlong", "Q99": "Q99"}


def r(value, labels=LABELS):
    return render_value(value, labels)


def test_item_by_label():
    assert r({"type": "wikibase-item", "id": "Q64"}) == "Berlin"
    assert ids_needed({"type": "wikibase-item", "id": "Q64"}) == ["Q64"]


@pytest.mark.parametrize("value", [{"type": "wikibase-item", "id": "Q5"}, {"type": "wikibase-item", "id": "Q99"}])
def test_item_without_english_label_is_unrenderable(value):
    with pytest.raises(Unrenderable) as err:
        r(value)
    assert err.value.reason == "unlabelled"


@pytest.mark.parametrize(
    "time, precision, text",
    [
        ("+2024-05-01T00:00:00Z", 11, "1 May 2024"),
        ("+00000001952-03-11T00:00:00Z", 11, "11 March 1952"),
        ("+2024-05-00T00:00:00Z", 11, "May 2024"),  # day precision but no day: month only
        ("+2024-05-01T00:00:00Z", 10, "May 2024"),
        ("+2024-00-00T00:00:00Z", 9, "2024"),
        ("+1990-00-00T00:00:00Z", 8, "1990s"),
        ("+1995-00-00T00:00:00Z", 8, "1990s"),
        ("+2000-00-00T00:00:00Z", 7, "20th century"),
        ("+1901-00-00T00:00:00Z", 7, "20th century"),
        ("+1801-00-00T00:00:00Z", 7, "19th century"),
        ("+2000-00-00T00:00:00Z", 6, "2nd millennium"),
        ("-0044-03-15T00:00:00Z", 11, "15 March 44 BCE"),
        ("-0500-00-00T00:00:00Z", 9, "500 BCE"),
        ("-0250-00-00T00:00:00Z", 7, "3rd century BCE"),
        ("-13798000000-00-00T00:00:00Z", 3, "13.8 billion years ago"),
        ("-65000000-00-00T00:00:00Z", 4, "65 million years ago"),
    ],
)
def test_time_by_precision(time, precision, text):
    assert r({"type": "time", "time": time, "precision": precision, "calendar": "Q1985727"}) == text


def test_bad_time_is_unrenderable():
    with pytest.raises(Unrenderable, match="bad_time"):
        r({"type": "time", "time": "yesterday", "precision": 11})


@pytest.mark.parametrize(
    "amount, unit, text",
    [
        ("+8336817", "1", "8,336,817"),
        ("+1.8", "Q11573", "1.8 metres"),
        ("+1", "Q11573", "1 metre"),
        ("+891.85", "Q712226", "891.85 square kilometres"),
        ("+12.5", "Q11229", "12.5%"),
        ("-3", "Q25267", "-3 °C"),
        ("+3", "Q1234", "3 furlongs"),  # unit outside the table: its label
        ("+1234567.25", "http://www.wikidata.org/entity/Q4916", "1,234,567.25 euros"),
    ],
)
def test_quantity_with_units(amount, unit, text):
    assert r({"type": "quantity", "amount": amount, "unit": unit}) == text


def test_quantity_unit_without_label_is_unrenderable():
    with pytest.raises(Unrenderable) as err:
        r({"type": "quantity", "amount": "+3", "unit": "Q777"})
    assert err.value.reason == "unit_unlabelled"
    assert ids_needed({"type": "quantity", "amount": "+3", "unit": "Q777"}) == ["Q777"]
    assert ids_needed({"type": "quantity", "amount": "+3", "unit": "Q11573"}) == []  # table unit


def test_format_number_keeps_stated_decimals():
    assert format_number("+1.80") == "1.80" and format_number("-1000") == "-1,000"


@pytest.mark.parametrize("t", ["string", "external-id", "url"])
def test_plain_string_types(t):
    assert r({"type": t, "value": " abc "}) == "abc"
    with pytest.raises(Unrenderable, match="empty_value"):
        r({"type": t, "value": ""})


def test_monolingual_text_english_only():
    assert r({"type": "monolingualtext", "text": "Douglas Noël Adams", "language": "en"}) == "Douglas Noël Adams"
    assert r({"type": "monolingualtext", "text": "Colour", "language": "en-gb"}) == "Colour"
    with pytest.raises(Unrenderable) as err:
        r({"type": "monolingualtext", "text": "Berlin", "language": "de"})
    assert err.value.reason == "not_english"


def test_globe_coordinate():
    v = {"type": "globe-coordinate", "latitude": 52.516667, "longitude": -13.383333, "precision": 0.01}
    assert r(v) == "52.52°N, 13.38°W"
    with pytest.raises(Unrenderable, match="not_on_earth"):
        r(dict(v, globe="http://www.wikidata.org/entity/Q405"))


@pytest.mark.parametrize("kind", ["somevalue", "novalue"])
def test_unknown_and_no_value_give_no_answer(kind):
    with pytest.raises(Unrenderable) as err:
        r({"type": kind})
    assert err.value.reason == kind


def test_unknown_datatype_and_missing_value():
    with pytest.raises(Unrenderable, match="unknown_datatype"):
        r({"type": "unsupported", "datatype": "wikibase-musical-thing"})
    with pytest.raises(Unrenderable, match="no_value"):
        r(None)


def test_label_lookup_may_be_a_callable():
    assert render_value({"type": "wikibase-item", "id": "Q64"}, lambda i: {"Q64": "Berlin"}.get(i)) == "Berlin"


# ----------------------------------------------------------------------------- aliases


def q(amount, unit="1"):
    return {"type": "quantity", "amount": amount, "unit": unit}


def t(time, precision):
    return {"type": "time", "time": time, "precision": precision, "calendar": "Q1985727"}


def test_quantity_aliases_are_exact_number_forms_with_and_without_unit():
    assert r(q("+308707")) == "308,707"
    assert quantity_aliases(q("+308707"), LABELS) == ["308707"]
    # a large number: its exact renderings only, never a rounded "1.2 million"
    assert quantity_aliases(q("+1234567"), LABELS) == ["1234567"]
    assert value_aliases(q("+2500000"), LABELS) == ["2500000", "2.5 million"]
    metres = quantity_aliases(q("+8336817", "Q11573"), LABELS)
    assert metres == ["8336817 metres", "8,336,817", "8336817"]
    # stated decimals kept, and the same number without its trailing zero
    assert quantity_aliases(q("+1.80", "Q11573"), LABELS) == ["1.8 metres", "1.80", "1.8"]
    assert quantity_aliases(q("+12.5", "Q11229"), LABELS) == ["12.5 percent", "12.5"]
    assert quantity_aliases(q("-3", "Q25267"), LABELS) == ["-3°C", "-3 degrees Celsius", "-3"]
    # a unit from the label lookup: the label as given and the rendering's plural
    assert quantity_aliases(q("+3", "Q1234"), LABELS) == ["3 furlong", "3"]
    assert quantity_aliases(q("+3", "Q777"), LABELS) == []  # unrenderable: nothing to add


def test_time_aliases_by_precision():
    day = t("+1879-03-14T00:00:00Z", 11)
    assert r(day) == "14 March 1879"
    assert time_aliases(day) == ["March 14, 1879", "1879-03-14", "14th March 1879", "March 14th, 1879"]
    assert "1879" not in time_aliases(day)  # a coarser date is not the same answer
    assert r(t("+1879-03-14T00:00:00Z", 10)) == "March 1879" and time_aliases(t("+1879-03-14T00:00:00Z", 10)) == []
    assert time_aliases(t("+1879-03-00T00:00:00Z", 11)) == []  # no day: month precision
    assert r(t("+1879-00-00T00:00:00Z", 9)) == "1879" and value_aliases(t("+1879-00-00T00:00:00Z", 9), LABELS) == []
    assert time_aliases(t("-0500-00-00T00:00:00Z", 9)) == ["500 BC"]
    bce_day = time_aliases(t("-0044-03-15T00:00:00Z", 11))
    assert "March 15, 44 BCE" in bce_day and "15 March 44 BC" in bce_day
    assert not any("-03-15" in a for a in bce_day)  # no ISO form for BCE
    assert time_aliases(t("yesterday", 11)) == []


def test_item_aliases_from_a_mapping_or_a_callable():
    berlin = {"type": "wikibase-item", "id": "Q64"}
    table = {"Q64": ["Berlin, Germany", "Berlin", "", "Q64", "Berlin, Germany", "Berlin (Germany)"]}
    assert item_aliases(berlin, LABELS, table) == ["Berlin, Germany", "Berlin (Germany)"]
    assert value_aliases(berlin, LABELS, table.get) == ["Berlin, Germany", "Berlin (Germany)"]
    assert value_aliases(berlin, LABELS) == []  # no alias source
    assert value_aliases({"type": "string", "value": "abc"}, LABELS, table) == []


def test_prune_aliases_drops_forms_that_do_not_tell_old_from_new():
    new, old = prune_aliases("Madonna", ["Madonna Ciccone", "Paris", "A", "Madonna"],
                             "Paris Saint-Germain", ["PSG", "madonna ciccone"])
    # "Paris" occurs in the old answer; "Madonna Ciccone" is an alias of both; "A" is no word
    assert new == [] and old == ["PSG"]
    # an old alias that is the new answer is dropped, and does not veto the new aliases
    new, old = prune_aliases("Kai Wegner", ["Wegner", "K. Wegner"], "Franziska Giffey", ["Giffey", "kai wegner"])
    assert (new, old) == (["Wegner", "K. Wegner"], ["Giffey"])
    assert prune_aliases("Kai Wegner", ["Wegner"], "Wegner Kai")[0] == []  # whole words of the old answer


def test_normalise_form_keeps_decimals_and_drops_separators_articles_punctuation():
    assert normalise_form("The Beatles") == "beatles"
    assert normalise_form("308,707") == normalise_form("308707") == "308707"
    assert normalise_form("1.8") == "1 point 8" != normalise_form("18")
    assert normalise_form("Paris Saint-Germain") == "paris saint germain"
    assert normalise_form("Quxville.Quxville") == "quxville quxville"


