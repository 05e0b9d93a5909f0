"""`kedit cases OLD.json NEW.json`: the edit cases (questions, answers, probes) that the
diff between two revisions of one item produces, and every dropped change with its reason."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer


def _load_json(path: Path) -> Any:
    from kedit_core.errors import KeditError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeditError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise KeditError(f"{path} is not valid JSON: {exc}") from exc


def _present_items(obj: Any) -> set[str]:
    if isinstance(obj, dict) and isinstance(obj.get("entities"), dict):
        return {k for k, e in obj["entities"].items() if isinstance(e, dict) and "missing" not in e}
    if isinstance(obj, dict) and obj.get("id"):
        return {str(obj["id"])}
    return set()


def pick_entity_id(old: Any, new: Any, wanted: str | None) -> str | None:
    """The item both files describe: given, or the one item id they share (a
    `wbgetentities` answer may hold several entities, e.g. Q42 and P31)."""
    from kedit_core.errors import KeditError

    if wanted:
        return wanted
    shared = sorted(i for i in _present_items(old) & _present_items(new) if i.startswith("Q"))
    if len(shared) == 1:
        return shared[0]
    if not shared and (_present_items(old) or _present_items(new)):
        ids = sorted((_present_items(old) | _present_items(new)))
        items = [i for i in ids if i.startswith("Q")]
        if len(items) == 1:
            return items[0]
    if len(shared) > 1:
        raise KeditError(f"both files hold several items {shared}; name one with --entity")
    return None


class _ChainedLabels:
    """Ask each lookup in turn for the ids still missing (entity files, a labels file,
    then the DuckDB cache / API)."""

    def __init__(self, *lookups: Any):
        self.lookups = [lk for lk in lookups if lk is not None]

    def __call__(self, ids: list[str]) -> dict[str, str]:
        return self._chain(ids, self.lookups)

    def aliases(self, ids: list[str]) -> dict[str, list[str]]:
        """Item aliases from the lookups that know them (`kedit_core.qa.AliasLookup`)."""
        return self._chain(ids, [lk.aliases for lk in self.lookups if callable(getattr(lk, "aliases", None))])

    @staticmethod
    def _chain(ids: list[str], lookups: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lookup in lookups:
            missing = [i for i in ids if i not in out]
            if not missing:
                break
            out.update(lookup(missing) or {})
        return out


def build_report(old_path: Path, new_path: Path, entity: str | None, labels_file: Path | None,
                 offline: bool, extra: list[Path]) -> Any:
    from flows.commands.diff_cmd import check_same_entity, parse_file_entity
    from kedit_core.diff import diff_entities, parse_entity
    from kedit_core.labels import StaticLabels
    from kedit_core.qa import SubjectFacts, build_cases

    old_obj, new_obj = _load_json(old_path), _load_json(new_path)
    eid = pick_entity_id(old_obj, new_obj, entity)
    # An item named with --entity must be in both files; one inferred is looked up where present.
    old_e = parse_file_entity(old_obj, entity or (eid if eid in _present_items(old_obj) else None), old_path)
    new_e = parse_file_entity(new_obj, entity or (eid if eid in _present_items(new_obj) else None), new_path)
    check_same_entity(old_e, new_e, old_path, new_path)
    changes = diff_entities(old_e, new_e, subject=eid)

    facts = SubjectFacts()
    if new_e is not None:
        facts.add_entity(new_e)
    for p in extra:
        obj = _load_json(p)
        for other in sorted(_present_items(obj)) or [None]:
            facts.add_entity(parse_entity(obj, other))
    static: dict[str, str] = {}
    if labels_file is not None:
        raw = _load_json(labels_file)
        static = dict(raw.get("labels", raw)) if isinstance(raw, dict) else {}
        static = {k: v for k, v in static.items() if isinstance(v, str) and not k.startswith("_")}
    cached = None
    if not offline:
        from flows.services.labels import CachedLabelLookup
        from flows.services.settings import PipelineSettings
        from storage.db import open_if_exists

        client = PipelineSettings.from_env().wikidata_client()
        # an inspection: the ledger's label cache is read where there is one, never created or written
        cached = CachedLabelLookup(client, open_if_exists())
    labels = _ChainedLabels(StaticLabels(static) if static else None, cached)
    return changes, build_cases(changes, labels, facts)


def register(app: typer.Typer) -> None:
    @app.command("cases")
    def cases(
        old: Path = typer.Argument(..., help="Entity JSON at the older revision (wbgetentities or EntityData shape)."),
        new: Path = typer.Argument(..., help="Entity JSON at the newer revision."),
        as_json: bool = typer.Option(False, "--json", help="Print cases and dropped changes as JSON."),
        entity: Optional[str] = typer.Option(None, "--entity", help="Item id when a file holds several entities."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="JSON {id: label} used before the cache/API."),
        offline: bool = typer.Option(False, "--offline", help="No API calls: labels from the files and --labels only."),
        with_entity: List[Path] = typer.Option([], "--with", help="More entity JSONs (locality of other subjects, multi-hop)."),
    ) -> None:
        """Show the edit cases a diff between two revisions produces."""
        changes, report = build_report(old, new, entity, labels, offline, list(with_entity))
        if as_json:
            out = report.to_dict()
            out["changes"] = len(changes)
            typer.echo(json.dumps(out, ensure_ascii=False, indent=1))
            return
        typer.echo(f"{len(changes)} fact changes -> {len(report.cases)} edit cases "
                   f"({report.specific_template} specific template, {report.fallback_template} fallback), "
                   f"{len(report.dropped)} dropped")
        for c in report.cases:
            old_txt = f" (was: {c.target_old})" if c.target_old else ""
            typer.echo(f"\n[{c.relation} {c.meta.get('relation_label', '')}, {c.meta.get('kind')}] "
                       f"{c.prompt} -> {c.target_new}{old_txt}")
            typer.echo(f"  question: {c.question}")
            for p in c.probes:
                extra = f" [{p.meta['polarity']}]" if "polarity" in p.meta else ""
                typer.echo(f"  {p.kind:>15}: {p.prompt} -> {p.answer or '(unchanged)'}{extra}")
        if report.dropped:
            typer.echo("\ndropped:")
            for d in report.dropped:
                typer.echo(f"  {d.property} {d.kind}: {d.reason}" + (f" ({d.detail})" if d.detail else ""))
