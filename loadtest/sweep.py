"""The serving sweep of ``fashion bench --sweep``: Model Analyzer's question for the whole CPU stack.

Coordinate search, each step keeping the best so far: Triton's ``max_queue_delay_microseconds``, then its
CPU instance count (intra-op threads = cores / instances), then gunicorn workers. Each setting is scored
by the gateway's highest throughput whose p95 meets ``--slo-p95-ms``, over a few client concurrencies;
a setting that meets the SLO nowhere scores 0. Writes ``sweep.json``, ``sweep.md`` and ``recommended/``
(``configs/cpu.pbtxt`` for the pip Triton, ``config.pbtxt`` for the NGC image, ``gunicorn.env``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from export.repository import ServingConfig, model_config
from export.sessions import SessionSpec
from fashion.console import table
from fashion.host import usable_cores
from loadtest.errors import LoadtestError
from loadtest.loadgen import best
from loadtest.measure import MODEL_NAME, BenchModel, Timing, gateway_env, http_client_factory, sweep_points
from orchestration.gateway import GatewayProcess
from orchestration.triton import TritonServer

log = logging.getLogger(__name__)


class SweepOptions(Timing, Protocol):
    """What the sweep reads of ``BenchOptions``."""

    @property
    def quick(self) -> bool: ...

    @property
    def slo_p95_ms(self) -> float: ...

    @property
    def out(self) -> Path: ...


@dataclass(frozen=True)
class Setting:
    max_queue_delay_us: int = 2000
    cpu_instances: int = 1
    workers: int = 2
    threads: int = 24  # as fashion bench: the in-flight limit must not refuse the sweep's concurrency


def grids(quick: bool) -> dict[str, list[int]]:
    if quick:
        return {"max_queue_delay_us": [0, 4000], "cpu_instances": [1, 2], "workers": [1, 2]}
    return {"max_queue_delay_us": [0, 1000, 4000, 10000], "cpu_instances": [1, 2], "workers": [1, 2, 4]}


def measure(model: BenchModel, opts: SweepOptions, work: Path, setting: Setting) -> dict[str, Any]:

    serving = ServingConfig(
        max_queue_delay_us=setting.max_queue_delay_us,
        cpu_instances=setting.cpu_instances,
    )
    size = model.preprocessing.image_size
    session = session_for(model, setting.cpu_instances)
    text = model_config(MODEL_NAME, model.schema, size, serving, backend="python", session=session)
    (model.repository / MODEL_NAME / "configs" / "cpu.pbtxt").write_text(text)
    # Around the knee on a few cores: beyond c=8 every setting breaks a 100 ms p95 SLO here.
    concurrencies = (2, 8) if opts.quick else (2, 4, 8)
    with TritonServer(model.repository, [MODEL_NAME], log_file=work / "sweep-triton.log") as triton:
        env = gateway_env(triton.grpc_url, model.repository, setting.workers, setting.threads, work)
        with GatewayProcess(env, work / "sweep-gunicorn.log", error=LoadtestError) as gateway:
            factory = http_client_factory(gateway.url, "/v1/predict", model.jpegs)
            points = sweep_points(factory, opts, f"sweep {setting}", concurrencies)
    chosen, met = best(points, opts.slo_p95_ms)
    return {
        "setting": setting.__dict__,
        "score_ips": chosen.throughput_ips if met else 0.0,
        "slo_p95_met": met,
        "best": chosen.to_dict(),
        "points": [p.to_dict() for p in points],
        "serving": serving.__dict__,
    }


def session_for(model: BenchModel, instances: int) -> SessionSpec:
    """The served session with the cores shared out between ``instances`` (intra-op threads each)."""
    return replace(model.chosen, threads=max(1, usable_cores() // instances))


def run_sweep(model: BenchModel, opts: SweepOptions, work: Path) -> dict[str, Any]:
    """Coordinate search (module docstring); writes the recommended files, sweep.json and sweep.md."""
    current, cache = _search(model, opts, work)
    chosen = cache[current]
    recommended = session_for(model, current.cpu_instances)
    out = _write_recommended(model, opts.out / "recommended", current, chosen, recommended)
    reason = _reason(model, opts, current, cache, recommended)
    doc = {"recommended": current.__dict__, "reason": reason, "tried": list(cache.values())}
    (opts.out / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    (opts.out / "sweep.md").write_text(_markdown(cache, reason, out) + "\n")
    log.info("sweep: %s", reason)
    return doc


def _search(
    model: BenchModel, opts: SweepOptions, work: Path
) -> tuple[Setting, dict[Setting, dict[str, Any]]]:
    """One knob at a time, keeping the best value of each (score, then the lower p95)."""
    cache: dict[Setting, dict[str, Any]] = {}
    current = Setting()
    for knob, values in grids(opts.quick).items():
        for value in values:
            candidate = replace(current, **{knob: value})
            if candidate not in cache:
                cache[candidate] = measure(model, opts, work, candidate)
        current = max(
            (replace(current, **{knob: v}) for v in values),
            key=lambda s: (cache[s]["score_ips"], -cache[s]["best"]["p95_ms"]),
        )
    return current, cache


def _write_recommended(
    model: BenchModel, out: Path, current: Setting, chosen: dict[str, Any], recommended: SessionSpec
) -> Path:
    """``configs/cpu.pbtxt`` (pip Triton), ``config.pbtxt`` (NGC image) and ``gunicorn.env``."""
    serving = ServingConfig(**chosen["serving"])
    size = model.preprocessing.image_size
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "cpu.pbtxt").write_text(
        model_config(MODEL_NAME, model.schema, size, serving, backend="python", session=recommended)
    )
    (out / "config.pbtxt").write_text(model_config(MODEL_NAME, model.schema, size, serving))
    # The concurrency that met the SLO is the queue bound to keep: spread over the workers as their
    # in-flight limit (beyond it a request waits FASHION_QUEUE_WAIT_S for a slot, then gets its 429), plus
    # spare threads for that wait, the 429s and the health checks.
    inflight = max(1, math.ceil(chosen["best"]["concurrency"] / current.workers))
    (out / "gunicorn.env").write_text(
        f"FASHION_WORKERS={current.workers}\nFASHION_MAX_INFLIGHT={inflight}\n"
        f"FASHION_THREADS={inflight + max(2, inflight // 3)}\n"
    )
    return out


def _reason(
    model: BenchModel,
    opts: SweepOptions,
    current: Setting,
    cache: dict[Setting, dict[str, Any]],
    recommended: SessionSpec,
) -> str:
    chosen = cache[current]
    others = sorted(cache.values(), key=lambda r: -r["score_ips"])
    runner_up = next((r for r in others if r is not chosen and r["slo_p95_met"]), None)
    setting_text = (
        f"max_queue_delay_us={current.max_queue_delay_us}, {current.cpu_instances} CPU instance(s) with "
        f"{recommended.threads} {model.chosen.runtime} threads each, {current.workers} gunicorn workers × "
        f"{current.threads} threads: {chosen['best']['throughput_ips']} img/s at p95 "
        f"{chosen['best']['p95_ms']} ms (c={chosen['best']['concurrency']})"
    )
    if not chosen["slo_p95_met"]:
        return (
            f"NO setting met p95 ≤ {opts.slo_p95_ms} ms at any concurrency tried ({len(cache)} settings); "
            f"the fastest was {setting_text}"
        )
    if runner_up:
        after = f"; next best {runner_up['setting']} at {runner_up['score_ips']} img/s"
    else:
        after = "; no other setting met the SLO"
    tried = f"of {len(cache)} settings tried"
    return f"{setting_text}, the highest throughput meeting p95 ≤ {opts.slo_p95_ms} ms {tried}{after}"


def _markdown(cache: dict[Setting, dict[str, Any]], reason: str, out: Path) -> str:
    rows = [
        [
            r["setting"]["max_queue_delay_us"],
            r["setting"]["cpu_instances"],
            r["setting"]["workers"],
            r["best"]["concurrency"],
            r["best"]["throughput_ips"],
            r["best"]["p95_ms"],
            r["slo_p95_met"],
        ]
        for r in cache.values()
    ]
    headers = ["queue delay µs", "instances", "workers", "best c", "images/s", "p95 ms", "SLO met"]
    return "\n".join(
        [
            "## Serving sweep (gateway throughput under the p95 SLO)",
            "",
            table(headers, rows),
            "",
            f"Recommended: {reason}.",
            f"Files: {out}/configs/cpu.pbtxt, {out}/config.pbtxt, {out}/gunicorn.env",
        ]
    )
