"""Issue 23, point 5: `kedit diff` and `kedit cases` refuse two files that describe different
entities (Q42 at one revision, Q131261 at another gave 81 "changes" and an edit case giving
Oliver Kahn Douglas Adams' birth date). Run through the real CLI entry point in a subprocess:
one line on stderr naming both files and ids, a non-zero exit, nothing on stdout."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, REPO, WIKIDATA_DAY

WD = FIXTURES / "wikidata"
ADAMS, KAHN = WD / "wbgetentities-Douglas-Adams.json", WD / "wbgetentities-Oliver-Kahn.json"


def kedit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0 and res.stdout == "", (res.returncode, res.stdout)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["diff"], ["cases", "--offline"]])
def test_two_different_items_are_refused(command):
    line = _one_line_error(kedit(*command, ADAMS, KAHN))
    assert f"{ADAMS} describes Q42 but {KAHN} describes Q131261" in line and "--entity" in line


def test_recorded_revision_bodies_of_two_items_and_a_wrong_entity_option(tmp_path):
    # Bare entities as revisions hold them (data/wikidata_day): Q42 and Q131261.
    paths = []
    for revid in (2150000101, 2150000104):
        rec = json.loads((WIKIDATA_DAY / "revisions" / f"{revid}.json").read_text(encoding="utf-8"))
        paths.append(tmp_path / f"{revid}.json")
        paths[-1].write_text(json.dumps(rec["entity"]), encoding="utf-8")
    line = _one_line_error(kedit("diff", *paths))
    assert "describes Q42 but" in line and "describes Q131261" in line
    # --entity names an item one file does not hold: that file is named.
    line = _one_line_error(kedit("diff", "--entity", "Q42", ADAMS, KAHN))
    assert f"{KAHN}: entity Q42 is not in the answer" in line
