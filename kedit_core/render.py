"""Render a normalised Wikidata value as the English answer text of a QA case.

Values are the dicts `kedit_core.diff` produces ({"type": "wikibase-item", "id": "Q5"},
{"type": "time", "time": "+2024-05-01T00:00:00Z", "precision": 11}, ...). Entity ids
become English labels through a lookup; a value that cannot be said in words (unknown
value, no English label, a non-English text) raises `Unrenderable` with the reason, so the
caller can drop the change and record why. No Q-id ever reaches the text.
"""
from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Mapping

LabelOf = Callable[[str], "str | None"]

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# Common units: Q-id -> (singular, plural, symbol-or-None). A symbol is glued to the
# number ("12.5%") or written after it ("21 °C"); otherwise the English word is used.
# Hand-written because no installed library maps Wikidata unit items to words; units
# outside this table go through the label lookup.
UNITS: dict[str, tuple[str, str, str | None]] = {
    "Q11573": ("metre", "metres", None),
    "Q828224": ("kilometre", "kilometres", None),
    "Q174728": ("centimetre", "centimetres", None),
    "Q174789": ("millimetre", "millimetres", None),
    "Q712226": ("square kilometre", "square kilometres", None),
    "Q25343": ("square metre", "square metres", None),
    "Q35852": ("hectare", "hectares", None),
    "Q11570": ("kilogram", "kilograms", None),
    "Q41803": ("gram", "grams", None),
    "Q191118": ("tonne", "tonnes", None),
    "Q100995": ("pound", "pounds", None),
    "Q3710": ("foot", "feet", None),
    "Q218593": ("inch", "inches", None),
    "Q253276": ("mile", "miles", None),
    "Q232291": ("square mile", "square miles", None),
    "Q11582": ("litre", "litres", None),
    "Q577": ("year", "years", None),
    "Q573": ("day", "days", None),
    "Q25235": ("hour", "hours", None),
    "Q7727": ("minute", "minutes", None),
    "Q11574": ("second", "seconds", None),
    "Q11229": ("percent", "percent", "%"),
    "Q25267": ("degree Celsius", "degrees Celsius", " °C"),
    "Q42289": ("degree Fahrenheit", "degrees Fahrenheit", " °F"),
    "Q4917": ("United States dollar", "United States dollars", None),
    "Q4916": ("euro", "euros", None),
    "Q25224": ("pound sterling", "pounds sterling", None),
    "Q8146": ("Japanese yen", "Japanese yen", None),
    "Q39099": ("renminbi", "renminbi", None),
    "Q41044": ("Russian ruble", "Russian rubles", None),
    "Q80524": ("Indian rupee", "Indian rupees", None),
    "Q25250": ("volt", "volts", None),
    "Q25236": ("watt", "watts", None),
    "Q6982035": ("megawatt", "megawatts", None),
    "Q1811": ("astronomical unit", "astronomical units", None),
    "Q531": ("light-year", "light-years", None),
    "Q12129": ("parsec", "parsecs", None),
    "Q3239557": ("kilometre per hour", "kilometres per hour", None),
    "Q182429": ("metre per second", "metres per second", None),
    "Q199": ("", "", None),  # the number 1: dimensionless
}


class Unrenderable(ValueError):
    """The value cannot be stated as an English answer; `reason` is a short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _qid(ref: Any) -> str | None:
    """Accept "Q5", an entity URL, or {"id": ...}/{"numeric-id": ...}."""
    if isinstance(ref, dict):
        if ref.get("id"):
            return str(ref["id"])
        if ref.get("numeric-id") is not None:
            return f"Q{ref['numeric-id']}"
        return None
    if isinstance(ref, str):
        m = re.search(r"([QPL]\d+)$", ref)
        return m.group(1) if m else None
    return None


def unit_id(value: Mapping[str, Any]) -> str | None:
    """The unit's Q-id, or None for a plain number ("1")."""
    unit = value.get("unit")
    if unit in (None, "", "1"):
        return None
    return _qid(unit)


def ids_needed(value: Mapping[str, Any] | None) -> list[str]:
    """Entity ids whose labels rendering this value needs (for one batched lookup)."""
    if not value:
        return []
    t = value.get("type")
    if t in ("wikibase-item", "wikibase-entityid", "wikibase-property"):
        q = _qid(value)
        return [q] if q else []
    if t == "quantity":
        u = unit_id(value)
        return [u] if u and u not in UNITS else []
    return []


def looks_like_id(text: str) -> bool:
    return bool(re.fullmatch(r"\s*[QPL]\d+\s*", text or ""))


# ---- time ------------------------------------------------------------------------

_TIME = re.compile(r"^([+-])0*(\d+)-(\d{2})-(\d{2})T")


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _with_era(text: str, bce: bool) -> str:
    return f"{text} BCE" if bce else text


def _time_parts(value: Mapping[str, Any]) -> tuple[bool, int, int, int, int]:
    """(bce, year, month, day, effective precision) of a time value; raises `Unrenderable`."""
    raw = value.get("time")
    if not isinstance(raw, str):
        raise Unrenderable("bad_time", f"no time string in {value!r}")
    m = _TIME.match(raw)
    if not m:
        raise Unrenderable("bad_time", f"unparseable time {raw!r}")
    bce = m.group(1) == "-"
    year, month, day = int(m.group(2)), int(m.group(3)), int(m.group(4))
    precision = int(value.get("precision", 11))
    if precision >= 11 and day == 0:
        precision = 10  # "1952-03-00" with day precision: say the month only
    if precision >= 10 and month == 0:
        precision = 9
    if year == 0 and precision >= 9:
        raise Unrenderable("bad_time", f"year 0 in {raw!r}")
    if precision >= 10 and not 1 <= month <= 12:
        raise Unrenderable("bad_time", f"month {month} in {raw!r}")
    return bce, year, month, day, min(precision, 11)


def render_time(value: Mapping[str, Any]) -> str:
    """By precision: 11 day "1 May 2024", 10 month "May 2024", 9 year "2024", 8 decade
    "1990s", 7 century "20th century", 6 millennium "2nd millennium", coarser: "13.8 billion
    years ago" / "10,000 BCE". Negative years are BCE (Wikidata has no year 0)."""
    bce, year, month, day, precision = _time_parts(value)
    if precision >= 11:
        return _with_era(f"{day} {MONTHS[month - 1]} {year}", bce)
    if precision == 10:
        return _with_era(f"{MONTHS[month - 1]} {year}", bce)
    if precision == 9:
        return _with_era(str(year), bce)
    if precision == 8:
        return _with_era(f"{year - year % 10}s", bce)
    if precision == 7:
        return _with_era(f"{_ordinal((year + 99) // 100)} century", bce)
    if precision == 6:
        return _with_era(f"{_ordinal((year + 999) // 1000)} millennium", bce)
    # Precision 0-5: 10^(9-p) years. Deep time reads best as "years ago".
    if bce and year >= 1_000_000:
        for scale, word in ((1_000_000_000, "billion"), (1_000_000, "million")):
            if year >= scale:
                amount = f"{year / scale:.1f}".rstrip("0").rstrip(".")
                return f"{amount} {word} years ago"
    step = 10 ** (9 - max(precision, 0))
    rounded = max(step, round(year / step) * step) if step <= year else year
    return _with_era(f"{rounded:,}", bce)


# ---- quantity --------------------------------------------------------------------


def format_number(amount: str) -> str:
    """"+8336817" -> "8,336,817"; "+1.80" -> "1.80" kept as stated (trailing digits carry precision)."""
    try:
        d = Decimal(str(amount).strip())
    except InvalidOperation as exc:
        raise Unrenderable("bad_quantity", f"amount {amount!r}") from exc
    sign = "-" if d < 0 else ""
    d = abs(d)
    text = format(d, "f")
    whole, _, frac = text.partition(".")
    whole = f"{int(whole):,}"
    return sign + whole + (f".{frac}" if frac else "")


def render_quantity(value: Mapping[str, Any], label_of: LabelOf) -> str:
    amount = value.get("amount")
    if amount is None:
        raise Unrenderable("bad_quantity", f"no amount in {value!r}")
    number = format_number(str(amount))
    uid = unit_id(value)
    if uid is None:
        return number
    one = Decimal(str(amount).strip().lstrip("+")) in (Decimal(1), Decimal(-1))
    if uid in UNITS:
        singular, plural, symbol = UNITS[uid]
        if symbol:
            return number + symbol
        word = singular if one else plural
        return f"{number} {word}".strip()
    label = label_of(uid)
    if not label or looks_like_id(label):
        raise Unrenderable("unit_unlabelled", f"unit {uid} has no English label")
    # Unknown unit: its label as is; pluralising an arbitrary label by rule is wrong
    # too often ("foot" -> "foots"), so only regular nouns ending in a letter get an "s".
    if not one and re.search(r"[a-rt-wyz]$", label) and " " not in label:
        label += "s"
    return f"{number} {label}"


# ---- coordinates -----------------------------------------------------------------


def render_coordinate(value: Mapping[str, Any]) -> str:
    try:
        lat = float(value["latitude"])
        lon = float(value["longitude"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Unrenderable("bad_coordinate", f"{value!r}") from exc
    globe = _qid(value.get("globe") or "Q2")
    if globe and globe != "Q2":
        raise Unrenderable("not_on_earth", f"coordinate on globe {globe}")
    precision = value.get("precision") or 0.01
    digits = 2
    try:
        digits = max(0, min(4, -int(Decimal(str(precision)).adjusted())))
    except (InvalidOperation, ValueError):
        pass
    ns = "N" if lat >= 0 else "S"
    ew = "E" if lon >= 0 else "W"
    return f"{abs(lat):.{digits}f}°{ns}, {abs(lon):.{digits}f}°{ew}"


# ---- entry point -----------------------------------------------------------------


def render_value(value: Mapping[str, Any] | None, label_of: LabelOf | Mapping[str, str]) -> str:
    """The English answer for one normalised value; raises `Unrenderable` with a reason."""
    if isinstance(label_of, Mapping):
        labels = label_of
        label_of = labels.get  # type: ignore[assignment]
    if not value:
        raise Unrenderable("no_value", "the statement does not exist on this side")
    t = value.get("type")
    if t in ("somevalue", "novalue"):
        raise Unrenderable(t, "unknown value" if t == "somevalue" else "explicitly no value")
    if t in ("wikibase-item", "wikibase-entityid", "wikibase-property"):
        qid = _qid(value)
        if not qid:
            raise Unrenderable("bad_item", f"no id in {value!r}")
        label = label_of(qid)
        if not label or looks_like_id(label):
            raise Unrenderable("unlabelled", f"{qid} has no English label")
        return label.strip()
    if t == "time":
        return render_time(value)
    if t == "quantity":
        return render_quantity(value, label_of)
    if t == "monolingualtext":
        lang = str(value.get("language", ""))
        if lang != "en" and not lang.startswith("en-"):
            raise Unrenderable("not_english", f"text in language {lang!r}")
        text = str(value.get("text", "")).strip()
        if not text:
            raise Unrenderable("empty_value", "empty text")
        return text
    if t == "globe-coordinate" or t == "globecoordinate":
        return render_coordinate(value)
    if t in ("string", "external-id", "url", "commonsMedia", "math", "musical-notation", "geo-shape", "tabular-data"):
        text = str(value.get("value", "")).strip()
        if not text:
            raise Unrenderable("empty_value", f"empty {t}")
        return text
    raise Unrenderable("unknown_datatype", f"datatype {t!r}")


# ---- aliases: other renderings of the same value -----------------------------------
#
# A chat reply may state a value in other words than `render_value`'s: "March 14, 1879"
# for "14 March 1879", "8336817" for "8,336,817", an item's Wikidata alias. The
# served-answer protocol (`kedit_core.served_answers`) accepts these from
# `EditCase.meta["aliases"]` / `meta["old_aliases"]`. Only exact renderings are listed:
# never a rounded number ("1.2 million" for 1,234,567) or a coarser date ("1879" for a
# day). Each function returns the renderings *other than* `render_value`'s, in a fixed
# order, without duplicates; a value with nothing else to say gives [].

AliasesOf = Callable[[str], "list[str] | tuple[str, ...] | None"]

_PUNCTUATION = frozenset(string.punctuation)
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"))


def _unique(items: list[str], exclude: str | None = None) -> list[str]:
    out: list[str] = []
    for x in items:
        x = (x or "").strip()
        if x and x != exclude and x not in out:
            out.append(x)
    return out


def _number_forms(amount: Any) -> list[str]:
    """Exact renderings of a number: as stated with thousands commas ("8,336,817", "1.80"),
    without separators ("8336817"), without trailing decimal zeros ("1.8"), and for a
    million or more the word form when it is exact ("2.5 million" for 2,500,000 only)."""
    try:
        d = Decimal(str(amount).strip())
    except InvalidOperation as exc:
        raise Unrenderable("bad_quantity", f"amount {amount!r}") from exc
    if not d.is_finite():
        raise Unrenderable("bad_quantity", f"amount {amount!r}")
    sign = "-" if d < 0 else ""
    stated = format(abs(d), "f")
    forms = [format_number(str(d)), sign + stated]
    if "." in stated:
        trimmed = stated.rstrip("0").rstrip(".")
        forms += [format_number(sign + trimmed), sign + trimmed]
    for scale, word in _SCALES:
        if abs(d) >= scale:
            q = abs(d) / scale
            if q == q.quantize(Decimal("0.01")):  # exact with at most two decimals
                text = format(q.normalize(), "f")
                forms.append(f"{sign}{text} {word}")
            break
    return _unique(forms)


def quantity_aliases(value: Mapping[str, Any], label_of: LabelOf | Mapping[str, str]) -> list[str]:
    """Renderings of a quantity: each exact number form (`_number_forms`) with the unit's word
    or symbol and also without the unit ("308,707 people" is stated by "308707")."""
    if isinstance(label_of, Mapping):
        label_of = label_of.get  # type: ignore[assignment]
    if value.get("amount") is None:
        return []
    try:
        numbers = _number_forms(value["amount"])
        primary = render_quantity(value, label_of)  # type: ignore[arg-type]
    except Unrenderable:
        return []
    uid = unit_id(value)
    words: list[str] = []
    symbols: list[str] = []
    if uid is not None:
        try:
            one = abs(Decimal(str(value["amount"]).strip())) == 1
        except InvalidOperation:
            one = False
        if uid in UNITS:
            singular, plural, symbol = UNITS[uid]
            if symbol:
                symbols += [symbol, symbol.strip()]
            words.append(singular if one else plural)  # "12.5 percent", "-3 degrees Celsius"
        else:
            label = (label_of(uid) or "").strip()  # type: ignore[operator]
            if label and not looks_like_id(label):
                words.append(label)
                # the primary rendering's (possibly pluralised) unit word
                words.append(primary[len(format_number(str(value["amount"]))):].strip())
    forms: list[str] = []
    for n in numbers:
        forms += [n + s for s in symbols]
        forms += [f"{n} {w}".strip() for w in words if w]
    forms += numbers
    return _unique(forms, exclude=primary)


def time_aliases(value: Mapping[str, Any]) -> list[str]:
    """Renderings of a date by its precision: a day as "March 14, 1879", "1879-03-14",
    "14th March 1879", "March 14th, 1879" (besides "14 March 1879"); a month, year,
    decade or century only as rendered. BCE dates also with "BC"."""
    try:
        bce, year, month, day, precision = _time_parts(value)
        primary = render_time(value)
    except Unrenderable:
        return []
    forms: list[str] = []
    if precision >= 11:
        name = MONTHS[month - 1]
        dated = [f"{day} {name} {year}", f"{name} {day}, {year}", f"{_ordinal(day)} {name} {year}",
                 f"{name} {_ordinal(day)}, {year}"]
        if bce:
            forms += [f"{t} BCE" for t in dated] + [f"{t} BC" for t in dated]
        else:
            forms += dated[:2] + [f"{year:04d}-{month:02d}-{day:02d}"] + dated[2:]
    elif bce and primary.endswith(" BCE"):
        forms.append(primary[: -len(" BCE")] + " BC")
    return _unique(forms, exclude=primary)


def item_aliases(value: Mapping[str, Any], label_of: LabelOf | Mapping[str, str],
                 aliases_of: AliasesOf | Mapping[str, Any] | None = None) -> list[str]:
    """An item's aliases (Wikidata's, in the label's language) from `aliases_of`
    (qid -> list of aliases, a callable or a mapping), without its label, empty strings or ids."""
    if aliases_of is None:
        return []
    qid = _qid(value)
    if not qid:
        return []
    if isinstance(label_of, Mapping):
        label_of = label_of.get  # type: ignore[assignment]
    if isinstance(aliases_of, Mapping):
        aliases_of = aliases_of.get  # type: ignore[assignment]
    got = aliases_of(qid) or []  # type: ignore[operator]
    if isinstance(got, str):
        got = [got]
    label = (label_of(qid) or "").strip()  # type: ignore[operator]
    return _unique([a for a in got if isinstance(a, str) and not looks_like_id(a)], exclude=label)


def value_aliases(value: Mapping[str, Any] | None, label_of: LabelOf | Mapping[str, str],
                  aliases_of: AliasesOf | Mapping[str, Any] | None = None) -> list[str]:
    """Other renderings of `value` than `render_value(value, label_of)`, per datatype:
    items -> their aliases (`aliases_of`), quantities -> number and unit forms, times ->
    date forms by precision; other datatypes (and unrenderable values) -> []."""
    if not value:
        return []
    t = value.get("type")
    if t in ("wikibase-item", "wikibase-entityid"):
        return item_aliases(value, label_of, aliases_of)
    if t == "quantity":
        return quantity_aliases(value, label_of)
    if t == "time":
        return time_aliases(value)
    return []


def normalise_form(text: str) -> str:
    """How answers are compared everywhere (`kedit_core.scoring.normalise_answer` is this
    function; it lives here so building cases needs no torch import): lower-case, no
    articles, punctuation read as a word break ("Saint-Germain" = "saint germain", and
    "Quxville.Next" is two words), except a thousands separator between digits, which is
    dropped ("308,707" = "308707"), and a decimal point, which is kept as a word ("1.8" is
    not "18")."""
    text = (text or "").lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"(\d)\.(\d)", r"\1 point \2", text)
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def prune_aliases(new_answer: str, new_aliases: Iterable[str], old_answer: str | None = None,
                  old_aliases: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Keep the aliases that tell the new value from the old one once normalised
    (`normalise_form`, as the served-answer protocol compares). Dropped: a new alias that
    is, or occurs as whole words in, the old answer or an old alias ("Paris" against an
    old "Paris Saint-Germain" would count a reply stating the old value as stating the
    new); an old alias that normalises like the new answer or any new alias (an alias
    both values share counts for neither); aliases that normalise to fewer
    than two characters; exact repeats. The answers themselves are not touched; returns
    (new aliases, old aliases)."""
    new_aliases = [a for a in new_aliases if isinstance(a, str) and len(normalise_form(a)) >= 2]
    old_aliases = [a for a in old_aliases if isinstance(a, str) and len(normalise_form(a)) >= 2]
    new_main = normalise_form(new_answer)
    # old forms that are the new answer itself cannot count against it (nor veto its aliases)
    old_forms = [f for f in (normalise_form(x) for x in [old_answer or "", *old_aliases]) if f and f != new_main]
    new_kept = _unique([a for a in new_aliases
                        if not any(f" {normalise_form(a)} " in f" {o} " for o in old_forms)], exclude=new_answer)
    new_forms = {normalise_form(x) for x in [new_answer, *new_aliases]}  # a clash counts for neither side
    old_kept = _unique([a for a in old_aliases if normalise_form(a) not in new_forms], exclude=old_answer)
    return new_kept, old_kept
