"""``fashion tag-bench``: what tagging a catalogue costs, per engine, on this machine.

Tags the same ``--images`` real photos with every engine (``local``, ``triton``, ``gateway``) and with
``fashion predict`` (PyTorch in one process) and prints, per system: images/s, CPU-seconds per image of
the whole path (this process, plus Triton and its model process, plus the gateway's workers, whichever
the path runs through), CPU-hours per million images and what they cost at ``--price-per-vcpu-hour``.
The engines are measured from the moment they are ready (the session built, the connection made), over
the tagging alone. The ceiling the targets are stated against (``local`` ≥ 0.8 ×, ``triton`` ≥ 0.6 ×) is
``raw_best``, the export's chosen session timed bare on decoded photos at its best batch, as the export
timed it — but timed again here, taking turns with ``rounds`` runs of the local engine and once before the
triton row: this VM's speed drifts by tens of percent within minutes, and the export's own figure is one
moment's (a version exported while a training ran recorded 104 images/s for a session that runs 420).
Both figures are printed; the local row is the median of its runs.

The model: the newest version of ``--repository`` (exported first from ``--checkpoint`` or the shipped
model when it has none, as ``fashion serve`` does); Triton and the gateway are started on free loopback
ports for the two engines that need them, and stopped after.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.runtimes import cpu_info, time_runner
from export.sessions import open_session
from fashion.console import emit, table
from fashion.contract import ImageError, preprocess_file
from fashion.host import usable_cores
from fashion.metadata import file_sha256, load_export_record
from orchestration.config import DEFAULT_CHECKPOINT, ServeConfig
from orchestration.process import ROOT, children
from orchestration.provision import provision
from orchestration.serve import served
from tagging.engines import EngineSpec, export_choice
from tagging.errors import TagError
from tagging.inputs import read_inputs
from tagging.run import TagJob, TagSummary, tag

log = logging.getLogger(__name__)

SYSTEMS = ("local", "triton", "gateway", "predict")
TARGETS = {"local": 0.8, "triton": 0.6}  # × raw_best
PHOTOS = ROOT.parent / "shared" / "datasets" / "fashion-products-sample" / "images"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class CostOptions:
    """What ``fashion tag-bench`` measures; checked on construction."""

    out: Path
    images: int = 2000
    photos: Path = PHOTOS
    repository: Path = Path("model_repository")
    model_name: str = "fashion"
    checkpoint: Path | None = None  # default: the shipped model (the predict row; exported if needed)
    systems: tuple[str, ...] = SYSTEMS
    price_per_vcpu_hour: float = 0.04  # USD; a stated assumption, printed with the table
    rounds: int = 3  # local engine runs, taking turns with the bare session's timing
    turn_s: float = 2.0  # one timing turn of the bare session
    command: str = ""

    def __post_init__(self) -> None:
        for name in ("out", "photos", "repository"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise TagError(f"--systems takes {', '.join(SYSTEMS)}; got {sorted(unknown) or 'none'}")
        if self.images < 1 or self.price_per_vcpu_hour < 0:
            raise TagError("--images must be positive and --price-per-vcpu-hour not negative")
        if self.rounds < 1 or self.turn_s <= 0:
            raise TagError("--rounds must be at least 1 and the timing turn positive")


@dataclass(frozen=True)
class CostRow:
    """One system's run over the photos."""

    system: str
    images: int
    seconds: float
    cpu_s: float  # every process on the path, over the tagging alone
    errors: int = 0
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_image(self) -> float:
        return self.cpu_s / self.images

    @property
    def cpu_hours_per_million(self) -> float:
        return self.cpu_s_per_image * 1e6 / 3600

    def to_dict(self, price: float) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_s": round(self.images_per_s, 2),
            "cpu_s_per_image": round(self.cpu_s_per_image, 5),
            "cpu_hours_per_million": round(self.cpu_hours_per_million, 2),
            "usd_per_million": round(self.cpu_hours_per_million * price, 2),
        }


@dataclass
class CostReport:
    options: CostOptions
    model: str
    raw_best: str
    raw_best_ips: float  # the export's timing
    host: dict[str, Any]
    rows: list[CostRow] = field(default_factory=list)
    raw_turns: list[float] = field(default_factory=list)  # this bench's timings of the same session

    @property
    def ceiling_ips(self) -> float:
        """What the targets are stated against: the median of this bench's timings of the bare session
        (the upper middle one for an even count: the local row takes the lower, so that an even count never
        flatters a ratio), the export's figure when the bench timed none (neither a local nor a triton
        row)."""
        return statistics.median_high(self.raw_turns) if self.raw_turns else self.raw_best_ips

    def ratio(self, row: CostRow) -> float:
        return row.images_per_s / self.ceiling_ips if self.ceiling_ips else 0.0

    def to_dict(self) -> dict[str, Any]:
        price = self.options.price_per_vcpu_hour
        return {
            "command": self.options.command,
            "model": self.model,
            "raw_best": {
                "candidate": self.raw_best,
                "images_per_s": round(self.ceiling_ips, 1),
                "timed_here": [round(v, 1) for v in self.raw_turns],
                "export_images_per_s": self.raw_best_ips,
            },
            "price_per_vcpu_hour_usd": price,
            "host": self.host,
            "rows": [{**r.to_dict(price), "over_raw_best": round(self.ratio(r), 3)} for r in self.rows],
            "targets": {k: {"over_raw_best_min": v} for k, v in TARGETS.items()},
        }

    def markdown(self) -> str:
        price = self.options.price_per_vcpu_hour
        lines = []
        for r in self.rows:
            target = TARGETS.get(r.system)
            verdict = "" if target is None else (" (met)" if self.ratio(r) >= target else " (NOT met)")
            lines.append(
                [
                    r.system,
                    f"{r.images_per_s:.1f}",
                    f"{self.ratio(r):.2f}{verdict}",
                    f"{r.cpu_s_per_image * 1000:.1f}",
                    f"{r.cpu_hours_per_million:.1f}",
                    f"{r.cpu_hours_per_million * price:.2f}",
                    r.errors,
                    r.note,
                ]
            )
        head = [
            "system",
            "images/s",
            "× raw_best",
            "CPU ms/image",
            "CPU-h per million",
            "$ per million",
            "error rows",
            "note",
        ]
        return (
            f"{self.options.images} photos of {self.options.photos}; model {self.model}; raw_best = "
            f"{self.raw_best} at {self.ceiling_ips:.1f} images/s ({self._ceiling_source()}); "
            f"${price:.3f} per vCPU-hour; {self.host['cpu']}, {self.host['cores']} cores, load average "
            f"{self.host['loadavg_start']} at the start\n\n" + table(head, lines)
        )

    def _ceiling_source(self) -> str:
        if not self.raw_turns:
            return "the export's timing"
        turns = ", ".join(f"{v:.0f}" for v in self.raw_turns)
        places = (("local", "each local run"), ("triton", "the triton row"))
        before = [where for system, where in places if system in self.options.systems]
        return (
            f"the bare session timed here, median of {turns}, before {' and '.join(before)}; "
            f"the export timed {self.raw_best_ips:.1f}"
        )


# --- CPU of the path ----------------------------------------------------------------------------------


def own_cpu_s() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds so far of ``pids`` and every live process below them (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, seen, todo = 0.0, set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen or pid <= 0:
            continue
        seen.add(pid)
        todo += children(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measured(
    system: str, servers: Sequence[int], run: Callable[[Callable[[], None]], Any]
) -> tuple[Any, CostRow]:
    """Run ``run(ready)``; it calls ``ready()`` once its engine is built: wall and CPU count from there."""
    mark: dict[str, float] = {}

    def ready() -> None:
        mark.update(t=time.perf_counter(), cpu=own_cpu_s() + tree_cpu_s(servers))

    result = run(ready)
    seconds = time.perf_counter() - mark["t"]
    cpu = own_cpu_s() + tree_cpu_s(servers) - mark["cpu"]
    return result, CostRow(system, 0, seconds, cpu)


# --- the bench ------------------------------------------------------------------------------------------


def photo_folder(opts: CostOptions) -> Path:
    """``OUT/photos``: links to the first ``images`` photos of ``opts.photos`` (sorted by name)."""
    if not opts.photos.is_dir():
        raise TagError(f"{opts.photos} is not a folder of photos")
    chosen = sorted(p for p in opts.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[: opts.images]
    if len(chosen) < opts.images:
        raise TagError(f"{opts.photos} has {len(chosen)} photos; --images asks for {opts.images}")
    folder = opts.out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for p in chosen:
        link = folder / p.name
        if not link.is_symlink():
            link.symlink_to(p.resolve())
    return folder


def run_bench(opts: CostOptions, say: Callable[[str], None] = emit) -> CostReport:
    """Measure every system of ``opts`` and write ``OUT/tag-bench.json`` and ``OUT/tag-bench.md``."""
    opts.out.mkdir(parents=True, exist_ok=True)
    photos = photo_folder(opts)
    load_start = os.getloadavg()
    config = ServeConfig(
        repository=opts.repository,
        model_name=opts.model_name,
        checkpoint=opts.checkpoint,
        port=0,
        triton_http_port=0,
        triton_grpc_port=0,
        triton_metrics_port=0,
    )
    model = provision(config, say)
    record = load_export_record(opts.repository, opts.model_name, model.version)
    host = {
        "cpu": cpu_info().model,
        "cores": usable_cores(),  # what this process may use (a container's quota), not the host's count
        "python": platform.python_version(),
        "loadavg_start": [round(v, 2) for v in load_start],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    report = CostReport(
        opts, f"{opts.model_name} v{model.version}", record.chosen.name, record.chosen.best_ips, host
    )
    spec = EngineSpec(
        "local", repository=str(opts.repository), model_name=opts.model_name, version=str(model.version)
    )

    def add(row: CostRow) -> None:
        report.rows.append(row)
        say(f"{row.system}: {row.images_per_s:.1f} images/s, {row.cpu_s_per_image * 1000:.1f} CPU ms/image")

    def engine_row(system: str, engine: EngineSpec, servers: Sequence[int], out: str = "") -> CostRow:
        job = TagJob(photos, opts.out / (out or f"tags-{system}"), engine, progress=False)
        if job.out.exists():
            raise TagError(f"{job.out} exists: give tag-bench a fresh --out")
        summary: TagSummary
        summary, row = measured(system, servers, lambda ready: tag(job, say=log.info, on_ready=ready))
        return CostRow(system, summary.tagged, row.seconds, row.cpu_s, summary.errors)

    # The ceiling of the engines with a target is timed here, in turns with them: the export's figure is
    # one moment's, and a bench without a local row stated its triton row against it (2.6 x "met").
    time_bare = bare_timer(spec, photos, opts.turn_s) if set(TARGETS) & set(opts.systems) else None

    def bare_turn() -> float:
        assert time_bare is not None
        report.raw_turns.append(time_bare())
        return report.raw_turns[-1]

    if "local" in opts.systems:
        runs = []
        for r in range(opts.rounds):
            bare_turn()
            runs.append(engine_row("local", spec, [], f"tags-local-{r + 1}" if opts.rounds > 1 else ""))
            log.info(
                "round %d: bare session %.1f, local %.1f images/s",
                r + 1,
                report.raw_turns[-1],
                runs[-1].images_per_s,
            )
        add(median_run(runs))
    if {"triton", "gateway"} & set(opts.systems):
        if "triton" in opts.systems:  # before the servers start: nothing of theirs shares the cores
            log.info("bare session %.1f images/s before the triton row", bare_turn())
        with served(config, say=log.info) as stack:
            ends = stack.endpoints
            if "triton" in opts.systems:
                triton = EngineSpec(**{**asdict(spec), "kind": "triton", "url": ends.triton_grpc})
                add(engine_row("triton", triton, [ends.triton_pid]))
            if "gateway" in opts.systems:
                gateway = EngineSpec(**{**asdict(spec), "kind": "gateway", "url": ends.gateway})
                add(engine_row("gateway", gateway, [ends.triton_pid, ends.gateway_pid]))
    if "predict" in opts.systems:
        add(predict_row(opts, photos, record.checkpoint_sha256))
    text = report.markdown()
    (opts.out / "tag-bench.md").write_text(text + "\n")
    (opts.out / "tag-bench.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    say(text)
    return report


def bare_timer(spec: EngineSpec, photos: Path, seconds: float) -> Callable[[], float]:
    """A function that times the export's chosen session bare (its own settings, decoded photos, the
    local engine's batch size, one caller), the way the export timed it (``export.runtimes.time_runner``),
    for ``seconds``."""
    choice = export_choice(spec)
    arrays = []
    for item in read_inputs(photos).items[: choice.batch_size + 16]:  # time_runner repeats the first batch
        try:
            arrays.append(preprocess_file(item.path, choice.meta.preprocessing))
        except (OSError, ImageError):
            continue  # an unreadable file is the tagging's business, not the ceiling's
    if not arrays:
        raise TagError(f"none of the first photos of {photos} could be decoded")
    images = np.stack(arrays)
    session = open_session(choice.session_spec, choice.model_path)
    return lambda: time_runner(session, images, choice.batch_size, seconds)


def median_run(runs: Sequence[CostRow]) -> CostRow:
    """The run with the median images/s (of the two middle ones, the slower: a run that happened, not a
    mean of two); its note gives the range when there were several."""
    row = next(r for r in runs if r.images_per_s == statistics.median_low([r.images_per_s for r in runs]))
    if len(runs) == 1:
        return row
    rates = ", ".join(f"{r.images_per_s:.0f}" for r in runs)
    return replace(row, note=f"median of {len(runs)} runs ({rates} images/s)")


def predict_row(opts: CostOptions, photos: Path, exported_sha256: str) -> CostRow:
    """``fashion predict`` (PyTorch, this process) over the same photos, timed from the model being loaded."""
    # lazy: torch; only this row of the bench needs it
    from training.checkpoint import load_checkpoint
    from training.predict import predict_paths, read_for_prediction

    checkpoint = opts.checkpoint or DEFAULT_CHECKPOINT
    note = "" if file_sha256(checkpoint) == exported_sha256 else "another checkpoint than the export's"
    ckpt = load_checkpoint(checkpoint)
    paths = [s.image_path for s in read_for_prediction(photos, "images").samples]

    def run(ready: Callable[[], None]) -> Any:
        ready()
        return predict_paths(ckpt.model, paths, "cpu", desc="fashion predict")

    preds, row = measured("predict", [], run)
    return CostRow("predict", len(paths), row.seconds, row.cpu_s, int((~preds.ok).sum()), note)
