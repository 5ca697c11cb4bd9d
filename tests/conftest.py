"""Fixtures that build small datasets on disk, in the real layouts, with images the tests draw."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion-products-sample"
COLOURS = {"Red": (220, 30, 30), "Blue": (30, 60, 220), "Green": (30, 170, 60)}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers on two cores) each worker, and every process it
    starts, uses one OpenMP thread unless OMP_NUM_THREADS is set: two workers each running two torch threads
    on two cores made the suite 41 s slower here (345 s against 304 s). Runs before any test imports torch."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that train or export real models run first, then those that start servers, then the rest
    (stable within each), so that with ``-n 2 --dist loadfile`` the longest work starts at once and both
    workers finish together instead of one waiting on a long module scheduled last."""
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        mark = 2 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("server") else 0
        weight[module] = max(weight.get(module, 0), mark)
    items.sort(key=lambda item: -weight[item.nodeid.split("::", 1)[0]])


def draw_product(path: Path, colour: tuple[int, int, int], shape: str, size=(120, 160), seed=0) -> None:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (245, 245, 245))
    from PIL import ImageDraw

    d = ImageDraw.Draw(image)
    w, h = size
    jitter = int(rng.integers(-6, 7))
    if shape == "square":
        d.rectangle([w * 0.2 + jitter, h * 0.25, w * 0.8 + jitter, h * 0.75], fill=colour)
    else:
        d.ellipse([w * 0.2 + jitter, h * 0.25, w * 0.8 + jitter, h * 0.75], fill=colour)
    image.save(path, quality=90)


# --- the one way tests start a stack: Triton on a repository, gateways in front of it -----------------
class Stack:
    """The pip Triton serving ``repository`` (``models``) and gunicorn gateways in front of it, all on free
    loopback ports; what every integration test module starts through ``stack_factory``.

    ``triton()`` restarts a Triton that a test stopped (or killed), so one stack can outlive such a test.
    ``gateway(name, protocol, **settings)`` starts a gateway that calls Triton over ``protocol`` (one of
    ``gateway.config.PROTOCOLS``, the chart's ``FASHION_TRITON_PROTOCOL`` values) with ``FASHION_<SETTING>``
    overrides, ready on entry (``/readyz`` 200: Triton's model metadata read over that protocol) and stopped
    on exit. The served-parity, fault and model-update tests run over each protocol, so that a broken
    transport fails.
    """

    def __init__(self, repository: Path, work: Path, models: tuple[str, ...] = ("fashion",), **triton_args):
        from orchestration.triton import TritonServer

        self.repository, self.work = repository, work
        self.server = TritonServer(repository, list(models), startup_timeout_s=120, **triton_args)

    def triton(self):
        if not self.server.is_running():
            self.server.start()
        return self.server

    @contextlib.contextmanager
    def gateway(self, name: str = "gateway", protocol: str = "grpc", **settings: object):
        from orchestration.gateway import GatewayProcess

        work = Path(tempfile.mkdtemp(dir=self.work, prefix=f"gateway-{name}-"))  # a name may be reused
        (work / "prometheus").mkdir()
        triton = self.triton()
        env = {
            "FASHION_TRITON_URL": {"grpc": triton.grpc_url, "http": triton.http_url}[protocol],
            "FASHION_TRITON_PROTOCOL": protocol,
            "FASHION_MODEL_REPOSITORY": str(self.repository),
            "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
            **{f"FASHION_{key.upper()}": str(value) for key, value in settings.items()},
        }
        with GatewayProcess(env, work / "gunicorn.log") as server:
            yield server

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(autouse=True)
def _metrics_folder_left_as_found() -> Iterator[None]:
    """Importing ``gateway.gunicorn_conf`` sets ``PROMETHEUS_MULTIPROC_DIR`` for gunicorn's sake; a test
    that imports it in this process must not turn every later in-process gateway test of the same pytest
    worker into a reader of that folder (13 metrics tests failed that way in CI)."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    if before is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


@pytest.fixture(scope="session")
def stack_factory(tmp_path_factory) -> Iterator:
    """``stack_factory(repository, work, models=..., **triton_args)``: a ``Stack`` stopped at the end of
    the session (or earlier by its user)."""
    stacks: list[Stack] = []

    def make(repository: Path, work: Path, models: tuple[str, ...] = ("fashion",), **triton_args) -> Stack:
        stack = Stack(repository, work, models, **triton_args)
        stacks.append(stack)
        stack.triton()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="session")
def colour_stack(stack_factory, tmp_path_factory) -> Stack:
    """The tiny colour model of ``tests/test_gateway_stack.py``, published once and served by one Triton for
    every module that only reads it (the gateway stack, hostile clients, security, load tests)."""
    from tests.test_gateway_stack import publish

    work = tmp_path_factory.mktemp("colour-stack")
    publish(work / "model_repository", work)
    return stack_factory(work / "model_repository", work)


@contextlib.contextmanager
def served_repository(stack_factory, repository: Path, work: Path) -> Iterator[str]:
    """A ``Stack`` on ``repository`` with one gateway (2 workers, 30 s timeout), stopped on exit; yields the
    gateway's URL."""
    stack = stack_factory(repository, work)
    try:
        with stack.gateway(workers=2, timeout_s=30) as gateway:
            yield gateway.url
    finally:
        stack.stop()


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A Kaggle-layout folder: styles.csv with NA, empty cells, a quoted comma, an unquoted comma,
    a broken row, and one id without an image."""
    root = tmp_path / "kaggle"
    (root / "images").mkdir(parents=True)
    header = (
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    )
    lines = [header]
    for i in range(24):
        colour = list(COLOURS)[i % 3]
        shape = "square" if i % 2 else "round"
        usage = "NA" if i == 5 else "Casual"
        season = "" if i == 6 else "Summer"
        name = f'"Brand {i}, {colour} Tshirt"' if i == 7 else f"Brand {i} {colour} Tshirt"
        lines.append(f"{i + 1},Men,Apparel,Topwear,{shape},{colour},{season},2011,{usage},{name}")
        draw_product(root / "images" / f"{i + 1}.jpg", COLOURS[colour], shape, seed=i)
    lines.append("900,Men,Apparel,Topwear,Tshirts,Red,Summer,2011,Casual,Unquoted, comma name")
    draw_product(root / "images" / "900.jpg", COLOURS["Red"], "round")
    lines.append("901,Men,Apparel")  # broken: too few fields
    lines.append("902,Men,Apparel,Topwear,Tshirts,Red,Summer,2011,Casual,No image on disk")
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def meesho_dir(tmp_path: Path) -> Path:
    """A Meesho "Visual Taxonomy" folder: two categories with different attribute lists per slot."""
    import pandas as pd

    root = tmp_path / "meesho"
    (root / "train_images").mkdir(parents=True)
    pd.DataFrame(
        {
            "Category": ["Men Tshirts", "Sarees"],
            "Attribute_list": [["color", "neck"], ["blouse_pattern", "color", "border"]],
            "No_of_attribute": [2, 3],
        }
    ).to_parquet(root / "category_attributes.parquet")
    rows = []
    for i in range(32):
        if i % 2 == 0:
            colour = ["Red", "Blue"][i // 2 % 2]
            neck = "dummy" if i % 8 == 0 else ["round", "polo"][i // 4 % 2]
            row = [i, "Men Tshirts", 2, colour.lower(), neck] + [""] * 8
            draw_product(root / "train_images" / f"{i:06d}.jpg", COLOURS[colour], "square", seed=i)
        else:
            colour = ["Green", "Blue"][i // 2 % 2]
            border = ["zari", "solid"][i // 4 % 2]
            row = [i, "Sarees", 3, "same as saree", colour.lower(), border if i % 5 else ""] + [""] * 7
            draw_product(root / "train_images" / f"{i:06d}.jpg", COLOURS[colour], "round", seed=i)
        rows.append(row)
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "Category", "len"] + [f"attr_{k}" for k in range(1, 11)])
        w.writerows(rows)
    return root


# --- the tests' tiny trained model and one export of it (test_export, test_cpu_candidates) ---------
TINY_SIZE = 64


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny trained model (timm's test_efficientnet, 64 px, 1 epoch on 48 synthetic products)."""
    from training.config import TrainConfig
    from training.synth import generate
    from training.train import train

    root = tmp_path_factory.mktemp("ckpt")
    generate(root / "synth", 48, seed=0)
    cfg = TrainConfig(
        data=str(root / "synth"),
        out=str(root / "run"),
        backbone="test_efficientnet",
        image_size=TINY_SIZE,
        epochs=1,
        batch_size=16,
        workers=0,
        seed=0,
    )
    return train(cfg).run_dir / "best.pt"


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    """One export with all CPU-buildable precisions into a fresh repository."""
    from export.pipeline import ExportOptions, export_checkpoint

    repo = tmp_path_factory.mktemp("repo")
    opts = ExportOptions(
        checkpoint=checkpoint,
        repository=repo,
        precisions=("fp16", "int8"),
        # A one-epoch 64 px model decides on noise: the gate's thresholds are loosened and --force keeps
        # what still fails, so that every file and config is written (the gate itself is tested below).
        min_agreement=0.5,
        max_accuracy_drop=1.0,
        force=True,
        synthetic_calibration=True,  # its catalogue is `fashion synth` renders, not real photos
        calibration_images=32,
        gate_images=24,
        eval_images=24,
        max_batch_size=16,
        time_s=0.2,
    )
    result = export_checkpoint(opts, report=lambda text: None)
    return repo, result


# --- the tiny model that reads titles (issue 24) and its export: tests/fixtures_title.py ---------------
from tests.fixtures_title import title_catalogue, title_checkpoint, title_export, title_int8  # noqa: E402, F401
