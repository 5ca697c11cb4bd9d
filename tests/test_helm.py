"""The Helm chart (helm/fashion-tagger), its TensorRT build script and the Dockerfiles, checked offline.

- Rendering and linting use Helm's own Go SDK through ``helm_python`` (helm-python-sdk), in a process of
  its own (``tests/helm_worker.py``): no helm binary.
- Every rendered object is validated with ``kubernetes_validate`` against the Kubernetes JSON schemas the
  package bundles (strict: unknown fields are errors). The ServiceMonitor CRD has no bundled schema and is
  checked structurally instead.
- The assertions read the rendered objects, so a broken template fails here, not in a cluster.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fashion-tagger"
SCRIPT = ROOT / "scripts" / "build_trt_plan.sh"
RELEASE, NAMESPACE = "demo", "ml"
PREFIX = f"{RELEASE}-fashion-tagger"
TRITON, GATEWAY = f"{PREFIX}-triton", f"{PREFIX}-gateway"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
# The oldest Kubernetes the chart targets that the package bundles, and the newest it bundles.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor"}  # no schema bundled with kubernetes-validate

LOCUSTFILE = (
    "from locust import HttpUser, task\n\n\n"
    "class GatewayUser(HttpUser):\n"
    "    @task\n"
    "    def ready(self):\n"
    "        self.client.get('/readyz')\n"
)
GPU = {"triton": {"gpu": {"enabled": True}}}
TRT = {"triton": {"gpu": {"enabled": True}}, "tensorrt": {"enabled": True}}
PVC = {"modelRepository": {"source": "pvc", "pvc": {"claimName": "fashion-models", "subPath": "repo"}}}
OBJECT_STORE = {
    "modelRepository": {
        "source": "objectStore",
        "objectStore": {"url": "s3://models-bucket/fashion", "existingSecret": "model-store"},
    },
    "gateway": {"metadata": {"source": "configMap", "configMap": {"name": "fashion-metadata"}}},
}


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge value overrides (later wins), like several -f files."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default-cpu": {},
    "cpu-profile": {"triton": {"profile": "cpu"}},
    "gpu": GPU,
    "gpu-profile": merge(GPU, {"triton": {"profile": "gpu"}}),
    "tensorrt": TRT,
    "tensorrt-int8-pvc": merge(TRT, PVC, {"tensorrt": {"precision": "int8", "modelVersion": "3"}}),
    "autoscaling-off": {
        "gateway": {"autoscaling": {"enabled": False}},
        "triton": {"autoscaling": {"enabled": False}},
    },
    "autoscaling-on": {
        "gateway": {"autoscaling": {"enabled": True}},
        "triton": {"autoscaling": {"enabled": True}},
    },
    "ingress": {
        "gateway": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"secretName": "fashion-tls", "hosts": ["fashion-tagger.example.com"]}],
            }
        }
    },
    "object-store": OBJECT_STORE,
    "object-store-gcs": merge(
        OBJECT_STORE,
        {"modelRepository": {"objectStore": {"url": "gs://bucket/repo", "gcsCredentialsKey": "key.json"}}},
    ),
    "pvc": PVC,
    "loadtest": {"loadtest": {"enabled": True, "locustfile": LOCUSTFILE}},
    "everything": merge(
        TRT,
        PVC,
        {
            "triton": {"autoscaling": {"enabled": True}, "gpu": {"runtimeClassName": "nvidia"}},
            "gateway": {
                "ingress": {"enabled": True},
                "apiKeys": {"keys": ["k1", "k2"]},
                "tritonProtocol": "http",
            },
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
            "loadtest": {"enabled": True, "locustfile": LOCUSTFILE},
        },
    ),
}


# --- rendering -------------------------------------------------------------------------------------


class HelmValuesError(Exception):
    """helm_python's error for values the chart's schema rejects (raised again here from the worker)."""


class HelmRenderError(Exception):
    """helm_python's error for a template that fails (``fail`` in the chart) or does not render."""


class HelmWorker:
    """``tests/helm_worker.py``: Helm's Go SDK in its own process (see there why), one request at a time."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def call(self, op: str, **request: Any) -> Any:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("helm_worker.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, "chart": str(CHART), **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the helm worker exited with status {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            typed = {"HelmValuesError": HelmValuesError, "HelmRenderError": HelmRenderError}
            if reply["error"] in typed:
                raise typed[reply["error"]](reply["message"])
            raise RuntimeError(f"{reply['error']}: {reply['message']}")
        return reply["ok"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


HELM = HelmWorker()


@pytest.fixture(scope="module", autouse=True)
def _helm_worker_stopped_at_the_end() -> Any:
    yield
    HELM.stop()


def lint(values: dict[str, Any], **options: Any) -> dict[str, Any]:
    return HELM.call("lint", values=values, options=options)


def render_raw(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` would produce."""
    return HELM.call("render", values=values, name=RELEASE, namespace=NAMESPACE)


@functools.cache
def _render_set(name: str) -> tuple[list[dict[str, Any]], str]:
    raw = render_raw(VALUE_SETS[name])
    objects = [
        doc
        for path, text in sorted(raw.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    notes = next(text for path, text in raw.items() if path.endswith("NOTES.txt"))
    return objects, notes


def objects(name: str) -> list[dict[str, Any]]:
    return _render_set(name)[0]


def find(name: str, kind: str, obj_name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects(name)
        if o["kind"] == kind and (obj_name is None or o["metadata"]["name"] == obj_name)
    ]


def one(name: str, kind: str, obj_name: str) -> dict[str, Any]:
    found = find(name, kind, obj_name)
    assert len(found) == 1, f"{name}: expected one {kind}/{obj_name}, found {len(found)}"
    return found[0]


def pod_specs(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every workload: Deployments, Jobs, bare Pods (the helm test)."""
    specs = []
    for o in objects(name):
        if o["kind"] in ("Deployment", "Job"):
            specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
    return specs


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in all_containers(spec) if c["name"] == name]
    assert len(matches) == 1, (
        f"container {name} not found once in {[c['name'] for c in all_containers(spec)]}"
    )
    return matches[0]


def triton_spec(name: str) -> dict[str, Any]:
    return one(name, "Deployment", TRITON)["spec"]["template"]["spec"]


def gateway_spec(name: str) -> dict[str, Any]:
    return one(name, "Deployment", GATEWAY)["spec"]["template"]["spec"]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- lint, schema, Kubernetes validation --------------------------------------------------------------


def test_chart_metadata_is_helm_v2_with_an_app_version():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "fashion-tagger"
    assert meta["appVersion"] and meta["version"]
    for required in (
        "values.yaml",
        "values.schema.json",
        "README.md",
        "templates/NOTES.txt",
        "templates/_helpers.tpl",
    ):
        assert (CHART / required).is_file(), required


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_chart_lints_without_errors_or_warnings(value_set):
    report = lint(VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], json.dumps(report, indent=1)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_validates_against_the_kubernetes_schema(value_set):
    rendered = objects(value_set)
    assert len(rendered) >= 10
    for obj in rendered:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBE_VERSIONS[0], strict=True)
            continue  # checked structurally in test_service_monitors_scrape_both_metrics_endpoints
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{value_set}: {label} is invalid for Kubernetes {version}: {list(e.path)}: {e.message}"
                )


def test_the_validator_rejects_a_broken_manifest():
    """Control for the test above: the strict schemas do catch a wrong type and an unknown field."""
    deployment = json.loads(json.dumps(one("default-cpu", "Deployment", TRITON)))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    deployment = json.loads(json.dumps(one("default-cpu", "Deployment", TRITON)))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"gateway": {"replicaCount": "two"}}, "/gateway/replicaCount"),
        ({"tensorrt": {"precision": "fp8"}}, "/tensorrt/precision"),
        ({"tensorrt": {"precison": "fp16"}}, "precison"),
        ({"modelRepository": {"source": "nfs"}}, "/modelRepository/source"),
        ({"triton": {"resources": {"limits": None}}}, "limits"),  # null deletes the default
        ({"gateway": {"tritonProtocol": "websocket"}}, "/gateway/tritonProtocol"),
        ({"triton": {"profile": "openvino"}}, "/triton/profile"),
    ],
)
def test_values_schema_rejects_bad_values(override, message):
    with pytest.raises(HelmValuesError, match=re.escape(message)):
        render_raw(override)
    report = lint(override)
    assert report["errors"], "helm lint accepted values the schema must reject"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tensorrt": {"enabled": True}}, "needs triton.gpu.enabled=true"),
        (merge(TRT, OBJECT_STORE), "needs a file-system model repository"),
        (
            {"modelRepository": {"source": "objectStore", "objectStore": {"url": "s3://b/p"}}},
            "metadata.source=configMap",
        ),
        ({"modelRepository": {"source": "pvc"}}, "modelRepository.pvc.claimName"),
        (
            {"triton": {"probes": {"startup": {"periodSeconds": 10, "failureThreshold": 20}}}},
            "at least 300 s",
        ),
        ({"loadtest": {"enabled": True}}, "--set-file loadtest.locustfile"),
        (merge(TRT, {"tensorrt": {"optBatchSize": 64}}), "optBatchSize"),
        (
            {"gateway": {"maxInflight": 8, "threads": 8}},
            "gateway.maxInflight (8) must be below gateway.threads",
        ),
        (
            {"gateway": {"terminationGracePeriodSeconds": 30}},
            "gateway.terminationGracePeriodSeconds (30) must exceed gateway.preStopSleepSeconds (5) plus the "
            "drain (25 s",
        ),
        (
            {"triton": {"terminationGracePeriodSeconds": 30, "exitTimeoutSeconds": 30}},
            "triton.terminationGracePeriodSeconds (30) must exceed triton.exitTimeoutSeconds (30)",
        ),
    ],
)
def test_inconsistent_values_stop_rendering_with_a_clear_message(override, message):
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        render_raw(override)


def test_values_yaml_documents_every_value():
    """Every key in values.yaml has a comment right above it (or inline); list items are values."""
    undocumented = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    list_indent: int | None = None
    previous = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- "):
            list_indent = indent if list_indent is None or indent <= list_indent else list_indent
        elif list_indent is not None and indent > list_indent:
            pass  # a key inside a list item: part of a value
        elif re.match(r"[A-Za-z0-9_./-]+:", stripped):
            list_indent = None
            if not previous.startswith("#") and " # " not in stripped:
                undocumented.append(f"{number}: {stripped}")
        previous = stripped
    assert undocumented == [], "values without a comment:\n" + "\n".join(undocumented)


def _leaf_paths(
    values: dict[str, Any], schema: dict[str, Any], defs: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted paths of the values the schema describes field by field (free-form maps are leaves)."""
    paths = []
    for key, value in values.items():
        node = schema["properties"][key]
        if "$ref" in node:
            ref = node["$ref"].rsplit("/", 1)[-1]
            if ref == "resources":  # requests/limits documented as one value
                paths.append(prefix + key)
                continue
            node = defs[ref]
        if isinstance(value, dict) and node.get("properties"):
            paths += _leaf_paths(value, node, defs, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def test_every_value_is_in_the_schema_and_in_the_readme_table():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (ROOT / "helm" / "README.md").read_text()
    paths = _leaf_paths(values, schema, schema["definitions"])  # KeyError = a value missing from the schema
    assert len(paths) > 100
    missing = [p for p in paths if f"| `{p}` |" not in readme]
    assert missing == [], f"helm/README.md's values table lacks: {missing}"


def test_notes_tell_how_to_test_the_release():
    _, notes = _render_set("default-cpu")
    assert f"helm test {RELEASE}" in notes
    assert f"svc/{GATEWAY}" in notes


# --- Triton ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_triton_probes_hit_health_endpoints_with_room_to_load_models(value_set):
    triton = container(triton_spec(value_set), "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    startup, ready, live = triton["startupProbe"], triton["readinessProbe"], triton["livenessProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # readiness follows the served model: Triton's server readiness is false while a version (re)loads
    assert ready["httpGet"] == {"path": "/v2/models/fashion/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_triton_starts_in_explicit_mode_with_the_configured_models():
    args = container(triton_spec("default-cpu"), "triton")["args"]
    assert "--model-control-mode=explicit" in args
    assert [a for a in args if a.startswith("--load-model=")] == ["--load-model=fashion"]
    assert "--model-repository=/models" in args
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)

    args = container(triton_spec("tensorrt"), "triton")["args"]
    assert [a for a in args if a.startswith("--load-model=")] == [
        "--load-model=fashion",
        "--load-model=fashion_trt",
    ]
    assert [a for a in args if a.startswith("--model-repository=")] == [
        "--model-repository=/models",
        "--model-repository=/trt-models",
    ]

    custom = _render_custom({"triton": {"models": ["fashion", "fashion_v2"]}}, "Deployment", TRITON)
    args = container(custom, "triton")["args"]
    assert [a for a in args if a.startswith("--load-model=")] == [
        "--load-model=fashion",
        "--load-model=fashion_v2",
    ]


def _render_custom(values: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    docs = [
        d
        for p, t in render_raw(values).items()
        if not p.endswith("NOTES.txt")
        for d in yaml.safe_load_all(t)
        if d
    ]
    (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj["spec"]["template"]["spec"] if kind == "Deployment" else obj


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_dev_shm_is_an_in_memory_empty_dir(value_set):
    spec = triton_spec(value_set)
    mount = next(m for m in container(spec, "triton")["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_gpu_resources_and_placement_only_in_gpu_mode(value_set):
    gpu_mode = VALUE_SETS[value_set].get("triton", {}).get("gpu", {}).get("enabled", False)
    spec = triton_spec(value_set)
    for owner, other in pod_specs(value_set):
        for c in all_containers(other):
            wants_gpu = (
                gpu_mode and owner == f"Deployment/{TRITON}" and c["name"] in ("triton", "build-trt-plan")
            )
            for section in ("requests", "limits"):
                has = "nvidia.com/gpu" in c["resources"][section]
                assert has == wants_gpu, f"{value_set}: {owner} {c['name']} {section} GPU={has}"
    if gpu_mode:
        triton = container(spec, "triton")
        assert (
            triton["resources"]["limits"]["nvidia.com/gpu"]
            == triton["resources"]["requests"]["nvidia.com/gpu"]
            == 1
        )
        assert spec["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    else:
        assert "nodeSelector" not in spec and "tolerations" not in spec


# Value sets by the Triton profile they select (triton.profile, auto = gpu when triton.gpu.enabled).
CPU_PROFILE_SETS = sorted(
    n for n, v in VALUE_SETS.items() if not v.get("triton", {}).get("gpu", {}).get("enabled")
)
GPU_PROFILE_SETS = sorted(set(VALUE_SETS) - set(CPU_PROFILE_SETS))
OPENVINO_FLAG = "--model-config-name=openvino"


def _gpu_resources(spec: dict[str, Any]) -> list[str]:
    return [
        f"{c['name']} {section}"
        for c in all_containers(spec)
        for section in ("requests", "limits")
        if "nvidia.com/gpu" in c["resources"][section]
    ]


@pytest.mark.parametrize("value_set", CPU_PROFILE_SETS)
def test_cpu_profile_serves_configs_openvino_without_any_gpu(value_set):
    spec = triton_spec(value_set)
    args = container(spec, "triton")["args"]
    assert args.count(OPENVINO_FLAG) == 1
    assert not [a for a in args if a.startswith("--model-config-name") and a != OPENVINO_FLAG]
    assert "--allow-gpu-metrics=true" not in args
    assert _gpu_resources(spec) == []
    assert "runtimeClassName" not in spec and "nodeSelector" not in spec and "tolerations" not in spec
    _, notes = _render_set(value_set)
    assert "CPU profile: configs/openvino.pbtxt" in notes


@pytest.mark.parametrize("value_set", GPU_PROFILE_SETS)
def test_gpu_profile_serves_config_pbtxt_and_keeps_the_gpu_resource(value_set):
    spec = triton_spec(value_set)
    args = container(spec, "triton")["args"]
    assert not [a for a in args if a.startswith("--model-config-name")]
    assert "--allow-gpu-metrics=true" in args
    resources = container(spec, "triton")["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    _, notes = _render_set(value_set)
    assert "GPU profile: config.pbtxt" in notes and "openvino" not in notes


def test_gpu_profile_passes_a_model_config_name_from_extra_args_through_once():
    custom = _render_custom(
        merge(GPU, {"triton": {"extraArgs": ["--model-config-name=gpu_fp16"]}}), "Deployment", TRITON
    )
    args = container(custom, "triton")["args"]
    assert [a for a in args if a.startswith("--model-config-name")] == ["--model-config-name=gpu_fp16"]


def test_cpu_profile_requests_one_cpu_per_thread_the_export_configures():
    """configs/openvino.pbtxt runs one instance with INFERENCE_NUM_THREADS = `fashion export --threads`."""
    import argparse

    from export.cli import register

    commands = argparse.ArgumentParser().add_subparsers()
    register(commands)
    export_threads = commands.choices["export"].get_default("threads")
    requests = container(triton_spec("cpu-profile"), "triton")["resources"]["requests"]
    assert int(requests["cpu"]) == export_threads == 2
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(values["triton"]["resources"]["limits"]["cpu"]) >= export_threads


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"triton": {"profile": "cpu"}, "tensorrt": {"enabled": True}}, "cannot run in the CPU profile"),
        (merge(TRT, {"triton": {"profile": "cpu"}}), "cannot run in the CPU profile"),
        ({"tensorrt": {"enabled": True}}, "without a GPU triton.profile=auto selects the CPU profile"),
    ],
)
def test_cpu_profile_refuses_the_tensorrt_plan_builder(override, message):
    with pytest.raises(HelmRenderError, match=re.escape(message)) as failure:
        render_raw(override)
    assert "TensorRT is GPU-only" in str(failure.value)
    assert "tensorrt.enabled=false" in str(failure.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"triton": {"profile": "gpu"}}, "triton.profile=gpu needs triton.gpu.enabled=true"),
        (merge(TRT, {"triton": {"profile": "gpu", "gpu": {"enabled": False}}}), "triton.profile=gpu needs"),
        (merge(GPU, {"triton": {"profile": "cpu"}}), "triton.profile=cpu runs no GPU"),
        (
            {"triton": {"extraArgs": ["--model-config-name=cpu"]}},
            "the CPU profile sets --model-config-name=openvino itself",
        ),
    ],
)
def test_a_profile_that_contradicts_the_gpu_settings_stops_rendering(override, message):
    with pytest.raises(HelmRenderError, match=re.escape(message)):
        render_raw(override)


def _run_copy_script(value_set: str, tmp_path: Path, files: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs the Triton pod's copy-model-repository script on a fake image folder holding `files`."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on this machine")
    src, dst = tmp_path / "image-models", tmp_path / "model-repository"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text('name: "fashion"\n')
    dst.mkdir()
    script = container(triton_spec(value_set), "copy-model-repository")["args"][0]
    script = script.replace("/model-repository", str(dst))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SRC": str(src), "MODELS": "fashion"}
    return subprocess.run([sh, "-ec", script], capture_output=True, text=True, env=env, timeout=10)


def test_cpu_profile_startup_check_refuses_a_repository_without_configs_openvino(tmp_path):
    old_export = _run_copy_script("default-cpu", tmp_path / "old", ["fashion/config.pbtxt"])
    assert old_export.returncode != 0
    assert "fashion/configs/openvino.pbtxt is missing" in old_export.stderr
    assert "Re-export the model with a current `fashion export`" in old_export.stderr
    current = _run_copy_script(
        "default-cpu", tmp_path / "new", ["fashion/config.pbtxt", "fashion/configs/openvino.pbtxt"]
    )
    assert current.returncode == 0, current.stderr
    assert (tmp_path / "new" / "model-repository" / "fashion" / "configs" / "openvino.pbtxt").is_file()


def test_gpu_profile_startup_check_needs_only_config_pbtxt(tmp_path):
    gpu = _run_copy_script("gpu", tmp_path / "gpu", ["fashion/config.pbtxt"])
    assert gpu.returncode == 0, gpu.stderr
    missing = _run_copy_script("gpu", tmp_path / "none", ["fashion/1/model.onnx"])
    assert missing.returncode != 0 and "fashion/config.pbtxt is missing" in missing.stderr


def test_model_repository_from_a_packaged_image_is_copied_by_an_init_container():
    spec = triton_spec("default-cpu")
    copy = container(spec, "copy-model-repository")
    assert copy["image"] == "fashion-tagger-triton:0.1.0"
    assert env_of(copy)["SRC"] == "/models"
    volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
    assert "emptyDir" in volume
    mount = next(m for m in container(spec, "triton")["volumeMounts"] if m["name"] == "model-repository")
    assert mount == {"name": "model-repository", "mountPath": "/models", "readOnly": True}


def test_model_repository_from_a_pvc_is_mounted_read_only_in_triton_and_the_gateway():
    spec = triton_spec("pvc")
    volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
    assert volume["persistentVolumeClaim"]["claimName"] == "fashion-models"
    mount = next(m for m in container(spec, "triton")["volumeMounts"] if m["name"] == "model-repository")
    assert mount["readOnly"] is True and mount["subPath"] == "repo"
    assert [c["name"] for c in spec.get("initContainers", [])] == []

    gw = gateway_spec("pvc")
    gw_volume = next(v for v in gw["volumes"] if v["name"] == "model-repository")
    assert gw_volume["persistentVolumeClaim"] == {"claimName": "fashion-models", "readOnly": True}
    copy = container(gw, "copy-metadata")
    assert copy["image"] == "fashion-tagger-gateway:0.1.0"
    assert next(m for m in copy["volumeMounts"] if m["name"] == "model-repository")["readOnly"] is True


def test_model_repository_from_an_object_store_uses_secret_credentials():
    spec = triton_spec("object-store")
    triton = container(spec, "triton")
    assert "--model-repository=s3://models-bucket/fashion" in triton["args"]
    assert not any(v["name"] == "model-repository" for v in spec["volumes"])
    env = env_of(triton)
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_STORAGE_KEY",
    ):
        assert env[key]["secretKeyRef"] == {"name": "model-store", "key": key, "optional": True}

    gcs = triton_spec("object-store-gcs")
    triton = container(gcs, "triton")
    path = env_of(triton)["GOOGLE_APPLICATION_CREDENTIALS"]
    mount = next(m for m in triton["volumeMounts"] if m["name"] == "gcs-credentials")
    assert path == f"{mount['mountPath']}/key.json"
    volume = next(v for v in gcs["volumes"] if v["name"] == "gcs-credentials")
    assert volume["secret"]["secretName"] == "model-store"


# --- TensorRT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_trt_init_container_only_with_tensorrt_and_with_the_serving_image(value_set):
    spec = triton_spec(value_set)
    names = [c["name"] for c in spec.get("initContainers", [])]
    trt_on = VALUE_SETS[value_set].get("tensorrt", {}).get("enabled", False)
    assert ("build-trt-plan" in names) == trt_on
    has_script_map = bool(find(value_set, "ConfigMap", f"{PREFIX}-trt-script"))
    assert has_script_map == trt_on
    if not trt_on:
        return
    build = container(spec, "build-trt-plan")
    assert build["image"] == container(spec, "triton")["image"] == TRITON_IMAGE
    assert build["command"] == ["bash", "/opt/fashion-tagger/build_trt_plan.sh"]
    env = env_of(build)
    precision = VALUE_SETS[value_set]["tensorrt"].get("precision", "fp16")
    assert (
        env["PRECISION"] == precision
        and env["MODEL_NAME"] == "fashion"
        and env["TRT_MODEL_NAME"] == "fashion_trt"
    )
    assert env["OUTPUT_DIR"] == "/trt-models" and env["CACHE_DIR"] == "/models/.trt-cache"
    mounts = {m["name"]: m for m in build["volumeMounts"]}
    assert not mounts["model-repository"].get("readOnly", False)  # the plan cache is written there
    script_volume = next(v for v in spec["volumes"] if v["name"] == mounts["trt-script"]["name"])
    config_map = one(value_set, "ConfigMap", script_volume["configMap"]["name"])
    assert config_map["data"]["build_trt_plan.sh"] == SCRIPT.read_text()
    # The gateway talks to the TensorRT model and finds its metadata under that name.
    gateway = container(gateway_spec(value_set), "gateway")
    assert env_of(gateway)["FASHION_MODEL_NAME"] == "fashion_trt"
    # ... at the one version the plan is built for.
    assert env_of(gateway)["FASHION_MODEL_VERSION"] == VALUE_SETS[value_set]["tensorrt"].get(
        "modelVersion", ""
    )
    copy = env_of(container(gateway_spec(value_set), "copy-metadata"))
    assert (copy["SRC_MODEL"], copy["DST_MODEL"]) == ("fashion", "fashion_trt")


def test_chart_copy_of_the_trt_script_is_identical_to_the_canonical_one():
    assert (CHART / "files" / "build_trt_plan.sh").read_bytes() == SCRIPT.read_bytes()


# --- gateway --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_gateway_probes_env_and_metadata(value_set):
    spec = gateway_spec(value_set)
    gw = container(spec, "gateway")
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gw["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gw["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    env = env_of(gw)
    protocol = VALUE_SETS[value_set].get("gateway", {}).get("tritonProtocol", "grpc")
    assert env["FASHION_TRITON_PROTOCOL"] == protocol
    assert env["FASHION_TRITON_URL"] == f"{TRITON}:{8001 if protocol == 'grpc' else 8000}"
    for key in (
        "FASHION_MODEL_NAME", "FASHION_MODEL_VERSION", "FASHION_TIMEOUT_S", "FASHION_MAX_IMAGE_BYTES",
        "FASHION_MAX_BATCH_IMAGES", "FASHION_MAX_INFLIGHT", "FASHION_WORKERS", "FASHION_THREADS",
    ):  # fmt: skip
        assert key in env, key
    assert env["FASHION_PORT"] == "8080"
    assert env["FASHION_MAX_IMAGE_BYTES"] == "10485760"  # not 1.048576e+07
    # Prometheus multiprocess dir: a writable emptyDir at /tmp/prometheus.
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/prometheus"
    mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp/prometheus"]] and "emptyDir" in volumes[mounts["/tmp"]]
    # Metadata: a folder holding <model>/<version>/metadata.json.
    metadata = volumes[mounts[env["FASHION_MODEL_REPOSITORY"]]]
    if VALUE_SETS[value_set].get("gateway", {}).get("metadata", {}).get("source") == "configMap":
        assert metadata["configMap"]["name"] == "fashion-metadata"
        assert metadata["configMap"]["items"] == [{"key": "metadata.json", "path": "fashion/1/metadata.json"}]
    else:
        assert "emptyDir" in metadata
        copy = container(spec, "copy-metadata")
        assert any(m["name"] == mounts[env["FASHION_MODEL_REPOSITORY"]] for m in copy["volumeMounts"])


def graceful_timeout_s(timeout_s: float, queue_wait_s: float) -> int:
    """gunicorn's graceful_timeout as gateway/gunicorn_conf.py computes it (in a subprocess: importing it sets
    PROMETHEUS_MULTIPROC_DIR)."""
    env = {**os.environ, "FASHION_TIMEOUT_S": str(timeout_s), "FASHION_QUEUE_WAIT_S": str(queue_wait_s)}
    code = "import gateway.gunicorn_conf as c; print(c.graceful_timeout)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_gateway_pods_leave_the_service_then_get_sigterm_with_time_to_drain(value_set):
    """Kubernetes stops a pod with its preStop hook, then the image's stop signal to PID 1, then SIGKILL after
    terminationGracePeriodSeconds. The gateway: a sleep while the endpoint removal propagates, SIGTERM to
    gunicorn (the image's CMD, no command override), and a grace longer than both."""
    spec = gateway_spec(value_set)
    gw = container(spec, "gateway")
    assert "command" not in gw and "args" not in gw  # the image's exec-form CMD: gunicorn is PID 1
    assert gw["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    env = env_of(gw)
    drain_s = graceful_timeout_s(float(env["FASHION_TIMEOUT_S"]), float(env["FASHION_QUEUE_WAIT_S"]))
    assert spec["terminationGracePeriodSeconds"] > 5 + drain_s
    # /readyz turns 503 "draining" on SIGTERM: the readiness probe agrees with the preStop.
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    lines = _instructions(ROOT / "docker" / "gateway.Dockerfile")
    assert "STOPSIGNAL SIGTERM" in lines and lines[-1].startswith('CMD ["gunicorn"')


@pytest.mark.parametrize(("timeout_s", "queue_wait_s"), [(10, 0.25), (30, 2.0)])
def test_the_charts_drain_bound_is_gunicorns_graceful_timeout(timeout_s, queue_wait_s):
    drain_s = graceful_timeout_s(timeout_s, queue_wait_s)
    values = {"timeoutS": timeout_s, "queueWaitS": queue_wait_s, "preStopSleepSeconds": 5}
    with pytest.raises(HelmRenderError, match=r"must exceed gateway\.preStopSleepSeconds"):
        render_raw({"gateway": {**values, "terminationGracePeriodSeconds": 5 + drain_s}})
    rendered = render_raw({"gateway": {**values, "terminationGracePeriodSeconds": 5 + drain_s + 1}})
    assert f"terminationGracePeriodSeconds: {5 + drain_s + 1}" in "".join(rendered.values())


def test_no_prestop_when_its_sleep_is_zero():
    raw = render_raw({"gateway": {"preStopSleepSeconds": 0}})
    deployment = next(text for path, text in raw.items() if path.endswith("gateway-deployment.yaml"))
    assert "preStop" not in deployment


def test_triton_gets_an_exit_timeout_shorter_than_its_grace():
    spec = triton_spec("default-cpu")
    args = container(spec, "triton")["args"]
    assert "--exit-timeout-secs=30" in args and spec["terminationGracePeriodSeconds"] == 60


def test_api_keys_come_from_a_secret():
    env = env_of(container(gateway_spec("everything"), "gateway"))
    ref = env["FASHION_API_KEYS"]["secretKeyRef"]
    secret = one("everything", "Secret", ref["name"])
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "k1,k2"
    assert "FASHION_API_KEYS" not in env_of(container(gateway_spec("default-cpu"), "gateway"))


def test_services_expose_triton_http_grpc_metrics_and_the_gateway():
    triton = one("default-cpu", "Service", TRITON)
    assert {p["name"]: p["port"] for p in triton["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    pod_labels = one("default-cpu", "Deployment", TRITON)["spec"]["template"]["metadata"]["labels"]
    assert selects(triton["spec"]["selector"], pod_labels)
    gateway = one("default-cpu", "Service", GATEWAY)
    assert [(p["name"], p["port"], p["targetPort"]) for p in gateway["spec"]["ports"]] == [
        ("http", 8080, "http")
    ]
    gw_labels = one("default-cpu", "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    assert selects(gateway["spec"]["selector"], gw_labels) and not selects(
        gateway["spec"]["selector"], pod_labels
    )


def test_ingress_routes_to_the_gateway_service():
    assert find("default-cpu", "Ingress") == []
    ingress = one("ingress", "Ingress", GATEWAY)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "fashion-tls"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": GATEWAY, "port": {"number": 8080}}


# --- scaling and availability ---------------------------------------------------------------------------


def test_hpas_scale_the_gateway_on_cpu_and_triton_on_queue_time():
    gateway = one("autoscaling-on", "HorizontalPodAutoscaler", GATEWAY)
    assert gateway["apiVersion"] == "autoscaling/v2"
    assert gateway["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": GATEWAY,
    }
    assert gateway["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]
    triton = one("autoscaling-on", "HorizontalPodAutoscaler", TRITON)
    assert triton["spec"]["scaleTargetRef"]["name"] == TRITON
    (metric,) = triton["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_queue_duration_us_per_request"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "20000"}
    assert find("autoscaling-off", "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_deployments_have_replicas_only_without_an_hpa(value_set):
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in find(value_set, "HorizontalPodAutoscaler")}
    for deployment in find(value_set, "Deployment"):
        scaled = deployment["metadata"]["name"] in hpa_targets
        assert ("replicas" in deployment["spec"]) != scaled, deployment["metadata"]["name"]
    off = {d["metadata"]["name"]: d["spec"].get("replicas") for d in find("autoscaling-off", "Deployment")}
    assert off == {TRITON: 1, GATEWAY: 2}


@pytest.mark.parametrize("value_set", ["default-cpu", "everything"])
def test_pdbs_and_topology_spread_select_their_own_pods(value_set):
    for name in (TRITON, GATEWAY):
        deployment = one(value_set, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        other = one(value_set, "Deployment", GATEWAY if name == TRITON else TRITON)
        other_labels = other["spec"]["template"]["metadata"]["labels"]
        pdb = one(value_set, "PodDisruptionBudget", name)
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
        assert not selects(pdb["spec"]["selector"]["matchLabels"], other_labels)
        constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert constraints and {"kubernetes.io/hostname"} <= {c["topologyKey"] for c in constraints}
        for c in constraints:
            assert selects(c["labelSelector"]["matchLabels"], labels)
            assert not selects(c["labelSelector"]["matchLabels"], other_labels)


# --- resources and security -----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_container_has_cpu_and_memory_requests_and_limits(value_set):
    specs = pod_specs(value_set)
    assert len(specs) >= 3  # triton, gateway, helm test pod
    for owner, spec in specs:
        for c in all_containers(spec):
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(section, {})), (
                    f"{owner} {c['name']} {section}"
                )


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_pod_runs_non_root_read_only_without_privileges(value_set):
    for owner, spec in pod_specs(value_set):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, owner
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, owner
        assert spec["automountServiceAccountToken"] is False, owner
        for c in all_containers(spec):
            sc = c["securityContext"]
            label = f"{owner} {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], label
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, label
            assert sc["runAsNonRoot"] is True, label
    assert triton_spec(value_set)["securityContext"]["runAsUser"] == 1000  # the NGC image's triton-server
    assert gateway_spec(value_set)["securityContext"]["runAsUser"] == 10001  # docker/gateway.Dockerfile


@pytest.mark.parametrize("value_set", ["default-cpu", "everything"])
def test_service_accounts_do_not_mount_tokens(value_set):
    accounts = {sa["metadata"]["name"]: sa for sa in find(value_set, "ServiceAccount")}
    assert set(accounts) == {TRITON, GATEWAY}
    for sa in accounts.values():
        assert sa["automountServiceAccountToken"] is False
    assert triton_spec(value_set)["serviceAccountName"] == TRITON
    assert gateway_spec(value_set)["serviceAccountName"] == GATEWAY


@pytest.mark.parametrize("value_set", ["default-cpu", "everything"])
def test_network_policy_lets_only_gateway_pods_and_the_scraper_reach_triton(value_set):
    policy = one(value_set, "NetworkPolicy", TRITON)
    triton_labels = one(value_set, "Deployment", TRITON)["spec"]["template"]["metadata"]["labels"]
    gateway_labels = one(value_set, "Deployment", GATEWAY)["spec"]["template"]["metadata"]["labels"]
    test_pod_labels = one(value_set, "Pod", f"{PREFIX}-test")["metadata"]["labels"]
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], triton_labels)
    assert not selects(spec["podSelector"]["matchLabels"], gateway_labels)
    assert spec["policyTypes"] == ["Ingress"]
    inference, metrics = spec["ingress"]
    assert {p["port"] for p in inference["ports"]} == {8000, 8001}
    (peer,) = inference["from"]
    assert set(peer) == {"podSelector"}  # same namespace only
    assert selects(peer["podSelector"]["matchLabels"], gateway_labels)
    assert not selects(peer["podSelector"]["matchLabels"], triton_labels)
    assert not selects(peer["podSelector"]["matchLabels"], test_pod_labels)
    assert [p["port"] for p in metrics["ports"]] == [8002]
    (scraper,) = metrics["from"]
    assert scraper == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    # Any Prometheus in the "observability" namespace (null removes the default pod selector).
    observability = {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}
    custom = _render_custom(
        {"networkPolicy": {"metricsScraper": {"namespaceSelector": observability, "podSelector": None}}},
        "NetworkPolicy",
        TRITON,
    )
    assert custom["spec"]["ingress"][1]["from"] == [{"namespaceSelector": observability}]


def test_service_monitors_scrape_both_metrics_endpoints():
    assert find("default-cpu", "ServiceMonitor") == []
    monitors = {m["metadata"]["name"]: m for m in find("everything", "ServiceMonitor")}
    assert set(monitors) == {TRITON, GATEWAY}
    expected_port = {TRITON: ("metrics", 8002), GATEWAY: ("http", 8080)}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        service = one("everything", "Service", name)
        assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
        other = one("everything", "Service", GATEWAY if name == TRITON else TRITON)
        assert not selects(spec["selector"]["matchLabels"], other["metadata"]["labels"])
        (endpoint,) = spec["endpoints"]
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        port_name, number = expected_port[name]
        assert endpoint["port"] == port_name and ports[port_name] == number
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(
            r"\d+s", endpoint["scrapeTimeout"]
        )


# --- helm test and load test ----------------------------------------------------------------------------


def test_helm_test_pod_checks_readiness_and_posts_a_png():
    pod = one("default-cpu", "Pod", f"{PREFIX}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    script = c["args"][0]
    assert "$base/readyz" in script and "$base/v1/predict" in script
    assert "image=@/data/test-image.png" in script
    assert env_of(c)["GATEWAY"] == f"{GATEWAY}:8080"
    volume = pod["spec"]["volumes"][0]
    config_map = one("default-cpu", "ConfigMap", volume["configMap"]["name"])
    assert config_map["metadata"]["annotations"]["helm.sh/hook"] == "test"
    png = base64.b64decode(config_map["binaryData"]["test-image.png"])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and min(image.size) >= 16
    # With API keys, the test sends one.
    keyed = one("everything", "Pod", f"{PREFIX}-test")
    assert "secretKeyRef" in env_of(keyed["spec"]["containers"][0])["FASHION_API_KEYS"]


def test_test_pod_script_is_valid_shell():
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh on this machine")
    script = one("default-cpu", "Pod", f"{PREFIX}-test")["spec"]["containers"][0]["args"][0]
    result = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_loadtest_job_runs_locust_headless_against_the_gateway():
    assert find("default-cpu", "Job") == []
    (job,) = find("loadtest", "Job")
    spec = job["spec"]["template"]["spec"]
    (locust,) = spec["containers"]
    assert locust["image"] == "locustio/locust:2.47.0"
    command = locust["command"] + locust["args"]
    assert command[:4] == ["locust", "-f", "/loadtest/locustfile.py", "--headless"]
    flags = dict(zip(command[4:-1:2], command[5:-1:2], strict=False))
    assert flags["-u"] == "50" and flags["-r"] == "5" and flags["-t"] == "5m"
    assert flags["--host"] == f"http://{GATEWAY}:8080"
    assert command[-1] == "GatewayUser"
    mount = next(m for m in locust["volumeMounts"] if m["mountPath"] == "/loadtest")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert one("loadtest", "ConfigMap", volume["configMap"]["name"])["data"]["locustfile.py"] == LOCUSTFILE


# --- scripts/build_trt_plan.sh --------------------------------------------------------------------------

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")


@needs_bash
def test_build_trt_plan_script_parses():
    result = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


@needs_bash
def test_build_trt_plan_fails_clearly_without_trtexec(tmp_path):
    if Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("this machine has TensorRT's trtexec at the default path")
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        [BASH, str(SCRIPT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": str(empty), "HOME": str(tmp_path), "REPO_DIR": str(tmp_path)},
        timeout=10,
    )
    assert result.returncode != 0
    assert "error: trtexec not found" in result.stderr
    assert "command not found" not in result.stderr


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def trt_env(tmp_path):
    """A model repository, and stub trtexec/nvidia-smi that record their calls."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    log = tmp_path / "trtexec.log"
    _stub(
        bin_dir / "trtexec",
        f'echo "$*" >> "{log}"\n'
        'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v110000] # trtexec $*"\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) printf engine > "${a#--saveEngine=}" ;; esac; done\n',
    )
    _stub(bin_dir / "nvidia-smi", 'echo "NVIDIA H100 80GB HBM3"\n')
    repo = tmp_path / "models"
    for version in ("2", "10"):  # numeric, not lexical: 10 is the latest
        folder = repo / "fashion" / version
        folder.mkdir(parents=True)
        (folder / "model.fp16.onnx").write_bytes(b"onnx-fp16-" + version.encode())
        (folder / "model.int8.onnx").write_bytes(b"onnx-int8-" + version.encode())
        (folder / "metadata.json").write_text(json.dumps({"preprocessing": {"image_size": 192}}))
    (repo / "fashion" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "TRTEXEC": str(bin_dir / "trtexec"),
        "REPO_DIR": str(repo),
        "OUTPUT_DIR": str(tmp_path / "trt-models"),
        "CACHE_DIR": str(repo / ".trt-cache"),
        "MAX_BATCH": "16",
        "OPT_BATCH": "4",
    }
    return env, log, tmp_path


def _run_script(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT)], capture_output=True, text=True, env={**env, **extra}, timeout=30, check=False
    )


@needs_bash
def test_build_trt_plan_fails_clearly_without_nvidia_smi(trt_env):
    env, _, tmp_path = trt_env
    (tmp_path / "stubs" / "nvidia-smi").unlink()
    result = _run_script(env, PATH=str(tmp_path / "stubs"))
    assert result.returncode != 0
    assert "error: nvidia-smi not found" in result.stderr


@needs_bash
def test_build_trt_plan_builds_a_strongly_typed_plan_then_reuses_the_cache(trt_env):
    env, log, tmp_path = trt_env
    first = _run_script(env)
    assert first.returncode == 0, first.stderr
    (call,) = log.read_text().splitlines()[1:]  # the first call is `--help` (the version banner)
    args = call.split()
    assert f"--onnx={env['REPO_DIR']}/fashion/10/model.fp16.onnx" in args
    assert "--minShapes=image:1x192x192x3" in args  # image_size from metadata.json
    assert "--optShapes=image:4x192x192x3" in args and "--maxShapes=image:16x192x192x3" in args
    assert "--stronglyTyped" in args
    assert not {"--fp16", "--int8", "--best"} & set(args)
    assert any(a.startswith("--timingCacheFile=") for a in args)

    out = tmp_path / "trt-models" / "fashion_trt"
    assert (out / "10" / "model.plan").read_bytes() == b"engine"
    assert json.loads((out / "10" / "metadata.json").read_text())["preprocessing"]["image_size"] == 192
    config = (out / "config.pbtxt").read_text()
    assert 'name: "fashion_trt"' in config and 'platform: "tensorrt_plan"' in config
    assert "max_batch_size: 16" in config
    cached = list((Path(env["CACHE_DIR"])).glob("model.plan.*h100-80gb-hbm3.110000"))
    assert len(cached) == 1 and Path(f"{cached[0]}.ok").is_file()

    # Same GPU, same TensorRT, same ONNX: no rebuild, the plan is still published.
    shutil.rmtree(tmp_path / "trt-models")
    second = _run_script(env)
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stdout
    assert len(log.read_text().splitlines()) == 3  # only one more `--help`
    assert (out / "10" / "model.plan").read_bytes() == b"engine"

    # A new ONNX at the same version invalidates the cache.
    (Path(env["REPO_DIR"]) / "fashion" / "10" / "model.fp16.onnx").write_bytes(b"retrained")
    third = _run_script(env)
    assert third.returncode == 0 and "cache hit" not in third.stdout


@needs_bash
def test_build_trt_plan_profiles_the_title_input_of_a_model_that_reads_titles(trt_env):
    from fashion.metadata import TitleSpec
    from fashion.text import TitleTokenizer

    env, log, _ = trt_env
    title = TitleSpec(TitleTokenizer(max_tokens=48)).to_dict()  # as fashion export writes it
    doc = {"preprocessing": {"image_size": 192}, "title": title}
    (Path(env["REPO_DIR"]) / "fashion" / "10" / "metadata.json").write_text(json.dumps(doc, indent=2))
    result = _run_script(env)
    assert result.returncode == 0, result.stderr
    args = log.read_text().splitlines()[-1].split()
    assert "--minShapes=image:1x192x192x3,title:1x48" in args
    assert "--optShapes=image:4x192x192x3,title:4x48" in args
    assert "--maxShapes=image:16x192x192x3,title:16x48" in args


@needs_bash
def test_build_trt_plan_int8_uses_the_qdq_onnx_and_rejects_other_precisions(trt_env):
    env, log, _ = trt_env
    result = _run_script(env, PRECISION="int8", MODEL_VERSION="2")
    assert result.returncode == 0, result.stderr
    assert f"--onnx={env['REPO_DIR']}/fashion/2/model.int8.onnx" in log.read_text().split()
    bad = _run_script(env, PRECISION="fp8")
    assert bad.returncode != 0 and "PRECISION must be fp16 or int8" in bad.stderr
    missing = _run_script(env, MODEL_VERSION="7")
    assert missing.returncode != 0 and "model.fp16.onnx not found" in missing.stderr


# --- Dockerfiles ----------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_gateway_dockerfile_installs_only_the_gateway_extra_and_runs_as_10001():
    lines = _instructions(ROOT / "docker" / "gateway.Dockerfile")
    assert lines[0] == "FROM python:3.11-slim"
    copied = {part.rstrip("/") for line in lines if line.startswith("COPY") for part in line.split()[1:-1]}
    # setuptools' package discovery needs every package folder that pyproject.toml includes
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert copied == {"pyproject.toml", "README.md", *(p.rstrip("*") for p in packages["include"])}
    assert "orchestration" in copied
    assert 'RUN pip install ".[gateway]"' in lines
    assert "USER 10001:10001" in lines
    assert lines[-1] == 'CMD ["gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]'
    assert "EXPOSE 8080" in lines


def test_triton_dockerfile_bakes_the_repository_into_the_ngc_image():
    lines = _instructions(ROOT / "docker" / "triton.Dockerfile")
    assert f"ARG TRITON_IMAGE={TRITON_IMAGE}" in lines and "FROM ${TRITON_IMAGE}" in lines
    assert "COPY model_repository/ /models/" in lines
    user = [line for line in lines if line.startswith("USER")]
    assert user == ["USER 1000:1000"]
