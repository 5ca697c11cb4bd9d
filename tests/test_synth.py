import csv
import hashlib

from training.data import read_catalogue
from training.synth import KINDS, generate


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_the_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    generate(tmp_path / "a", 12, seed=3)
    generate(tmp_path / "b", 12, seed=3)
    generate(tmp_path / "c", 12, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_catalogue_reads_as_kaggle_with_sleeves_only_on_garments_that_have_them(tmp_path):
    generate(tmp_path, 120, seed=0)
    rows = list(csv.DictReader((tmp_path / "styles.csv").open()))
    sleeved = {k.article_type for k in KINDS if k.has_sleeves}
    assert all(bool(r["sleeveLength"]) == (r["articleType"] in sleeved) for r in rows)
    assert len({r["articleType"] for r in rows}) == 8 and len({r["baseColour"] for r in rows}) >= 10
    cat = read_catalogue(tmp_path, "auto", ["articleType", "baseColour", "pattern", "sleeveLength"])
    assert len(cat.samples) == 120
    missing = sum(s.labels.get("sleeveLength") is None for s in cat.samples)
    assert missing == sum(r["articleType"] not in sleeved for r in rows)
