"""``fashion export --ensemble A.pt B.pt`` (export/ensemble.py): two tiny members of different input sizes
(timm's ``test_efficientnet`` at 32 and 40 px, untrained heads: the numbers are noise, the arithmetic is
what is checked), exported once, then served by the real pip Triton as a ``platform: "ensemble"`` model and
through the unchanged gateway."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from export.errors import ExportError
from fashion.metadata import load_metadata
from tests.fixtures_title import write_catalogue

SIZES = {"a": 32, "b": 40}


def tiny_member(data: Path, path: Path, size: int, seed: int, schema=None) -> Path:
    import torch

    from fashion.contract import Preprocessing
    from training.checkpoint import Checkpoint, save_checkpoint
    from training.data import build_schema, read_catalogue
    from training.model import build_model

    if schema is None:
        cat = read_catalogue(data)
        schema = build_schema(cat, cat.samples)
    torch.manual_seed(seed)
    model = build_model("test_efficientnet", schema, Preprocessing(image_size=size)).eval()
    config = {"data": str(data), "backbone": "test_efficientnet", "image_size": size, "seed": 0}
    save_checkpoint(path, Checkpoint(model, "test_efficientnet", config))
    return path


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("ensemble-catalogue") / "kaggle", count=36)


@pytest.fixture(scope="module")
def members(catalogue, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ensemble-members")
    a = tiny_member(catalogue, root / "a.pt", SIZES["a"], seed=1)
    b = tiny_member(catalogue, root / "b.pt", SIZES["b"], seed=2)
    return a, b


def options(members, catalogue, repository: Path, **kw):
    from export.ensemble import EnsembleOptions

    return EnsembleOptions(
        members=members,
        repository=repository,
        calibration_data=catalogue,
        gate_images=24,
        eval_images=8,
        max_batch_size=8,
        cpu_threads=1,
        **kw,
    )


@pytest.fixture(scope="module")
def exported(members, catalogue, tmp_path_factory):
    from export.ensemble import export_ensemble

    repo = tmp_path_factory.mktemp("ensemble-repo")
    lines: list[str] = []
    result = export_ensemble(options(members, catalogue, repo, serve="ensemble"), report=lines.append)
    return repo, result, "\n".join(lines)


@pytest.fixture(scope="module")
def photos(exported, catalogue) -> np.ndarray:
    """A few catalogue photos as the gateway preprocesses them (the ensemble's contract: member A's)."""
    repo, _, _ = exported
    from fashion.contract import preprocess

    meta = load_metadata(repo, "fashion")
    files = sorted((catalogue / "images").glob("*.jpg"))[:6]
    return np.stack([preprocess(f.read_bytes(), meta.preprocessing) for f in files])


def run_onnx(path: Path, images: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"image": images}))


# --- the export ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_members_whose_label_schemas_differ_are_refused_naming_the_attribute(
    members, catalogue, tmp_path
):
    from export.ensemble import export_ensemble
    from training.checkpoint import load_checkpoint

    schema = load_checkpoint(members[0]).schema
    colour = schema["baseColour"]
    fewer = replace(colour, classes=colour.classes[:-1])
    attributes = tuple(fewer if a.name == "baseColour" else a for a in schema.attributes)
    other = replace(schema, attributes=attributes)
    odd = tiny_member(catalogue, tmp_path / "odd.pt", 32, seed=3, schema=other)
    with pytest.raises(ExportError, match=r"do not share the label schema \('baseColour' classes differ"):
        export_ensemble(options((members[0], odd), catalogue, tmp_path / "repo"), report=lambda _: None)
    assert not (tmp_path / "repo").exists()  # nothing written


def test_fitted_weight_follows_the_member_that_knows_the_labels():
    from export.ensemble import fit_weights
    from fashion.schema import Attribute, LabelSchema

    schema = LabelSchema((Attribute("colour", ("red", "blue", "green")), Attribute("shape", ("a", "b"))))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    knows = np.full((200, 3), 0.05)
    knows[np.arange(200), y] = 0.9
    guesses = rng.dirichlet(np.ones(3), 200)
    shape = np.full((200, 2), 0.5)
    labels = np.stack([y, np.full(200, -1)], axis=1)  # shape unlabelled: not fitted, 0.5
    weights = fit_weights(schema, [guesses, shape], [knows, shape], labels)
    assert weights[0].weight == 0.0 and weights[0].labelled == 200  # all of member B
    assert weights[0].accuracy[1] == 1.0 and weights[0].accuracy[2] == 1.0
    assert weights[1].weight == 0.5 and weights[1].labelled == 0


@pytest.mark.slow
def test_weights_are_recorded_per_attribute_within_0_and_1_in_the_served_metadata(exported):
    from export.ensemble import EnsembleRecord

    repo, result, report = exported
    meta = load_metadata(repo, "fashion")  # the gateway's reader: the contract holds
    assert meta.input.shape == (-1, SIZES["a"], SIZES["a"], 3)
    assert meta.backbone == "test_efficientnet+test_efficientnet"
    doc = json.loads((result.version_dir / "metadata.json").read_text())
    record = EnsembleRecord.from_dict(doc["export"]["ensemble"])
    assert record == result.record
    assert [w.attribute for w in record.weights] == [o.attribute for o in meta.outputs]
    assert all(0.0 <= w.weight <= 1.0 and w.weight in record.grid for w in record.weights)
    assert all(w.labelled > 0 for w in record.weights)  # the catalogue labels every attribute
    assert [m["model"] for m in record.members] == ["fashion_a", "fashion_b"]
    assert record.members[1]["resized_inside_graph_from"] == SIZES["a"]
    assert record.parity_max_abs_diff <= 1e-4
    assert "ensemble weights fitted on --calibration-data" in report


@pytest.mark.slow
def test_the_composed_graph_equals_the_weighted_mix_of_the_members_run_separately(exported, photos):
    _, result, _ = exported
    a = run_onnx(result.member_dirs[0] / "model.onnx", photos)
    b = run_onnx(result.member_dirs[1] / "model.onnx", photos)
    composed = run_onnx(result.version_dir / "model.onnx", photos)
    for j, w in enumerate(result.record.weights):
        mix = w.weight * a[j].astype(np.float64) + (1 - w.weight) * b[j]
        np.testing.assert_allclose(composed[j], mix, rtol=0, atol=1e-5, err_msg=w.attribute)
        np.testing.assert_allclose(composed[j].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_member_b_resizes_the_ensembles_input_inside_its_own_graph(exported, photos):
    import onnx

    _, result, _ = exported
    graph = onnx.load(result.member_dirs[1] / "model.onnx").graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [SIZES["a"], SIZES["a"], 3]
    assert any(n.op_type == "Resize" for n in graph.node)
    meta = load_metadata(result.member_dirs[1].parent.parent, "fashion_b")
    assert meta.input.shape == (-1, SIZES["a"], SIZES["a"], 3)


@pytest.mark.slow
def test_the_served_name_has_both_forms_and_the_ensemble_routes_through_members_and_combiner(exported):
    repo, _, _ = exported
    configs = repo / "fashion" / "configs"
    ensemble = (configs / "cpu_ensemble.pbtxt").read_text()
    assert (configs / "cpu.pbtxt").read_text() == ensemble  # serve="ensemble"
    assert 'platform: "ensemble"' in ensemble and "dynamic_batching" not in ensemble
    for name in ("fashion_a", "fashion_b", "fashion_combine"):
        assert f'model_name: "{name}"' in ensemble
        assert "dynamic_batching" in (repo / name / "configs" / "cpu.pbtxt").read_text()
    assert 'backend: "python"' in (configs / "cpu_composed.pbtxt").read_text()
    assert (repo / "fashion" / "config.pbtxt").read_text() == ensemble
    assert 'platform: "onnxruntime_onnx"' in (configs / "ngc_composed.pbtxt").read_text()


def test_the_combiner_is_served_by_the_members_python_model_running_its_own_graph(exported):
    """One python-backend model file serves both: a version folder with ``sessions.py`` (a member) builds its
    configured session, one without (the combiner) runs its ``model.onnx``."""
    repo, _, _ = exported
    member, combiner = repo / "fashion_a" / "1", repo / "fashion_combine" / "1"
    assert (combiner / "model.py").read_bytes() == (member / "model.py").read_bytes()
    assert (member / "sessions.py").is_file() and not (combiner / "sessions.py").exists()
    assert (combiner / "model.onnx").is_file()


# --- served by the real Triton and the unchanged gateway --------------------------------------------------
@pytest.fixture(scope="module")
def stack(stack_factory, exported, tmp_path_factory):
    repo, _, _ = exported
    return stack_factory(repo, tmp_path_factory.mktemp("ensemble-stack"))


@pytest.mark.slow
@pytest.mark.server
def test_triton_serves_the_ensemble_over_grpc_with_the_composed_graphs_answers(stack, exported, photos):
    from gateway.client import FashionClient

    repo, result, _ = exported
    server = stack.triton()
    client = FashionClient.connect(server.grpc_url, repository=repo, protocol="grpc")
    served = client.infer(photos)
    want = run_onnx(result.version_dir / "model.onnx", photos)
    for name, expected in zip(client.metadata.output_names, want, strict=True):
        np.testing.assert_allclose(served[name], expected, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.server
def test_the_gateway_answers_from_the_ensemble(stack, exported, catalogue, photos):
    from tests.test_title_serving import predict

    repo, result, _ = exported
    meta = load_metadata(repo, "fashion")
    want = run_onnx(result.version_dir / "model.onnx", photos[:2])
    files = sorted((catalogue / "images").glob("*.jpg"))[:2]
    with stack.gateway("ensemble", workers=1, timeout_s=30) as gateway:
        for i, f in enumerate(files):
            body = predict(gateway.url, f.read_bytes(), None)
            assert body["model"]["name"] == "fashion"
            for j, o in enumerate(meta.outputs):
                got = {t["label"]: t["confidence"] for t in body["predictions"][o.attribute]["top_k"]}
                expected = {c: float(p) for c, p in zip(o.classes, want[j][i], strict=True)}
                for label, confidence in got.items():
                    assert confidence == pytest.approx(expected[label], abs=1e-3), (o.attribute, label)


@pytest.mark.slow
@pytest.mark.server
def test_the_composed_form_served_by_triton_answers_as_the_ensemble_did(stack, exported, photos):
    from export.ensemble import serve_form
    from gateway.client import FashionClient

    repo, _, _ = exported
    before = FashionClient.connect(stack.triton().grpc_url, repository=repo, protocol="grpc").infer(photos)
    stack.stop()
    serve_form(repo / "fashion", "composed")
    try:
        server = stack.triton()
        client = FashionClient.connect(server.grpc_url, repository=repo, protocol="grpc")
        assert 'backend: "python"' in (repo / "fashion" / "configs" / "cpu.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in (repo / "fashion" / "config.pbtxt").read_text()
        after = client.infer(photos)
    finally:
        stack.stop()
        serve_form(repo / "fashion", "ensemble")
    for name, expected in before.items():
        np.testing.assert_allclose(after[name], expected, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.server
def test_bench_ensemble_times_both_forms_through_triton_and_serves_the_faster(exported, tmp_path):
    import shutil

    from loadtest.ensemble import FormBenchOptions, bench_forms

    repo, _, _ = exported
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)  # --apply rewrites configs/cpu.pbtxt: not the module's repository
    timing = bench_forms(FormBenchOptions(copy, rounds=1, seconds=0.3, apply=True))
    assert set(timing.rates) == {"composed", "ensemble", "member A alone"}
    assert all(rate > 0 for rates in timing.rates.values() for rate in rates.values())
    served = (copy / "fashion" / "configs" / "cpu.pbtxt").read_text()
    assert served == (copy / "fashion" / "configs" / f"cpu_{timing.faster}.pbtxt").read_text()
    assert f"faster: {timing.faster} (now configs/cpu.pbtxt)" in timing.table()


@pytest.mark.slow
def test_side_by_side_serves_the_composed_form_under_a_name_its_metadata_matches(exported, tmp_path):
    from loadtest.ensemble import side_by_side

    repo, _, _ = exported
    scratch = side_by_side(repo, "fashion", tmp_path)
    assert load_metadata(scratch, "fashion_composed").name == "fashion_composed"  # a gateway can serve it
    assert 'name: "fashion_composed"' in (scratch / "fashion_composed" / "configs" / "cpu.pbtxt").read_text()
    assert 'platform: "ensemble"' in (scratch / "fashion" / "configs" / "cpu.pbtxt").read_text()
    assert load_metadata(repo, "fashion").name == "fashion"  # the original is untouched
