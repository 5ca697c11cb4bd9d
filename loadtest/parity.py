"""Served vs offline accuracy: the whole stack (gateway → Triton → ONNX) scored against ``fashion evaluate``.

The same labelled images go two ways: ``training.evaluate.evaluate`` (PyTorch, the checkpoint) and one
``POST /v1/predict`` per image to a running gateway. Per attribute, both accuracies use the same labels
(the checkpoint's schema encodes them; missing and not-applicable labels are left out) and differ only in
what produced the predictions, so any gap is the serving path's doing (preprocessing, export, label
decoding). ``agreement`` is the fraction of images where the served label equals the checkpoint's.

::

    fashion synth --out runs/unseen --count 300 --seed 2     # the demo trained on seed 1
    python -m loadtest.parity --gateway http://127.0.0.1:8080 --checkpoint demo/run/best.pt \\
        --data runs/unseen --out runs/parity

Exit status 0 when the gateway answered every image and every attribute is within ``--tolerance-points``
(default 0.5), 1 otherwise, 2 when the check could not run (gateway unreachable or serving another model,
unreadable dataset or checkpoint). Writes ``parity.json`` and the evaluation report (``eval/``) into
``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fashion.console import emit, table
from fashion.schema import MISSING
from fashion.upload import multipart_image
from loadtest.errors import LoadtestError
from training.checkpoint import load_checkpoint
from training.evaluate import encode_known, evaluate, evaluation_samples
from training.predict import predict_paths

log = logging.getLogger(__name__)

PARITY_EXIT_CODE = 1
RETRY_STATUSES = (429, 503)  # overloaded / Triton momentarily unavailable: both carry Retry-After


@dataclass(frozen=True)
class AttributeParity:
    """One attribute: accuracy (0-1) offline and through the stack, over the same labelled images."""

    attribute: str
    support: int
    offline_accuracy: float
    served_accuracy: float
    agreement: float  # served label == checkpoint's label, over every image both answered

    @property
    def delta_points(self) -> float:
        return 100.0 * abs(self.served_accuracy - self.offline_accuracy)


@dataclass(frozen=True)
class ParityReport:
    images: int
    served_errors: int  # images the gateway did not answer with 200
    attributes: tuple[AttributeParity, ...]
    tolerance_points: float

    @property
    def max_delta_points(self) -> float:
        return max((a.delta_points for a in self.attributes), default=0.0)

    @property
    def ok(self) -> bool:
        return self.served_errors == 0 and self.max_delta_points <= self.tolerance_points

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "served_errors": self.served_errors,
            "tolerance_points": self.tolerance_points,
            "max_delta_points": round(self.max_delta_points, 4),
            "ok": self.ok,
            "attributes": [{**asdict(a), "delta_points": round(a.delta_points, 4)} for a in self.attributes],
        }


# ------------------------------------------------------------------------------------------ served side
def _multipart(path: Path, title: str | None = None) -> tuple[bytes, str]:
    fields = {"top_k": "1"} if title is None else {"top_k": "1", "title": title}
    return multipart_image(path.read_bytes(), path.name, **fields)


def predict_one(
    url: str, path: Path, *, title: str | None = None, api_key: str = "", timeout_s: float = 60.0,
    retry_for_s: float = 120.0,
) -> dict[str, str] | None:
    """``POST url/v1/predict`` with ``path`` as field ``image`` (what the page and curl send) and, when
    given, the listing's ``title`` → ``{attribute: label}``; ``None`` when the gateway refuses the image
    (logged).

    429 and 503 mean "busy, come back" (the gateway sheds load instead of queueing): the request is sent
    again after ``Retry-After`` seconds, for up to ``retry_for_s``.
    """
    body, content_type = _multipart(path, title)
    headers = {"Content-Type": content_type}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + retry_for_s
    while True:
        request = urllib.request.Request(
            url.rstrip("/") + "/v1/predict", data=body, method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())
            return {name: p["label"] for name, p in answer["predictions"].items()}
        except urllib.error.HTTPError as e:
            detail = e.read()[:300]
            wait_s = _retry_after_s(e.headers.get("Retry-After"))
            if e.code in RETRY_STATUSES and time.monotonic() + wait_s < deadline:
                time.sleep(wait_s)
                continue
            log.warning("%s: the gateway answered %d: %s", path, e.code, detail)
            return None
        except (urllib.error.URLError, OSError) as e:
            raise LoadtestError(f"cannot reach the gateway at {url}: {e}") from e


def _retry_after_s(value: str | None) -> float:
    try:
        return min(max(float(value or 0.5), 0.05), 5.0)
    except ValueError:
        return 0.5


def served_labels(
    url: str,
    paths: Sequence[str | Path],
    *,
    titles: Sequence[str | None] | None = None,
    concurrency: int = 4,
    api_key: str = "",
) -> list[dict[str, str] | None]:
    """One request per image (with its title from ``titles``, if given), ``concurrency`` at a time; answers
    in the order of ``paths``."""
    with_titles = list(titles) if titles is not None else [None] * len(paths)
    if len(with_titles) != len(paths):
        raise LoadtestError(f"{len(paths)} images but {len(with_titles)} titles")
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(lambda pt: predict_one(url, Path(pt[0]), title=pt[1], api_key=api_key),
                             zip(paths, with_titles, strict=True)))


def served_classes(url: str, api_key: str = "") -> dict[str, list[str]]:
    """``{attribute: classes}`` of the model the gateway serves (``GET /v1/models``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url.rstrip("/") + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            model = json.loads(response.read())["models"][0]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
        raise LoadtestError(f"cannot read the served model from {url}/v1/models: {e}") from e
    return {a["name"]: list(a["classes"]) for a in model["attributes"]}


def served_indices(schema: Any, answers: Sequence[dict[str, str] | None]) -> np.ndarray:
    """Gateway labels → class indices of ``schema`` (``MISSING`` where the gateway gave no answer)."""
    out = np.full((len(answers), len(schema.attributes)), MISSING, dtype=np.int64)
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for j, a in enumerate(schema.attributes):
            out[i, j] = a.classes.index(answer[a.name])
    return out


# ------------------------------------------------------------------------------------------ comparison
def compare(
    schema: Any,
    labels: np.ndarray,
    offline_pred: np.ndarray,
    served_pred: np.ndarray,
    offline_accuracy: dict[str, float],
    tolerance_points: float = 0.5,
) -> ParityReport:
    """Per attribute: served accuracy over the labelled images the gateway answered, next to the offline
    accuracy ``fashion evaluate`` reported, and the per-image agreement of the two predictions."""
    answered = (served_pred != MISSING).all(axis=1)
    rows = []
    for j, a in enumerate(schema.attributes):
        present = (labels[:, j] != MISSING) & answered
        both = answered & (offline_pred[:, j] != MISSING)
        served = (
            float((served_pred[present, j] == labels[present, j]).mean()) if present.any() else float("nan")
        )
        agree = float((served_pred[both, j] == offline_pred[both, j]).mean()) if both.any() else float("nan")
        rows.append(
            AttributeParity(
                attribute=a.name,
                support=int(present.sum()),
                offline_accuracy=float(offline_accuracy[a.name]),
                served_accuracy=served,
                agreement=agree,
            )
        )
    return ParityReport(
        images=len(labels),
        served_errors=int((~answered).sum()),
        attributes=tuple(r for r in rows if r.support > 0),
        tolerance_points=tolerance_points,
    )


def check_parity(
    gateway_url: str,
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    tolerance_points: float = 0.5,
    concurrency: int = 4,
    api_key: str = "",
) -> ParityReport:
    """Run ``fashion evaluate`` on ``data`` and send every image of ``data`` through the gateway; compare.

    ``data`` is a labelled dataset in any layout ``fashion evaluate`` reads. Raises ``LoadtestError`` when
    the gateway serves a model whose classes differ from the checkpoint's (a different model).
    """

    out = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    schema = ckpt.schema
    classes = served_classes(gateway_url, api_key)
    expected = {a.name: list(a.classes) for a in schema.attributes}
    if classes != expected:
        raise LoadtestError(
            f"the gateway at {gateway_url} serves a model with other attributes or classes than "
            f"{checkpoint}: point --gateway at a stack serving that checkpoint's export"
        )
    offline = evaluate(checkpoint, out / "eval", str(data))
    samples = evaluation_samples(ckpt, str(data))
    paths = [s.image_path for s in samples]
    labels = encode_known(schema, samples)
    preds = predict_paths(ckpt.model, paths, "cpu", desc="offline labels")
    offline_pred = np.stack([preds.probs[a.name].argmax(axis=1) for a in schema.attributes], axis=1)
    offline_pred[~preds.ok] = MISSING
    labels[~preds.ok] = MISSING
    served_pred = served_indices(
        schema, served_labels(gateway_url, paths, concurrency=concurrency, api_key=api_key)
    )
    accuracy = {name: m["accuracy"] for name, m in offline.attributes.items()}
    report = compare(schema, labels, offline_pred, served_pred, accuracy, tolerance_points)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


def parity_table(report: ParityReport) -> str:

    rows = [
        [
            a.attribute,
            a.support,
            f"{100 * a.offline_accuracy:.2f}",
            f"{100 * a.served_accuracy:.2f}",
            f"{a.delta_points:.2f}",
            f"{100 * a.agreement:.2f}",
        ]
        for a in report.attributes
    ]
    headers = ["attribute", "images", "offline acc. %", "served acc. %", "Δ points", "same label %"]
    return table(headers, rows)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:

    p = argparse.ArgumentParser(
        prog="python -m loadtest.parity",
        description="Accuracy through a running gateway vs `fashion evaluate` on the same labelled images.",
    )
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the gateway's model was exported from")
    p.add_argument("--data", required=True, help="labelled images the model never saw (e.g. `fashion synth`)")
    p.add_argument("--out", required=True, help="folder for parity.json and the evaluation report (eval/)")
    p.add_argument("--tolerance-points", type=float, default=0.5, help="allowed |Δ accuracy| (default 0.5)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--api-key", default="", help="API key, when the gateway requires one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = check_parity(
            args.gateway,
            args.checkpoint,
            args.data,
            args.out,
            tolerance_points=args.tolerance_points,
            concurrency=args.concurrency,
            api_key=args.api_key,
        )
    except (LoadtestError, ValueError, OSError) as e:  # ValueError: DatasetError, CheckpointError
        sys.stderr.write(f"error: {e}\n")
        return 2
    emit(parity_table(report))
    verdict = "within" if report.ok else "NOT within"
    emit(
        f"{report.images} images, {report.served_errors} served errors; largest |Δ| "
        f"{report.max_delta_points:.2f} points: {verdict} {report.tolerance_points:g} points"
    )
    return 0 if report.ok else PARITY_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
