from pathlib import Path

import pytest

from fashion.schema import MISSING, OTHER
from training.data import (
    DatasetError,
    build_schema,
    encode,
    read_catalogue,
    stratified_split,
)

from .conftest import SHARED_SAMPLE


def test_kaggle_reader_reports_broken_rows_and_missing_images_without_crashing(kaggle_dir):
    cat = read_catalogue(kaggle_dir)
    assert cat.format == "kaggle"
    reasons = [p.reason for p in cat.problems]
    assert len(cat.problems) == 2
    assert any("expected 10 fields" in r for r in reasons)
    assert any("not found" in r for r in reasons)
    assert len(cat.samples) == 25


def test_kaggle_reader_treats_na_and_empty_cells_as_missing(kaggle_dir):
    by_id = {s.id: s for s in read_catalogue(kaggle_dir).samples}
    assert by_id["6"].labels["usage"] is None
    assert by_id["7"].labels["season"] is None
    assert by_id["1"].labels["usage"] == "Casual"


def test_kaggle_reader_keeps_commas_in_display_names_and_default_attributes(kaggle_dir):
    cat = read_catalogue(kaggle_dir)
    assert cat.attributes == [
        "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"
    ]
    assert {s.id for s in cat.samples} >= {"8", "900"}  # quoted and unquoted commas both read


def test_unknown_attribute_names_fail_with_the_available_columns(kaggle_dir):
    with pytest.raises(DatasetError, match="available"):
        read_catalogue(kaggle_dir, attributes=["colour"])


def test_meesho_reader_masks_attributes_of_other_categories(meesho_dir):
    cat = read_catalogue(meesho_dir)
    assert cat.format == "meesho"
    assert set(cat.attributes) == {
        "Men Tshirts/color", "Men Tshirts/neck", "Sarees/blouse_pattern", "Sarees/color", "Sarees/border"
    }
    schema = build_schema(cat, cat.samples)
    labels = encode(schema, cat.samples)
    col = {a.name: j for j, a in enumerate(schema.attributes)}
    for i, s in enumerate(cat.samples):
        if s.category == "Men Tshirts":
            assert labels[i, col["Sarees/color"]] == MISSING
            assert labels[i, col["Men Tshirts/color"]] != MISSING
        else:
            assert labels[i, col["Men Tshirts/neck"]] == MISSING
    tshirt_0 = next(s for s in cat.samples if s.id == "0")
    assert tshirt_0.labels["Men Tshirts/neck"] is None  # "dummy" is missing
    assert schema.categories["Sarees"] == ["Sarees/blouse_pattern", "Sarees/color", "Sarees/border"]
    assert "dummy" not in schema["Men Tshirts/neck"].classes


def test_plain_csv_reader_resolves_relative_image_paths(kaggle_dir, tmp_path):
    csv_path = tmp_path / "plain.csv"
    csv_path.write_text(f"image,colour\n{kaggle_dir}/images/1.jpg,Red\nkaggle/images/2.jpg,\n")
    cat = read_catalogue(csv_path)
    assert cat.format == "csv" and cat.attributes == ["colour"]
    assert [s.labels["colour"] for s in cat.samples] == ["Red", None]
    assert not cat.problems


def test_rare_classes_fold_into_other_and_folding_can_be_off(kaggle_dir):
    cat = read_catalogue(kaggle_dir)
    folded = build_schema(cat, cat.samples, min_class_count=20)
    assert folded["baseColour"].classes == (OTHER,)
    unfolded = build_schema(cat, cat.samples, min_class_count=0)
    assert unfolded["baseColour"].classes == ("Blue", "Green", "Red")


def test_split_is_stratified_deterministic_and_keeps_duplicates_together(kaggle_dir):
    import shutil

    shutil.copy(kaggle_dir / "images" / "1.jpg", kaggle_dir / "images" / "2.jpg")  # byte-identical pair
    cat = read_catalogue(kaggle_dir)
    train_a, val_a = stratified_split(cat.samples, "baseColour", 0.25, seed=3)
    _, val_b = stratified_split(cat.samples, "baseColour", 0.25, seed=3)
    assert [s.id for s in val_a] == [s.id for s in val_b]
    assert {s.labels["baseColour"] for s in val_a} == {"Red", "Green", "Blue"}
    sides = {s.id: "val" for s in val_a} | {s.id: "train" for s in train_a}
    assert sides["1"] == sides["2"]


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"real sample not found at {SHARED_SAMPLE}")
def test_kaggle_reader_loads_every_row_of_the_real_sample():
    cat = read_catalogue(SHARED_SAMPLE)
    assert len(cat.samples) == 9583 and not cat.problems
    missing_usage = sum(s.labels["usage"] is None for s in cat.samples)
    assert missing_usage > 0  # the file's NA cells
    assert all(s.labels["usage"] != "NA" for s in cat.samples)
    schema = build_schema(cat, cat.samples, min_class_count=0)
    assert len(schema["articleType"].classes) == 75


def test_reading_the_meesho_parquet_starts_no_arrow_worker_threads(meesho_dir):
    """Arrow's pools' threads segfaulted the test process at exit (mimalloc teardown): none are started."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        pytest.skip("needs Linux /proc to count threads")
    before = len(list(tasks.iterdir()))
    read_catalogue(meesho_dir)
    assert len(list(tasks.iterdir())) == before
