"""The load-test stage: the locustfile, ``fashion loadtest`` against a real stack, and ``fashion bench``.

The stack tests start the pip Triton with the tiny colour model of ``test_gateway_stack`` and the gateway
under gunicorn; ``fashion loadtest`` runs the real Locust against them for a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashion.cli import main
from loadtest.errors import SLO_EXIT_CODE
from loadtest.report import EndpointStats, Slo

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def stats(p95: float, failures: int = 0) -> list[EndpointStats]:
    row = EndpointStats("POST", "/v1/predict", 100, failures, 10.0, p95 / 2, p95, p95 * 1.5, p95 * 2)
    total = EndpointStats("", "Aggregated", 100, failures, 10.0, p95 / 2, p95, p95 * 1.5, p95 * 2)
    return [row, total]


def test_slo_breaches_name_the_endpoint_and_the_error_rate():
    slo = Slo(p95_ms=50, p99_ms=200, max_error_rate=0.01)
    assert slo.breaches(stats(40)) == []
    found = slo.breaches(stats(60, failures=5))
    assert found[0].startswith("POST /v1/predict: p95 60 ms > 50 ms")
    assert "error rate 5.00%" in found[1]
    assert Slo().breaches([]) == ["no request completed"]


def test_locustfile_imports_without_tritonclient_or_the_project():
    # What the Helm chart's Job does: the stock locust image has neither tritonclient nor this project.
    script = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, sys
        BLOCKED = ("tritonclient", "fashion", "numpy", "PIL", "training", "export")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        spec = importlib.util.spec_from_file_location("locustfile", {str(LOCUSTFILE)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["locustfile"] = module
        spec.loader.exec_module(module)
        pool = module.image_pool()
        assert pool[0][1][:2] == b"\\xff\\xd8", "the embedded fallback is a JPEG"
        assert module.Settings.from_env({{"FASHION_LOADTEST_SHAPE": "step"}}).shape == "step"
        names = (module.GatewayUser, module.TritonGrpcUser, module.FashionLoadShape)
        print("ok", *(c.__name__ for c in names))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "GatewayUser", "TritonGrpcUser", "FashionLoadShape"]


# ------------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def stack(colour_stack) -> Iterator[dict]:
    # Never import locust here: it monkey-patches the interpreter with gevent at import time, which
    # deadlocks a process that already runs threads (pytest's, tqdm's). It runs as a subprocess.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[loadtest]')")
    # 1 worker, 8 threads: 6 in-flight slots, so the 4 users never see a 429
    with colour_stack.gateway("loadtest", workers=1, threads=8) as gateway:
        yield {
            "url": gateway.url,
            "grpc": colour_stack.triton().grpc_url,
            "work": colour_stack.work,
            "repository": colour_stack.repository,
        }

@pytest.mark.server
def test_loadtest_writes_reports_and_returns_0_under_a_loose_slo(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MODEL_REPOSITORY", str(stack["repository"]))
    out = tmp_path / "report"
    code = main(
        [
            "loadtest",
            "--host",
            stack["url"],
            "--users",
            "4",
            "--spawn-rate",
            "4",
            "--duration",
            "6",
            "--triton-grpc",
            stack["grpc"],
            "--slo-p95-ms",
            "5000",
            "--max-error-rate",
            "0.01",
            "--out",
            str(out),
        ]
    )
    assert code == 0, (out / "locust.log").read_text()[-3000:]
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "report.html",
        "latency.png",
        "summary.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    names = {e["name"]: e for e in summary["endpoints"]}
    assert summary["passed"] and names["/v1/predict"]["requests"] > 0
    assert names["triton infer"]["type"] == "grpc" and names["triton infer"]["requests"] > 0
    assert names["Aggregated"]["failures"] == 0


@pytest.mark.server
def test_loadtest_exits_1_when_the_slo_is_impossible(stack, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "loadtest",
            "--host",
            stack["url"],
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--duration",
            "3",
            "--slo-p95-ms",
            "0.001",
            "--out",
            str(out),
        ]
    )
    assert code == SLO_EXIT_CODE == 1
    assert "SLO broken" in capsys.readouterr().err
    assert not json.loads((out / "summary.json").read_text())["passed"]
    assert (out / "report.html").is_file() and (out / "latency.png").is_file()


@pytest.mark.server
def test_bench_quick_with_a_tiny_model_writes_every_key(tmp_path):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--out",
            str(out),
            "--quick",
            "--backbone",
            "test_efficientnet",
            "--image-size",
            "64",
            "--images",
            "8",
            "--duration",
            "1",
            "--concurrency",
            "1,2",
        ]
    )
    assert code == 0
    doc = json.loads((out / "bench.json").read_text())
    for system in ("raw_onnxruntime", "triton", "gateway", "naive"):
        s = doc[system]
        assert s["throughput_ips"] > 0, system
        assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], system
    # Every CPU candidate alone; raw_best is the fastest that passed the export's accuracy gate.
    assert {"onnxruntime-fp32", "openvino-fp32"} <= set(doc["raw"])
    passed = {n: r for n, r in doc["raw"].items() if r.get("passed_gate")}
    fastest = max(passed.values(), key=lambda r: r["throughput_ips"])
    assert doc["raw_best"]["throughput_ips"] == fastest["throughput_ips"]
    assert (doc["raw_best"]["runtime"], doc["raw_best"]["precision"]) == (
        fastest["runtime"],
        fastest["precision"],
    )
    assert doc["raw_onnxruntime"]["throughput_ips"] == doc["raw"]["onnxruntime-fp32"]["throughput_ips"]
    assert set(doc["ratios"]) == {
        "gateway_over_raw_best",
        "gateway_over_raw_onnxruntime",
        "gateway_over_naive",
        "gateway_added_p50_ms",
    }
    assert doc["ratios"]["gateway_over_raw_best"] > 0 and doc["ratios"]["gateway_over_naive"] > 0
    assert math.isfinite(doc["ratios"]["gateway_added_p50_ms"])
    rounds = doc["added_latency"]["rounds"]  # Triton direct and the gateway, alternating at c=1
    assert len(rounds) == 2 and all(r["triton_p50_ms"] > 0 and r["gateway_p50_ms"] > 0 for r in rounds)
    memory = doc["memory"]
    assert memory["triton"]["total_mb"] > 0 and memory["naive_mb"] > 0
    assert len(memory["gateway_workers_mb"]) == 2 and all(m > 0 for m in memory["gateway_workers_mb"])
    # Each target says whether it is met and, when not, by how much.
    assert len(doc["targets"]) == 4
    for target in doc["targets"].values():
        assert target["met"] in (True, False) and (target["met"] or target["missed_by"])
    # The CPU budget: every process's share per image, with Triton's formed batches.
    budget = doc["cpu_budget"]
    assert budget["images"] > 0 and budget["mean_batch_size"] >= 1
    assert [r["part"].split(":")[0] for r in budget["rows"]][:2] == ["client (load generator", "gateway"]
    assert budget["total_cpu_ms_per_image"] == pytest.approx(
        sum(r["cpu_ms_per_image"] for r in budget["rows"]), abs=0.1
    )
    rows = doc["preprocess"]["images"]
    assert [r["image"] for r in rows][-1] == "camera 3000x4000"
    assert all(r["preprocess_p50_ms"] > 0 and r["preprocess_over_model"] > 0 for r in rows)
    assert "validation photos" in doc["setup"]["image_source"]
    text = (out / "bench.md").read_text()
    assert "| gateway " in text and "| camera 3000x4000 " in text and "CPU budget" in text


def test_a_negative_rest_of_the_budget_is_explained_not_shown_bare():
    from loadtest.bench import budget_notes

    rows = [
        {"part": "model: openvino-int8 alone at batch 2.35 (interpolated)", "cpu_ms_per_image": 19.31},
        {"part": "Triton python backend: IPC (rest of the model process)", "cpu_ms_per_image": -2.64},
    ]
    notes = budget_notes(rows)
    assert "Negative: Triton python backend" in notes[-1] and "measured alone" in notes[-1]
    assert budget_notes([{**rows[1], "cpu_ms_per_image": 0.5}]) == []


def test_sweep_keeps_the_fastest_setting_that_meets_the_slo_and_writes_its_queue_bound(tmp_path, monkeypatch):
    """The coordinate search over measured settings (the measuring itself is the bench test's job)."""
    from fashion.schema import Attribute, LabelSchema
    from loadtest import sweep

    def fake_measure(model, opts, work, setting):
        # 2 instances are faster but break the SLO; 1000 µs of queue delay and 2 workers help.
        ips = (
            40.0
            + (10 if setting.max_queue_delay_us == 1000 else 0)
            + (30 if setting.cpu_instances == 2 else 0)
        )
        ips += 5 if setting.workers == 2 else 0
        p95 = 150.0 if setting.cpu_instances == 2 else 80.0
        met = p95 <= opts.slo_p95_ms
        best = {"concurrency": 8, "throughput_ips": ips, "p95_ms": p95}
        return {
            "setting": setting.__dict__,
            "score_ips": ips if met else 0.0,
            "slo_p95_met": met,
            "best": best,
            "points": [best],
            "serving": {
                "max_queue_delay_us": setting.max_queue_delay_us,
                "cpu_instances": setting.cpu_instances,
            },
        }

    monkeypatch.setattr(sweep, "measure", fake_measure)
    schema = LabelSchema((Attribute("colour", ("red", "blue")),))
    import numpy as np

    from export.sessions import SessionSpec
    from fashion.contract import Preprocessing
    from loadtest.bench import BenchOptions
    from loadtest.measure import BenchModel

    opts = BenchOptions(out=tmp_path, backbone="test_efficientnet", slo_p95_ms=100.0)
    chosen = {"runtime": "openvino", "precision": "int8"}
    model = BenchModel(
        repository=tmp_path / "repo",
        version_dir=tmp_path / "repo" / "fashion" / "1",
        checkpoint=tmp_path / "model.pt",
        jpegs=[b""],
        arrays=np.zeros((1, 32, 32, 3), np.uint8),
        heads=1,
        preprocessing=Preprocessing(image_size=32),
        schema=schema,
        description="a stand-in model: the measuring is faked above",
        image_source="none",
        chosen=SessionSpec(chosen["runtime"], chosen["precision"]),
    )
    doc = sweep.run_sweep(model, opts, tmp_path)
    assert doc["recommended"]["max_queue_delay_us"] == 1000
    assert doc["recommended"]["cpu_instances"] == 1 and doc["recommended"]["workers"] == 2
    env = (tmp_path / "recommended" / "gunicorn.env").read_text()
    assert "FASHION_MAX_INFLIGHT=4\n" in env  # concurrency 8 over 2 workers
    recommended = (tmp_path / "recommended" / "configs" / "cpu.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 1000" in recommended
    assert "model.int8.onnx" in recommended and '"openvino"' in recommended  # the served candidate
    assert "| 1000 " in (tmp_path / "sweep.md").read_text()
