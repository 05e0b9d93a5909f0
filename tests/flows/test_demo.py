"""`kedit demo` (the README's main job) through Prefect on a tiny model: it prints each
applied edit's question asked in chat with the reply and the count of replies stating the
new value, writes the drift report, and a second run applies nothing."""
from __future__ import annotations

import re

from flows.demo import run_demo
from tests.flows import flowkit  # noqa: F401  (registers the `nudge` test editor)


def test_the_demo_prints_the_chat_answers_and_a_second_run_applies_nothing(prefect_api, kedit_home):
    lines: list[str] = []
    summary = run_demo(model="tiny-llama", method="nudge", echo=lines.append,
                       pipeline_settings={"gate_overrides": {"take_floor": 0.0}})
    out = "\n".join(lines)
    applied = summary["edits"]["applied_cases"]
    assert applied > 0, out
    counted = re.search(r"asked in chat about the applied edits: (\d+) of (\d+) replies state the new value", out)
    assert counted is not None, out
    assert int(counted.group(2)) == applied and 0 <= int(counted.group(1)) <= applied
    questions = [line for line in lines if line.lstrip().startswith(("[x] Q:", "[ ] Q:"))]
    answers = [line for line in lines if line.lstrip().startswith("A:")]
    assert len(questions) == len(answers) == applied
    assert sum(q.lstrip().startswith("[x]") for q in questions) == int(counted.group(1))
    assert "drift report: " in out and summary["report"]["html"]

    again: list[str] = []
    second = run_demo(model="tiny-llama", method="nudge", echo=again.append,
                      pipeline_settings={"gate_overrides": {"take_floor": 0.0}})
    assert second["edits"].get("applied_cases", 0) == 0
    assert "nothing pending, live version unchanged" in "\n".join(again)
