"""`kedit diff OLD.json NEW.json [--json]`: the fact changes between two entity files
(`wbgetentities` / Special:EntityData answers, or bare entity JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer


def _load(path: Path) -> Any:
    from kedit_core.diff import EntityFormatError

    if not path.exists():
        raise EntityFormatError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EntityFormatError(f"{path} is not valid JSON: {exc}") from exc


def _present_ids(obj: Any) -> list[str]:
    if isinstance(obj, dict) and isinstance(obj.get("entities"), dict):
        return [k for k, e in obj["entities"].items() if "missing" not in e]
    return [obj.get("id")] if isinstance(obj, dict) and obj.get("id") else []


def pick_entity_id(old: Any, new: Any, wanted: str | None) -> str | None:
    """Which entity to compare when an answer holds several (e.g. Q6, Q42 and P31)."""
    from kedit_core.diff import EntityFormatError

    if wanted:
        return wanted
    new_ids, old_ids = _present_ids(new), _present_ids(old)
    if len(new_ids) <= 1 and len(old_ids) <= 1:
        return None
    common = [i for i in new_ids if i in old_ids]
    if len(common) == 1:
        return common[0]
    raise EntityFormatError(f"the files hold several entities ({sorted(set(new_ids) | set(old_ids))}); pick one with --entity")


def parse_file_entity(raw: Any, entity_id: str | None, path: Path) -> Any:
    """`parse_entity` of one file's JSON; an error names the file."""
    from kedit_core.diff import EntityFormatError, parse_entity

    try:
        return parse_entity(raw, entity_id)
    except EntityFormatError as exc:
        raise EntityFormatError(f"{path}: {exc}") from exc


def check_same_entity(old_e: Any, new_e: Any, old_path: Path, new_path: Path) -> None:
    """Refuse two files that describe different entities: their diff would be every fact of
    both (Q42 against Q131261 gave 81 "changes" and a case giving Oliver Kahn Douglas Adams'
    birth date)."""
    from kedit_core.diff import EntityFormatError

    a, b = (old_e or {}).get("id"), (new_e or {}).get("id")
    if a and b and a != b:
        raise EntityFormatError(f"{old_path} describes {a} but {new_path} describes {b}: give two revisions of "
                                "the same item (when a file holds several entities, name one with --entity)")


def render_value(v: dict[str, Any] | None) -> str:
    if v is None:
        return "-"
    t = v.get("type")
    if "id" in v:
        return str(v["id"])
    if t == "time":
        cut = {11: 11, 10: 8, 9: 5}.get(int(v["precision"]), 5)
        return v["time"][:cut].rstrip("-T")
    if t == "quantity":
        return v["amount"] + ("" if v.get("unit") in ("1", None) else f" {v['unit']}")
    if t == "monolingualtext":
        return f"{v['text']!r}@{v['language']}"
    if t == "globe-coordinate":
        return f"{v['latitude']},{v['longitude']}"
    if t in ("somevalue", "novalue"):
        return {"somevalue": "(unknown value)", "novalue": "(no value)"}[t]
    if t == "unsupported":
        return f"(unsupported {v.get('datatype')})"
    return repr(v.get("value"))


def register(app: typer.Typer) -> None:
    @app.command("diff")
    def diff(
        old: Path = typer.Argument(..., help="Entity JSON at the older revision."),
        new: Path = typer.Argument(..., help="Entity JSON at the newer revision."),
        entity: Optional[str] = typer.Option(None, "--entity", "-e", help="Entity id when a file holds several."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list of changes."),
    ) -> None:
        """Fact changes between two revisions of one Wikidata item."""
        from kedit_core.diff import diff_entities

        old_raw, new_raw = _load(old), _load(new)
        eid = pick_entity_id(old_raw, new_raw, entity)
        old_e, new_e = parse_file_entity(old_raw, eid, old), parse_file_entity(new_raw, eid, new)
        check_same_entity(old_e, new_e, old, new)
        changes = diff_entities(old_e, new_e, revid=int((new_e or {}).get("lastrevid") or 0),
                                timestamp=str((new_e or {}).get("modified") or ""),
                                old_revid=(old_e or {}).get("lastrevid"))
        if as_json:
            out = [{"subject": c.subject, "property": c.property, "kind": c.kind, "old": c.old_value,
                    "new": c.new_value, "datatype": c.datatype, "qualifiers": c.qualifiers} for c in changes]
            typer.echo(json.dumps(out, ensure_ascii=False, indent=1))
            return
        subject = (new_e or old_e or {}).get("id", "?")
        typer.echo(f"{subject}: {len(changes)} fact change{'s' if len(changes) != 1 else ''}")
        for c in changes:
            line = f"  {c.kind:<8} {c.property:<7} {render_value(c.old_value)} -> {render_value(c.new_value)}"
            if c.qualifiers:
                quals = ", ".join(f"{k}={render_value(v[0] if isinstance(v, list) else v)}"
                                  for k, v in c.qualifiers.items() if v)
                line += f"   [{quals}]"
            typer.echo(line)
