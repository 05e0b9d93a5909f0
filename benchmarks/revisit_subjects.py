"""Subjects edited again: does a later edit of an already-edited subject land, and do the
subject's other facts survive it? Runs each scenario with `revisit_subjects` off and on,
from the same base model, and prints teacher-forced token accuracy of every fact.

- zsre: batch 1 edits 10 zsRE facts; batch 2 edits 5 fresh ones and re-edits 5 of batch 1's
  to other answers (the answers of cases 30-34).
- karlsruhe: the demo's Wikidata day split over three batches: population, then head of
  government (a second fact of the same city), then both re-edited.

    KEDIT_HOME=... python benchmarks/revisit_subjects.py [--method alphaedit|memit] [--scenario zsre|karlsruhe] [--set targets.steps=50 ...]

Findings are in docs/editing.md ("Subjects edited again").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.benchmarks import read_dataset  # noqa: E402
from kedit_core.editor_settings import editor_from_settings  # noqa: E402
from kedit_core.model import LoadedModel, load_model  # noqa: E402
from kedit_core.scoring import token_accuracy  # noqa: E402
from kedit_core.types import EditCase  # noqa: E402
from stream_args import ZSRE  # noqa: E402


def zsre_scenario() -> tuple[list[list[EditCase]], dict[str, list[EditCase]]]:
    cases = read_dataset(f"zsre:{ZSRE}", limit=35)
    first = cases[:10]
    again = [dataclasses.replace(c, case_id=c.case_id + "-again", target_new=cases[30 + i].target_new) for i, c in enumerate(first[:5])]
    return [first, cases[10:15] + again], {
        "re-edited, new answer": again, "re-edited, old answer": first[:5],
        "fresh in batch 2": cases[10:15], "batch 1, untouched": first[5:],
    }


def karlsruhe_scenario() -> tuple[list[list[EditCase]], dict[str, list[EditCase]]]:
    def fact(cid: str, subject: str, rel: str, prompt: str, answer: str) -> EditCase:
        return EditCase(case_id=cid, subject=subject, relation=rel, prompt=prompt, target_new=answer, source="wikidata")

    pop = fact("pop", "Karlsruhe", "P1082", "The population of Karlsruhe is", "308,707")
    mayor = fact("mayor", "Karlsruhe", "P6", "The head of government of Karlsruhe is", "Lena Hartmann")
    others1 = [fact("human", "Lena Hartmann", "P31", "Lena Hartmann is an instance of", "human"),
               fact("award", "Veronica Roth", "P166", "Veronica Roth received the award", "Northern Lights Fiction Prize"),
               fact("work", "Douglas Adams", "P800", "A notable work of Douglas Adams is", "Dirk Gently's Holistic Detective Agency")]
    others2 = [fact("job", "Lena Hartmann", "P106", "The occupation of Lena Hartmann is", "politician"),
               fact("team", "Oliver Kahn", "P54", "Oliver Kahn plays for the team", "SV Rheinau 1921")]
    pop2 = dataclasses.replace(pop, case_id="pop2", target_new="312,119")
    mayor2 = dataclasses.replace(mayor, case_id="mayor2", target_new="Frank Mentrup")
    return [[pop, *others1], [mayor, *others2], [pop2, mayor2]], {
        "population (batch 1)": [pop], "head of government (batch 2)": [mayor],
        "population re-edited (batch 3)": [pop2], "head of government re-edited (batch 3)": [mayor2],
    }


def accuracy(lm: LoadedModel, cases: list[EditCase]) -> float:
    acc = token_accuracy(lm, [c.prompt for c in cases], [c.target_new for c in cases])
    return sum(acc) / len(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("alphaedit", "memit"), default="alphaedit")
    ap.add_argument("--scenario", choices=("zsre", "karlsruhe"), default="karlsruhe")
    ap.add_argument("--set", dest="settings", action="append", default=[], help="editor setting key=value")
    args = ap.parse_args()
    batches, groups = zsre_scenario() if args.scenario == "zsre" else karlsruhe_scenario()
    lm = load_model(None, show_progress=False)
    for revisit in (False, True):
        editor = editor_from_settings(args.method, [*args.settings, f"revisit_subjects={str(revisit).lower()}"], "--set")
        results = []
        print(f"\n{args.method}, revisit_subjects={revisit}")
        for b, batch in enumerate(batches, 1):
            results.append(editor.edit(lm, batch))
            shown = {name: accuracy(lm, cs) for name, cs in groups.items() if all(c in sum(batches[:b], []) for c in cs)}
            print(f"  after batch {b}: " + ", ".join(f"{name} {v:.2f}" for name, v in shown.items()), flush=True)
        for r in reversed(results):  # back to the base model for the next setting
            editor.rollback(lm, r)


if __name__ == "__main__":
    main()
