"""Provisioning for ``fashion serve``: which model version the stack serves, exporting or building it first
when the repository has none (or not the asked checkpoint's). Returns a ``ServedModel``; starts nothing.

- **An existing version** (the highest complete one, ``servable_version``) is served as it is, without
  importing torch.
- ``--checkpoint``: that checkpoint's export is reused when the version's export record
  (``fashion.metadata.load_export_record``) names the same checkpoint (sha256); otherwise it is exported.
- The **shipped default model** (``models/default/model.pt``) is exported when the repository is empty, with
  ``--precision auto`` (``export.pipeline``: every CPU runtime x precision gated and timed, the fastest
  that passed served; FP32 only where no real photos can calibrate and check INT8 and BF16).
- ``--demo``: a synthetic catalogue (``training.synth``), a small model trained on it (``training.train``),
  exported FP32; each step is skipped when its output is there and still matches the settings.

torch comes in only through the stage modules imported here when an export or a training runs.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion.metadata import (
    FILENAME,
    MetadataError,
    file_sha256,
    load_export_record,
    read_document,
    version_folders,
)
from orchestration.config import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL_DIR,
    MODEL_CONFIG_NAME,
    DemoSettings,
    ServeConfig,
    StackError,
)

Say = Callable[[str], None]
SAMPLE_IMAGE_ID = 1


@dataclass(frozen=True)
class ServedModel:
    """The model version the stack serves and where it came from.

    ``origin``: ``"existing"`` (found in the repository), ``"exported"`` (exported now from
    ``checkpoint``), ``"reused"`` (an earlier export of ``checkpoint``) or ``"demo"`` (built now).
    """

    repository: Path
    name: str
    version: int
    origin: str
    checkpoint: Path | None = None

    @property
    def folder(self) -> Path:
        return self.repository / self.name / str(self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": str(self.repository),
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServedModel:
        checkpoint = d.get("checkpoint")
        path = Path(checkpoint) if checkpoint else None
        return cls(Path(d["repository"]), d["name"], int(d["version"]), d["origin"], path)


def servable_version(repository: Path, name: str = "fashion") -> int | None:
    """The version the pip Triton would serve (highest numeric folder), if it is complete; else ``None``."""
    model_dir = Path(repository) / name
    if not (model_dir / "configs" / f"{MODEL_CONFIG_NAME}.pbtxt").is_file():
        return None
    versions = version_folders(model_dir)
    if not versions:
        return None
    latest = model_dir / str(versions[-1])
    if all((latest / f).is_file() for f in ("model.onnx", "model.py", FILENAME)):
        return versions[-1]
    return None


def read_metadata(repository: Path, name: str, version: int) -> dict[str, Any]:
    """The version's whole ``metadata.json`` document (for tests and reports; the stack reads it typed)."""
    try:
        return read_document(Path(repository) / name / str(version) / FILENAME)
    except MetadataError as e:
        raise StackError(f"{e}; re-export with `fashion serve --rebuild`") from e


def provision(config: ServeConfig, say: Say) -> ServedModel:
    """Make sure the repository serves a model (exporting or building one if needed); what it serves."""
    version = servable_version(config.repository, config.model_name)
    served = _served(config)
    if config.checkpoint is not None:
        if version is not None and not config.rebuild:
            reason = _not_from(config, version, config.checkpoint)
            if reason is None:
                say(f"model: {_where(config, version)} was exported from {config.checkpoint}")
                return served(version, "reused", config.checkpoint)
            say(f"model: exporting {config.checkpoint}: {_where(config, version)} {reason}")
        work = functools.partial(export_for_cpu, config, config.checkpoint)
        return served(_timed(say, f"export {config.checkpoint}", work), "exported", config.checkpoint)
    if version is not None and not config.rebuild:
        stale = None if config.demo else _older_default(config, version)
        if stale is None:
            again = "retrains the demo model" if config.demo else "exports the default model again"
            say(f"model: {_where(config, version)} (existing; --rebuild {again})")
            return served(version, "existing")
        say(f"model: {_where(config, version)} {stale}: exporting the shipped one as a new version")
    if config.demo:
        return served(build_demo(config, say), "demo")
    if not DEFAULT_CHECKPOINT.is_file():
        raise StackError(f"the shipped default model {DEFAULT_CHECKPOINT} is missing (a partial checkout?); "
                         "serve your own with --checkpoint, or the synthetic demo with --demo")
    work = functools.partial(export_for_cpu, config, DEFAULT_CHECKPOINT)
    version = _timed(say, f"export the default model {shown(DEFAULT_CHECKPOINT)}", work)
    return served(version, "exported", DEFAULT_CHECKPOINT)


def ensure_model(config: ServeConfig, say: Say) -> int:
    """``provision(config, say).version``."""
    return provision(config, say).version


def _served(config: ServeConfig) -> Callable[..., ServedModel]:
    def make(version: int, origin: str, checkpoint: Path | None = None) -> ServedModel:
        return ServedModel(config.repository, config.model_name, int(version), origin, checkpoint)

    return make


def _not_from(config: ServeConfig, version: int, checkpoint: Path) -> str | None:
    """Why ``version`` is not an export of ``checkpoint`` (``None``: it is), from its export record."""
    try:
        record = load_export_record(config.repository, config.model_name, version)
    except MetadataError as e:
        return f"has no readable export record ({str(e).splitlines()[0]})"
    if record.checkpoint_sha256 != file_sha256(checkpoint):
        return "was exported from another checkpoint"
    return None


def _older_default(config: ServeConfig, version: int) -> str | None:
    """Why ``version`` is an export of an earlier shipped default model (a checkout updated since
    ``make serve`` last exported it), or ``None``: it is the current one, or not the default model at all
    (a model of the user's own, which is served as it is). Records written before they named the
    checkpoint say so through the INT8 settings read from the default model's folder."""
    try:
        record = load_export_record(config.repository, config.model_name, version)
    except MetadataError:
        return None
    default_settings = str((DEFAULT_MODEL_DIR / "export.yaml").resolve())
    legacy = record.training.checkpoint_path is None and any(
        v.quantisation is not None and v.quantisation.keep_from == default_settings for v in record.variants
    )
    if record.training.checkpoint_path != str(DEFAULT_CHECKPOINT.resolve()) and not legacy:
        return None
    if not DEFAULT_CHECKPOINT.is_file() or record.checkpoint_sha256 == file_sha256(DEFAULT_CHECKPOINT):
        return None
    return f"was exported from an earlier {shown(DEFAULT_CHECKPOINT)}"


def _where(config: ServeConfig, version: int) -> str:
    return f"{config.repository}/{config.model_name}/{version}"


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter curl lines)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def _timed(say: Say, what: str, work: Callable[[], Any]) -> Any:
    say(f"{what} ...")
    started = time.perf_counter()
    result = work()
    say(f"{what}: done in {time.perf_counter() - started:.1f} s")
    return result


# ------------------------------------------------------------------------------------------ the demo
def build_demo(config: ServeConfig, say: Say) -> int:
    """Synthetic catalogue → trained model → FP32 export; each step printed with its time."""
    demo = config.demo_settings
    say(
        f"building the demo model ({demo.backbone}, {demo.image_size} px, {demo.epochs} epochs, "
        f"{demo.count} synthetic products) — a one-off; later runs reuse it"
    )
    started = time.perf_counter()
    fresh_catalogue = not _catalogue_matches(demo)
    if fresh_catalogue:
        _timed(
            say, f"[1/3] synthetic catalogue: {demo.count} images → {demo.synth_dir}", lambda: _synth(demo)
        )
    else:
        say(f"[1/3] synthetic catalogue: {demo.synth_dir} (present)")
    best = demo.run_dir / "best.pt"
    reason = "the catalogue was rewritten" if fresh_catalogue else _run_mismatch(demo)
    if reason is None and not config.rebuild:
        say(f"[2/3] train: {best} (present)")
    else:
        if reason and best.is_file():
            say(f"      retraining: {reason}")
        _timed(say, f"[2/3] train {demo.backbone} → {demo.run_dir}", lambda: _train(demo))
    version = _timed(say, f"[3/3] export fp32 → {config.repository}",
                     lambda: export_for_cpu(config, best, "fp32"))
    say(f"demo model ready in {time.perf_counter() - started:.1f} s")
    return int(version)


def _catalogue_matches(demo: DemoSettings) -> bool:
    styles = demo.synth_dir / "styles.csv"
    if not styles.is_file() or not (demo.synth_dir / "images" / f"{SAMPLE_IMAGE_ID}.jpg").is_file():
        return False
    with styles.open(newline="", encoding="utf-8") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return rows == demo.count


def _synth(demo: DemoSettings) -> None:
    _stage("training.synth").generate(demo.synth_dir, demo.count, demo.seed)


def _run_mismatch(demo: DemoSettings) -> str | None:
    """Why ``run_dir/best.pt`` cannot be reused for these settings (``None``: it can)."""
    best, saved = demo.run_dir / "best.pt", demo.run_dir / "config.yaml"
    if not best.is_file():
        return "no best.pt"
    if not saved.is_file():
        return f"{saved} is missing"
    import yaml

    cfg = yaml.safe_load(saved.read_text()) or {}
    wanted = {"backbone": demo.backbone, "image_size": demo.image_size, "epochs": demo.epochs}
    changed = [f"{k} {cfg.get(k)!r} → {v!r}" for k, v in wanted.items() if cfg.get(k) != v]
    if Path(str(cfg.get("data", ""))).resolve() != demo.synth_dir.resolve():
        changed.append(f"data {cfg.get('data')!r} → {str(demo.synth_dir)!r}")
    return ", ".join(changed) or None


def _train(demo: DemoSettings) -> None:
    train, config = _stage("training.train"), _stage("training.config")
    train.train(
        config.TrainConfig(
            data=str(demo.synth_dir.resolve()),
            out=str(demo.run_dir),
            format="kaggle",
            backbone=demo.backbone,
            image_size=demo.image_size,
            epochs=demo.epochs,
            seed=demo.seed,
        )
    )


def export_for_cpu(config: ServeConfig, checkpoint: Path, precisions: str = "auto") -> int:
    """Export ``checkpoint``; ``auto`` gates and times every CPU runtime × precision (INT8 and BF16 only
    where real photos exist to calibrate and check them) and serves the fastest that passed."""
    pipeline = _stage("export.pipeline")
    result = pipeline.export_checkpoint(
        pipeline.ExportOptions(
            checkpoint=checkpoint,
            repository=config.repository,
            name=config.model_name,
            precisions=precisions,
        )
    )
    return int(result.version)


def _stage(name: str) -> Any:
    """A training/export module, imported when first needed (torch comes with most of them).

    Through importlib, so that the type checker, which covers the torch-free packages, stays out of them.
    """
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------ the photo
def sample_title(image: Path) -> str | None:
    """The listing title of a shipped example photo (``labels.json`` beside it, ``{"<file>": {"title": …}}``),
    or None where it has none."""
    try:
        labels = json.loads((image.parent / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = labels.get(image.name) if isinstance(labels, dict) else None
    title = entry.get("title") if isinstance(entry, dict) else None
    return title if isinstance(title, str) and title else None


def sample_image(config: ServeConfig) -> Path:
    """The photo of the first request: a real catalogue photo shipped with the default model; with
    ``--demo`` a demo catalogue photo; else (``--checkpoint``) one synthetic photo, drawn once."""
    demo = config.demo_settings
    examples = sorted((DEFAULT_MODEL_DIR / "examples").glob("*.jpg"))
    if not config.demo and examples:
        return examples[0]
    path = demo.synth_dir / "images" / f"{SAMPLE_IMAGE_ID}.jpg"
    if path.is_file():
        return path
    synth = _stage("training.synth")
    path = demo.directory / "sample.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    image, quality = synth.render(synth.sample_row(SAMPLE_IMAGE_ID, demo.seed), demo.seed)
    image.save(path, "JPEG", quality=quality)
    return path
