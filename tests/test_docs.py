"""The docs a newcomer reads: a short README, no text kept in two places, and no link to a missing file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


def test_no_sentence_is_kept_both_in_the_readme_and_in_docs():
    def lines(path: Path) -> set[str]:
        return {
            s
            for s in (line.strip() for line in path.read_text().splitlines())
            if len(s) > 60 and not s.startswith(("|--", "```", "!["))
        }

    readme = lines(README)
    for doc in DOCS:
        both = readme & lines(doc)
        assert not both, f"{doc.name} repeats the README: {sorted(both)[:2]}"


def test_every_relative_link_of_the_readme_and_docs_points_to_a_file_that_exists():
    for page in [README, *DOCS, ROOT / "model_repository" / "README.md", ROOT / "helm" / "README.md"]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"
