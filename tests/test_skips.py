"""CI's skip check (``tests/skips.py``): a skip not in ``tests/known_skips.txt`` fails ``.ci/run``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import skips

DEMO = '''
import pytest

@pytest.mark.skipif(True, reason="needs a CPU with AMX-BF16 (this one: AVX2)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hint(precision):
    pass

def test_browser():
    pytest.skip("no Chromium at /usr/bin/chromium")

class TestAudit:
    def test_audit(self):
        pytest.skip("NO AUDIT RAN: the service cannot be reached")

def test_runs():
    pass
'''


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """(root, its JUnit XML): the real pytest, as ``make test`` runs it, over a demo suite with skips."""
    root = tmp_path_factory.mktemp("demo")
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "test_demo.py").write_text(DEMO)
    (root / "tests" / "test_gone.py").write_text(
        'import pytest\npytest.skip("the module needs ray", allow_module_level=True)\n'
    )
    xml = root / "results.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--junitxml", xml],
        cwd=root,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return root, xml


def test_skips_are_read_from_pytests_junit_xml_with_their_node_ids_and_reasons(demo):
    root, xml = demo
    found = {s.test: s.reason for s in skips.skipped_tests(xml, root=root)}
    assert set(found) == {
        "tests/test_demo.py::test_hint[fp32]",
        "tests/test_demo.py::test_hint[bf16]",
        "tests/test_demo.py::test_browser",
        "tests/test_demo.py::TestAudit::test_audit",
        "tests/test_gone.py",
    }
    assert "AMX-BF16" in found["tests/test_demo.py::test_hint[bf16]"]
    assert "NO AUDIT RAN" in found["tests/test_demo.py::TestAudit::test_audit"]
    assert "needs ray" in found["tests/test_gone.py"]


def test_a_skip_that_is_not_known_by_id_and_reason_fails_the_check(demo):
    root, xml = demo
    found = skips.skipped_tests(xml, root=root)
    known = [
        skips.KnownSkip("tests/test_demo.py::test_hint?bf16?", re.compile("AMX-BF16"), "the fp32 case"),
        skips.KnownSkip("tests/test_demo.py::*", re.compile("NO AUDIT RAN"), "the report's test"),
    ]
    unknown = {s.test for s in skips.unknown_skips(found, known)}
    # fp32 skips with the BF16 reason but is not the listed id; the browser's reason is listed nowhere.
    assert unknown == {
        "tests/test_demo.py::test_hint[fp32]",
        "tests/test_demo.py::test_browser",
        "tests/test_gone.py",
    }
    assert skips.unknown_skips(found, [skips.KnownSkip("*", re.compile("."), "all")]) == []


def test_the_check_exits_1_naming_each_unknown_skip(demo, capsys):
    assert skips.main([str(demo[1])]) == 1  # the project's known list knows none of the demo's skips
    err = capsys.readouterr().err
    assert "UNKNOWN SKIP" in err and "no Chromium at /usr/bin/chromium" in err
    assert skips.main([]) == 2


def test_every_known_skip_names_a_test_of_this_suite_and_the_reason_it_skips_with():
    known = skips.read_known()
    assert known
    for entry in known:
        module, _, name = entry.test.partition("::")
        source = (skips.ROOT / module).read_text()
        function = re.split(r"[?\[*]", name)[0]
        assert f"def {function}(" in source, entry.test
        assert entry.reason.search(source), (entry.test, entry.reason.pattern)  # the skip's own words
        assert len(entry.covered_by) > 20, entry.test  # says what checks the promise instead
