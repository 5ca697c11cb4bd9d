"""The skips CI accepts: every skipped test must be one ``tests/known_skips.txt`` lists, with its reason.

A skip hides whatever the test was about, so CI (``.ci/run``, after ``make test``) reads pytest's JUnit XML
and fails on any skip that is not a known one: a missing package, a missing browser or a server that did not
start is breakage, not a skip. The known ones are machine kinds CI does not have (a GPU with TensorRT, a BF16
CPU on an AVX2 machine) and services it cannot reach; each entry says where the skipped promise is checked
instead. ::

    python -m tests.skips build/test-results.xml        # exit 1 and the unknown skips, or 0
"""

from __future__ import annotations

import fnmatch
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOWN = Path(__file__).with_name("known_skips.txt")


@dataclass(frozen=True)
class Skip:
    test: str  # pytest's node id: tests/test_x.py::test_name[param]
    reason: str


@dataclass(frozen=True)
class KnownSkip:
    """A line of ``tests/known_skips.txt``: ``<node id glob> | <reason regex> | <what checks the promise
    instead>``."""

    test: str
    reason: re.Pattern[str]
    covered_by: str

    def matches(self, skip: Skip) -> bool:
        return fnmatch.fnmatchcase(skip.test, self.test) and self.reason.search(skip.reason) is not None


def read_known(path: Path = KNOWN) -> list[KnownSkip]:
    known = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split(" | ")]
        if len(fields) != 3 or not all(fields):
            raise ValueError(f"{path}:{number}: expected '<test id glob> | <reason regex> | <covered by>'")
        known.append(KnownSkip(fields[0], re.compile(fields[1]), fields[2]))
    return known


def node_id(classname: str, name: str, root: Path = ROOT) -> str:
    """The node id of a JUnit test case (``tests.test_x.TestY`` + ``test_z`` → ``tests/test_x.py::TestY::
    test_z``); a module skipped whole is ``classname ""``, ``name "tests.test_x"``."""
    parts = [p for p in classname.split(".") if p] or name.split(".")
    rest = [name] if classname else []
    for i in range(len(parts), 0, -1):
        module = "/".join(parts[:i]) + ".py"
        if (root / module).is_file():
            return "::".join([module, *parts[i:], *rest])
    return "::".join([".".join(parts), *rest])


def skipped_tests(junit_xml: Path, root: Path = ROOT) -> list[Skip]:
    skips = []
    for case in ET.parse(junit_xml).iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            reason = f"{skipped.get('message', '')} {skipped.text or ''}"
            skips.append(Skip(node_id(case.get("classname", ""), case.get("name", ""), root), reason))
    return skips


def unknown_skips(skips: Sequence[Skip], known: Sequence[KnownSkip]) -> list[Skip]:
    return [skip for skip in skips if not any(entry.matches(skip) for entry in known)]


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m tests.skips <pytest JUnit XML>", file=sys.stderr)
        return 2
    skips = skipped_tests(Path(args[0]))
    unknown = unknown_skips(skips, read_known())
    print(f"{len(skips)} tests skipped, {len(skips) - len(unknown)} of them known (tests/known_skips.txt)")
    for skip in unknown:
        print(f"UNKNOWN SKIP {skip.test}: {' '.join(skip.reason.split())[:300]}", file=sys.stderr)
    if unknown:
        print(
            f"{len(unknown)} skips are not in tests/known_skips.txt: make them run, or list them there with "
            "their reason and what checks the same promise instead",
            file=sys.stderr,
        )
    return 1 if unknown else 0


if __name__ == "__main__":
    sys.exit(main())
