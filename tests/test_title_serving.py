"""One exported model serves image-only and image + title requests: the export (graph, parity both ways,
metadata, configs, FP32 title branch in INT8/FP16), then the real pip Triton and gunicorn (answers equal
PyTorch's with and without titles, the conflict flag on a wrong title, requests with and without titles
batched together, hostile titles, every ``fashion tag`` engine sending titles).

The model is ``tests.fixtures_title``'s: a tiny title model whose colour is set by hand, so that the
photo's colour and the title's are known.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import onnx
import pytest

from fashion.metadata import load_export_record, load_metadata
from gateway.client import FashionClient
from tests.conftest import COLOURS, draw_product
from tests.fixtures_title import CONFLICT_THRESHOLD, TITLE_SIZE

pytestmark = pytest.mark.slow
ATOL = 1e-4  # PyTorch against ONNX Runtime / OpenVINO, both FP32 (export.parity.FP32_ATOL)
# (photo colour, photo shape, title or None): with their own colour, another colour, no colour word, none.
CASES = [
    ("Red", "square", "Brand 1 Red Square Tee"),
    ("Red", "square", "Brand 1 Blue Square Tee"),
    ("Blue", "round", "Brand 4 Blue Round Tee"),
    ("Blue", "round", "Brand 4 Green Round Tee"),
    ("Green", "square", "Brand 2 Square Tee"),
    ("Green", "round", None),
    ("Red", "round", ""),
    ("Blue", "square", "Navy Cotton Tee — 100 % Blue"),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("title-photos")
    out = []
    for i, (colour, shape, _) in enumerate(CASES):
        path = folder / f"{i}.jpg"
        draw_product(path, COLOURS[colour], shape, seed=100 + i)
        out.append(path.read_bytes())
    return out


@pytest.fixture(scope="module")
def net(title_checkpoint):
    from training.checkpoint import load_checkpoint

    return load_checkpoint(title_checkpoint).model


def torch_outputs(net, arrays: np.ndarray, titles: list[str | None]) -> list[np.ndarray]:
    """What the exported graph computes, in PyTorch, for preprocessed photos and their titles."""
    from export.onnx_export import run_torch

    return run_torch(net, arrays, net.title.tokenizer.batch(titles))


def version_dir(title_export) -> Path:
    return title_export[1].version_dir


# --- the export -----------------------------------------------------------------------------------------
def test_the_graph_takes_image_and_title_ids_with_a_dynamic_batch_and_ends_with_the_conflict_scores(
    title_export, net
):
    model = onnx.load(version_dir(title_export) / "model.onnx")
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["image", "title"]
    assert inputs["title"].elem_type == onnx.TensorProto.INT64
    dims = [d.dim_param or d.dim_value for d in inputs["title"].shape.dim]
    assert isinstance(dims[0], str) and dims[1] == net.title.tokenizer.max_tokens == 24
    names = [o.name for o in model.graph.output]
    assert names == [*(a.tensor for a in net.schema.attributes), "conflict"]

    from export.runtimes import run_all
    from export.sessions import SessionSpec, open_session

    session = open_session(SessionSpec(), version_dir(title_export) / "model.onnx")
    assert session.title_tokens == 24
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, TITLE_SIZE, TITLE_SIZE, 3), dtype=np.uint8)
    titles = ["Red Square Tee", None, "Blue", "", "Brand 6 Green Round Tee"]
    for got, want in zip(run_all(session, images, titles=net.title.tokenizer.batch(titles)),
                         torch_outputs(net, images, titles), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # No titles at all is the same as all-zero ids, and the same as a model given no title input.
    for got, want in zip(session(images), torch_outputs(net, images, [None] * 5), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert not session(images)[-1].any()  # no title: no conflict


def test_parity_is_checked_with_and_without_titles_on_photos_that_carry_their_titles(title_export, net):
    _, result = title_export
    record = result.record
    assert record.photos.gate.titles == record.photos.gate.images == 12  # every catalogue photo has one
    parity = record.parity
    assert len(parity.attributes) == len(parity.without_title) == len(net.schema.attributes)
    assert parity.conflict_max_abs_diff is not None and parity.max_abs_diff <= parity.tolerance_abs
    # The gate compared the conflict flag too, on the photos sent with their titles (with and without).
    verdict = result.gates["onnxruntime-fp32"]
    assert verdict.images == 24
    flag = verdict.attribute("baseColour").flag("conflict")
    assert flag is not None and flag.threshold == CONFLICT_THRESHOLD and flag.agreement == 1.0
    assert flag.images + flag.at_threshold == 12


def test_metadata_declares_the_title_input_its_tokenizer_limit_and_conflict_thresholds(title_export, net):
    repo, result = title_export
    meta = load_metadata(repo, "fashion", result.version)
    assert meta.title is not None
    assert meta.title.tokenizer == net.title.tokenizer  # the hand-set one: words only, 24 tokens
    assert meta.title.input == "title" and meta.title.max_chars == 300
    assert meta.title.conflict_output == "conflict" and meta.output_names[-1] == "conflict"
    assert meta.title.conflict_thresholds["baseColour"] == CONFLICT_THRESHOLD
    assert set(meta.title.conflict_thresholds) == {a.name for a in net.schema.attributes}


def test_every_triton_config_has_the_title_input_the_conflict_output_and_a_zero_title_warmup(
    title_export, net
):
    repo, _ = title_export
    attributes = len(net.schema.attributes)
    configs = [repo / "fashion" / "config.pbtxt", *sorted((repo / "fashion" / "configs").glob("*.pbtxt"))]
    names = {p.stem for p in configs}
    assert {"config", "cpu", "cpu_onnxruntime_fp32", "gpu_fp16"} <= names
    for path in configs:
        text = path.read_text()
        title = re.search(r'name: "title"\s+data_type: TYPE_INT64\s+dims: \[ 24 \]', text)
        conflict = re.search(rf'name: "conflict"\s+data_type: TYPE_FP32\s+dims: \[ {attributes} \]', text)
        warmup = re.search(
            r'key: "title"\s+value: \{\s+data_type: TYPE_INT64\s+dims: \[ 24 \]\s+zero_data: true', text
        )
        assert title and conflict and warmup, path


def test_int8_and_fp16_keep_the_title_branch_its_heads_and_the_conflict_in_fp32(title_export, title_int8):
    from export.precision import fp32_tail

    folder = version_dir(title_export)
    int8 = onnx.load(title_int8 / "model.int8.onnx")
    tail = set(fp32_tail(int8))
    title_nodes = {n.name for n in int8.graph.node if n.name.startswith(("/title/", "/title_heads/"))}
    assert title_nodes and title_nodes <= tail
    dequantized = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n.name for n in int8.graph.node if n.name in tail and set(n.input) & dequantized]
    assert not quantized
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)  # the backbone is quantised
    calibration = load_export_record(title_int8.parent.parent, "fashion").photos.calibration
    assert (
        calibration is not None and calibration.titles == calibration.images == 16
    )  # calibrated with titles

    fp16 = onnx.load(folder / "model.fp16.onnx")
    readers = {i for n in fp16.graph.node if n.name in set(fp32_tail(fp16)) for i in n.input}
    kept = [t for t in fp16.graph.initializer if t.name in readers]
    floats = [t for t in kept if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT for t in floats)  # no FP16 weight in the tail
    embedding = [t for t in fp16.graph.initializer if tuple(t.dims) == (4096, 8)]
    assert len(embedding) == 1 and embedding[0].data_type == onnx.TensorProto.FLOAT


# --- served by the real Triton and gunicorn --------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(stack_factory, title_export, tmp_path_factory):
    repo, _ = title_export
    return stack_factory(repo, tmp_path_factory.mktemp("title-stack"))


@pytest.fixture(scope="module")
def gateway_url(stack):
    with stack.gateway("titles", workers=2, timeout_s=30) as gateway:
        yield gateway.url


def post(url: str, body: bytes, content_type: str, path: str = "/v1/predict") -> tuple[int, dict]:
    """(status, decoded JSON body) of a POST, sent as a careful client does: it stops sending when the
    gateway answers early (a refused 10 MB title), and reads that answer (``tests.test_hostile.exchange``)."""
    from tests.test_hostile import exchange, request_head

    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close"}
    outcome = exchange(int(url.rsplit(":", 1)[1]), request_head(path, headers), [body], timeout_s=60)
    assert outcome.status is not None, f"{path}: the connection closed without an answer"
    assert outcome.headers.get("content-type", "").startswith("application/json"), outcome
    return outcome.status, json.loads(outcome.body)


def multipart(fields: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    """A multipart body from (name, bytes, filename) parts, the bytes sent as they are."""
    boundary = "title-serving-boundary"
    body = b""
    for name, data, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def predict(url: str, photo: bytes, title: str | None, top_k: int = 100) -> dict:
    fields = [("image", photo, "photo.jpg"), ("top_k", str(top_k).encode(), None)]
    if title is not None:
        fields.append(("title", title.encode(), None))
    status, body = post(url, *multipart(fields))
    assert status == 200, body
    return body


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_answers_with_and_without_titles_equal_pytorch_and_the_ids_are_the_trainers(
    stack, title_export, net, photos, protocol
):
    repo, _ = title_export
    server = stack.triton()
    url = {"grpc": server.grpc_url, "http": server.http_url}[protocol]
    client = FashionClient.connect(url, repository=repo, protocol=protocol)
    titles = [title for _, _, title in CASES]
    ids = client.title_ids([client.check_title(t) for t in titles])
    np.testing.assert_array_equal(ids, net.title.tokenizer.batch(titles))  # the gateway's ids: the trainer's
    arrays = np.stack([client.preprocess(p)[0] for p in photos])
    served = client.infer(arrays, ids)
    want = torch_outputs(net, arrays, titles)
    for name, expected in zip(client.metadata.output_names, want, strict=True):
        np.testing.assert_allclose(served[name], expected, rtol=0, atol=ATOL, err_msg=name)
    plain = client.infer(arrays)  # no titles: zeros, the image-only answer
    for name, expected in zip(
        client.metadata.output_names, torch_outputs(net, arrays, [None] * len(CASES)), strict=True
    ):
        np.testing.assert_allclose(plain[name], expected, rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.server
def test_the_gateway_answers_equal_pytorch_and_flag_a_title_that_names_another_colour(
    gateway_url, title_export, net, photos
):
    repo, _ = title_export
    client = FashionClient.connect("unused:1", repository=repo)  # for its preprocessing only
    arrays = np.stack([client.preprocess(p)[0] for p in photos])
    titles = [title for _, _, title in CASES]
    want = torch_outputs(net, arrays, titles)
    conflict = want[-1]
    j = [a.name for a in net.schema.attributes].index("baseColour")
    for i, (photo, (colour, _, title)) in enumerate(zip(photos, CASES, strict=True)):
        body = predict(gateway_url, photo, title)
        titled = bool(title)
        assert body["inputs"] == (["image", "title"] if titled else ["image"]), (i, body["inputs"])
        for k, a in enumerate(net.schema.attributes):
            answer = body["predictions"][a.name]
            got = {t["label"]: t["confidence"] for t in answer["top_k"]}
            np.testing.assert_allclose([got[c] for c in a.classes], want[k][i], rtol=0, atol=ATOL)
            assert ("conflict" in answer) is titled
        colour_answer = body["predictions"]["baseColour"]
        assert colour_answer["label"] == colour, (i, colour_answer)  # the photo's colour, by hand
        if titled:
            names_other = any(c in title.split() for c in COLOURS if c != colour)
            assert colour_answer["conflict"] is names_other, (i, title, conflict[i, j])
            assert colour_answer["conflict"] is bool(conflict[i, j] > CONFLICT_THRESHOLD)


@pytest.mark.server
def test_concurrent_requests_with_and_without_titles_answer_as_one_at_a_time(gateway_url, photos):
    jobs = [(photos[i % len(photos)], CASES[i % len(CASES)][2] if i % 3 else None) for i in range(32)]
    alone = [predict(gateway_url, photo, title, top_k=3) for photo, title in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: predict(gateway_url, *job, top_k=3), jobs))
    for a, b in zip(alone, together, strict=True):
        assert a["inputs"] == b["inputs"]
        for name, p in a["predictions"].items():
            q = b["predictions"][name]
            assert (p["label"], p.get("conflict"), p["uncertain"]) == (
                q["label"],
                q.get("conflict"),
                q["uncertain"],
            )
            np.testing.assert_allclose(p["confidence"], q["confidence"], rtol=0, atol=1e-5)


def triton_counts(metrics_url: str) -> tuple[float, float]:
    """(requests, model executions) of the model so far, from Triton's Prometheus metrics, once two reads
    0.3 s apart agree (a request's counters appear a moment after its answer)."""

    def read() -> tuple[float, float]:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            lines = response.read().decode().splitlines()

        def total(name: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))

        return total("nv_inference_request_success"), total("nv_inference_exec_count")

    last = read()
    for _ in range(50):
        time.sleep(0.3)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"Triton's counters kept moving: {last}")


@pytest.mark.server
def test_the_dynamic_batcher_puts_a_request_with_a_title_and_one_without_into_one_batch(
    stack_factory, title_export, photos, net, tmp_path
):
    """A batcher that waits up to 0.5 s for a second request: each pair sent together runs as one batch
    (one execution for two requests), and each answer is what it is alone."""
    repo, _ = title_export
    slow = tmp_path / "repo"
    shutil.copytree(repo, slow)
    config = slow / "fashion" / "configs" / "cpu.pbtxt"
    text = re.sub(r"preferred_batch_size: \[[^\]]*\]", "preferred_batch_size: [ 2 ]", config.read_text())
    config.write_text(
        re.sub(r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 500000", text)
    )
    server = stack_factory(slow, tmp_path).triton()
    try:
        client = FashionClient.connect(server.grpc_url, repository=slow, retry=None)
        pairs = [(0, 5), (1, 6), (3, 5)]  # (with a title, without one)
        alone = {i: client.predict(photos[i], title=CASES[i][2], top_k=3) for pair in pairs for i in pair}
        for with_title, without in pairs:
            before = triton_counts(server.metrics_url)
            barrier = threading.Barrier(2)

            def send(i: int, barrier: threading.Barrier = barrier) -> dict:
                barrier.wait()
                return client.predict(photos[i], title=CASES[i][2], top_k=3)

            with ThreadPoolExecutor(2) as pool:
                answers = dict(zip((with_title, without), pool.map(send, (with_title, without)), strict=True))
            requests, executions = np.subtract(triton_counts(server.metrics_url), before)
            assert (requests, executions) == (2, 1), "the two requests did not share a batch"
            assert answers[with_title]["inputs"] == ["image", "title"] and answers[without]["inputs"] == [
                "image"
            ]
            for i, answer in answers.items():
                for name, p in answer["predictions"].items():
                    q = alone[i]["predictions"][name]
                    assert (p["label"], p.get("conflict")) == (q["label"], q.get("conflict"))
                    np.testing.assert_allclose(p["confidence"], q["confidence"], rtol=0, atol=1e-5)
    finally:
        server.stop()


@pytest.mark.server
def test_hostile_titles_get_a_4xx_json_error_and_never_a_500(gateway_url, photos):
    photo = photos[0]

    def with_title(raw: bytes) -> tuple[bytes, str]:
        return multipart([("image", photo, "a.jpg"), ("title", raw, None)])

    cases = {
        "over-long": (with_title(b"x" * 301), 400, "title_too_long"),
        "not UTF-8": (with_title(b"Red \xff\xfe Tee"), 400, "invalid_title"),
        "NUL": (with_title(b"Red\x00Tee"), 400, "invalid_title"),
        "escape": (with_title(b"\x1b[2JRed"), 400, "invalid_title"),
        "10 MB field": (with_title(b"x" * 10_000_000), 413, "too_large"),
    }
    for name, ((body, content_type), status, code) in cases.items():
        got, answer = post(gateway_url, body, content_type)
        assert (got, answer["error"]["code"]) == (status, code), (name, answer)
    queries = {
        "over-long": ("x" * 301, 400, "title_too_long"),
        "not UTF-8": ("Red%FF%FETee", 400, "invalid_title"),
        "control": ("Red%07Tee", 400, "invalid_title"),
        "10 MB": ("x" * 10_000_000, 414, "uri_too_long"),
    }
    for name, (title, status, code) in queries.items():
        got, answer = post(gateway_url, photo, "image/jpeg", f"/v1/predict?title={title}")
        assert (got, answer["error"]["code"]) == (status, code), (name, answer)
    mismatch = multipart([("images", photo, "a.jpg"), ("images", photo, "b.jpg"), ("titles", b"Red", None)])
    got, answer = post(gateway_url, *mismatch, path="/v1/predict/batch")
    assert (got, answer["error"]["code"]) == (400, "title_count_mismatch")
    ok = predict(gateway_url, photo, f"Red Tee {quote('é')} ✓")  # and the workers are all still there
    assert ok["inputs"] == ["image", "title"]
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'status="500"' not in text


@pytest.mark.server
def test_every_tag_engine_sends_titles_and_writes_the_same_rows_with_conflict_columns(
    stack, gateway_url, title_export, photos, tmp_path
):
    from tagging.engines import EngineSpec
    from tagging.run import TagJob, tag
    from tagging.store import read_rows

    repo, _ = title_export
    lines = ["id,image,title"]
    for i, photo in enumerate(photos):
        (tmp_path / f"{i}.jpg").write_bytes(photo)
        title = CASES[i][2] or ""
        lines.append(f'{i},{i}.jpg,"{title}"')
    lines.append('99,9.jpg,"Blue Tee"')  # a missing file: an error row, not a failed job
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    specs = {
        "local": EngineSpec("local", repository=str(repo)),
        "triton": EngineSpec("triton", url=stack.triton().grpc_url, repository=str(repo)),
        "gateway": EngineSpec("gateway", url=gateway_url),
    }
    rows = {}
    for kind, spec in specs.items():
        tag(TagJob(manifest, tmp_path / kind, spec, progress=False), say=lambda text: None)
        rows[kind] = read_rows(tmp_path / kind)
    local = rows["local"]
    assert "baseColour_conflict" in local[0] and "gender_conflict" in local[0]
    by_id = {r["id"]: r for r in local}
    assert by_id["1"]["baseColour_conflict"] is True and by_id["0"]["baseColour_conflict"] is False
    assert by_id["5"]["baseColour_conflict"] is None and by_id["6"]["baseColour_conflict"] is None  # no title
    assert by_id["99"]["error"].startswith("unreadable_file")
    for kind in ("triton", "gateway"):
        assert [r["id"] for r in rows[kind]] == [r["id"] for r in local]
        for got, want in zip(rows[kind], local, strict=True):
            probabilities = [k for k in want if k.endswith("_probability")]
            assert {k: v for k, v in got.items() if k not in probabilities} == {
                k: v for k, v in want.items() if k not in probabilities
            }, kind
            if want["error"] is None:
                np.testing.assert_allclose(
                    [got[k] for k in probabilities], [want[k] for k in probabilities], atol=1e-5
                )


@pytest.mark.server
def test_the_load_tests_triton_clients_send_a_zero_title_to_a_model_that_reads_titles(
    stack, gateway_url, title_export, net, photos, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from fashion.cli import main
    from loadtest.bench import triton_client_factory

    repo, _ = title_export
    model = SimpleNamespace(repository=repo, schema=net.schema, jpegs=photos, preprocessing=net.preprocessing)
    send = triton_client_factory(stack.triton().grpc_url, model)()
    assert [send(i) for i in range(3)] == [1, 1, 1]  # Triton refuses a request that lacks the title input

    monkeypatch.setenv("FASHION_MODEL_REPOSITORY", str(repo))
    out = tmp_path / "report"
    command = ["loadtest", "--host", gateway_url, "--users", "2", "--spawn-rate", "2", "--duration", "4"]
    command += ["--triton-grpc", stack.triton().grpc_url, "--slo-p95-ms", "5000", "--out", str(out)]
    assert main(command) == 0, (out / "locust.log").read_text()[-3000:]
    endpoints = {e["name"]: e for e in json.loads((out / "summary.json").read_text())["endpoints"]}
    assert endpoints["triton infer"]["requests"] > 0 and endpoints["triton infer"]["failures"] == 0
