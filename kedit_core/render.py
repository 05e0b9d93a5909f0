"""Render a normalised Wikidata value as the English answer text of a QA case.

Values are the dicts `kedit_core.diff` produces ({"type": "wikibase-item", "id": "Q5"},
{"type": "time", "time": "+2024-05-01T00:00:00Z", "precision": 11}, ...). Entity ids
become English labels through a lookup; a value that cannot be said in words (unknown
value, no English label, a non-English text) raises `Unrenderable` with the reason, so the
caller can drop the change and record why. No Q-id ever reaches the text.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping

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


def render_time(value: Mapping[str, Any]) -> str:
    """By precision: 11 day "1 May 2024", 10 month "May 2024", 9 year "2024", 8 decade
    "1990s", 7 century "20th century", 6 millennium "2nd millennium", coarser: "13.8 billion
    years ago" / "10,000 BCE". Negative years are BCE (Wikidata has no year 0)."""
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
    if precision >= 11:
        if not 1 <= month <= 12:
            raise Unrenderable("bad_time", f"month {month} in {raw!r}")
        return _with_era(f"{day} {MONTHS[month - 1]} {year}", bce)
    if precision == 10:
        if not 1 <= month <= 12:
            raise Unrenderable("bad_time", f"month {month} in {raw!r}")
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
