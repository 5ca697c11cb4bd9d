"""The upload page at ``/`` in a real headless browser, against the real stack.

Debian's Chromium (``/usr/bin/chromium``, installed by ``scripts/install-browser.sh``) driven by Playwright
for Python; Playwright never downloads a browser here. The stack is ``tests.test_gateway_stack``'s: the
pip-installed Triton serving the mean-colour ONNX model, the gateway under gunicorn. A person's steps:
choose a photo in the file input, press "Tag", read the attributes and their confidences.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers, CI), no GPU, and nothing that reaches the network: this machine's is closed.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a busy 2-core CI machine: generous, the page normally answers in well under 1 s

if not CHROMIUM.is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: run scripts/install-browser.sh (Debian's chromium package)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
)

# The module-scoped real stack of the gateway's stack tests, under another name (pytest registers a fixture
# by the name it has in this module): started once for this module, stopped after it.
from tests.test_gateway_stack import stack as real_stack  # noqa: E402, F401

pytestmark = [pytest.mark.server, pytest.mark.browser]

PERCENT = re.compile(r"^\d{1,3}\.\d%$")


def synth_photo(path: Path, colour: str) -> Path:
    """A synthetic catalogue photo (a product on a light background) whose base colour is ``colour``."""
    from training.synth import COLOURS, render, sample_row

    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}")
    row = next(r for r in (sample_row(i, seed=5) for i in range(1, 500)) if r.base_colour == colour)
    image, quality = render(row, seed=5)
    image.save(path, "JPEG", quality=quality)
    return path


@pytest.fixture
def url(request) -> str:
    return request.getfixturevalue("real_stack")["url"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.problems = problems  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


def tag(page: Any, url: str, photo: Path, category: str = "") -> dict[str, dict[str, str]]:
    """Open the page, choose ``photo`` (and ``category``), press Tag; the table as {attribute: cells}."""
    page.goto(url + "/")
    if category:
        page.wait_for_selector(f'#category option[value="{category}"]', state="attached")
        page.select_option("#category", category)
    page.set_input_files("#image", str(photo))
    page.click("#submit")
    page.wait_for_selector("#table:not([hidden]) #rows tr")
    page.wait_for_selector("#status:has-text('Model ')")
    return read_table(page)


def read_table(page: Any) -> dict[str, dict[str, str]]:
    rows = {}
    for row in page.query_selector_all("#rows tr"):
        label_cell = row.query_selector("td.label")
        label = label_cell.evaluate("td => td.firstChild.textContent")
        confidence = row.query_selector("td.confidence").inner_text().strip()
        rows[row.get_attribute("data-attribute")] = {"label": label, "confidence": confidence}
    return rows


def test_page_tags_an_uploaded_photo_with_labels_and_confidences(url, page, tmp_path):
    photo = synth_photo(tmp_path / "red-product.jpg", "Red")
    rows = tag(page, url, photo)
    assert list(rows) == ["colour", "Tshirts/neck", "Sarees/border"]
    assert rows["colour"]["label"] == "red"
    for attribute, cells in rows.items():
        assert PERCENT.match(cells["confidence"]), (attribute, cells)
    assert 33.3 < float(rows["colour"]["confidence"].rstrip("%")) <= 100.0  # above a 3-class tie
    assert page.inner_text("#status").startswith("Model fashion v1")
    assert page.is_visible("#preview")  # the chosen photo is shown next to the table
    screenshot = tmp_path / "gateway-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    assert page.problems == []  # type: ignore[attr-defined]


def test_page_offers_the_models_categories_and_answers_only_their_attributes(url, page, tmp_path):
    photo = synth_photo(tmp_path / "blue-product.jpg", "Blue")
    rows = tag(page, url, photo, category="Sarees")
    assert page.is_visible("#category-field")  # shown because this model has categories
    assert list(rows) == ["colour", "Sarees/border"]
    assert rows["colour"]["label"] == "blue"
    assert page.problems == []  # type: ignore[attr-defined]


def test_page_shows_the_gateways_error_and_drops_the_previous_photos_answer(url, page, tmp_path):
    tag(page, url, synth_photo(tmp_path / "red-product.jpg", "Red"))
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a photo")
    page.set_input_files("#image", str(fake))
    assert page.is_hidden("#table")  # the table described the previous photo
    page.click("#submit")
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status").startswith("undecodable_image:")
    page.wait_for_selector("#preview", state="hidden")  # a file the browser cannot show either
    assert page.is_hidden("#table")
    assert page.is_enabled("#submit")  # the button comes back for the next try


def test_page_says_that_a_photo_only_model_reads_no_title(url, page, tmp_path):
    page.goto(url + "/")
    page.wait_for_selector("#title-note:has-text('this model reads the photo only')")
    page.fill("#title", "Brand 1 Blue Tee")
    rows = tag(page, url, synth_photo(tmp_path / "red-product.jpg", "Red"))
    assert rows["colour"]["label"] == "red"
    assert " · read image · " in page.inner_text("#status")  # the title was not used
    assert page.problems == []  # type: ignore[attr-defined]


# --- the title box, against a model that reads titles (tests/fixtures_title.py) ---------------------------
@pytest.fixture(scope="module")
def title_url(stack_factory, title_export, tmp_path_factory) -> Iterator[str]:
    repo, _ = title_export
    stack = stack_factory(repo, tmp_path_factory.mktemp("browser-titles"))
    try:
        with stack.gateway("browser-titles", workers=1, timeout_s=30) as gateway:
            yield gateway.url
    finally:
        stack.stop()


def test_page_sends_the_title_box_and_marks_where_photo_and_title_disagree(title_url, page, tmp_path):
    from tests.conftest import COLOURS, draw_product

    photo = tmp_path / "red-square.jpg"
    draw_product(photo, COLOURS["Red"], "square", seed=3)

    def colour_cell(title: str) -> str:
        page.goto(title_url + "/")
        page.fill("#title", title)
        page.set_input_files("#image", str(photo))
        page.click("#submit")
        page.wait_for_selector("#table:not([hidden]) #rows tr")
        page.wait_for_selector("#status:has-text('Model ')")
        return page.inner_text('#rows tr[data-attribute="baseColour"] td.label')

    wrong = colour_cell("Brand 1 Blue Square Tee")
    assert wrong.startswith("Red") and "photo and title disagree" in wrong
    assert " · read image + title · " in page.inner_text("#status")
    own = colour_cell("Brand 1 Red Square Tee")
    assert own.startswith("Red") and "disagree" not in own
    none = colour_cell("")
    assert "disagree" not in none and " · read image · " in page.inner_text("#status")
    assert page.get_attribute("#title", "maxlength") == "300"  # the model's limit, from GET /v1/models
    assert page.problems == []  # type: ignore[attr-defined]
