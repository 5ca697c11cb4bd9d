"""CPU runtimes × precisions: the accuracy gate, which candidates this CPU can run, the choice, the refusal
without real photos, and a real Triton serving the OpenVINO candidate through the python backend."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from export.errors import ExportError, PrecisionError
from export.parity import gate
from export.pipeline import ExportOptions, export_checkpoint
from export.runtimes import choose, cpu_info, time_taking_turns, unavailable
from export.sessions import SessionSpec
from fashion.metadata import (
    AttributeVerdict,
    CandidateRecord,
    GateVerdict,
    HostRecord,
    TimingRecord,
    load_export_record,
)
from fashion.schema import Attribute, LabelSchema

SCHEMA = LabelSchema([Attribute("colour", ("red", "blue", "green"))])


def probs(rows: list[list[float]]) -> list[np.ndarray]:
    return [np.asarray(rows, dtype=np.float32)]


def test_gate_excuses_near_ties_but_not_confident_flips():
    reference = probs([[0.50, 0.49, 0.01]] + [[0.9, 0.05, 0.05]] * 99)
    tie_flipped = probs([[0.49, 0.50, 0.01]] + [[0.9, 0.05, 0.05]] * 99)
    doc = gate(SCHEMA, reference, tie_flipped, None)
    assert doc.passed and doc.attributes[0].near_ties == 1 and not doc.labelled
    confident_flip = probs([[0.05, 0.9, 0.05]] * 2 + [[0.9, 0.05, 0.05]] * 98)
    doc = gate(SCHEMA, reference, confident_flip, None)
    assert not doc.passed and doc.attributes[0].agreement == pytest.approx(98 / 99, abs=1e-4)


def test_gate_refuses_an_accuracy_drop_beyond_half_a_point_even_when_agreement_passes():
    reference = probs([[0.9, 0.05, 0.05]] * 200)
    labels = np.zeros((200, 1), dtype=np.int64)
    candidate = probs([[0.05, 0.9, 0.05]] * 2 + [[0.9, 0.05, 0.05]] * 198)  # 99.0 % agree, −1 point
    doc = gate(SCHEMA, reference, candidate, labels)
    row = doc.attributes[0]
    assert row.agreement == pytest.approx(0.99) and row.accuracy_delta == pytest.approx(-0.01)
    assert not doc.passed
    one_flip = probs([[0.05, 0.9, 0.05]] + [[0.9, 0.05, 0.05]] * 199)  # −0.5 points: allowed
    assert gate(SCHEMA, reference, one_flip, labels).passed
    labels[:, 0] = -1  # missing labels do not count
    assert gate(SCHEMA, reference, candidate, labels).attributes[0].labelled_images == 0


def info(caps: tuple[str, ...], openvino: str | None = "2026.4") -> HostRecord:
    return HostRecord("test CPU", (), openvino, caps)


def test_bf16_is_unavailable_without_cpu_support_and_openvino_without_the_package():
    bf16 = SessionSpec("openvino", "bf16")
    assert "no BF16" in unavailable(bf16, info(("FP32", "INT8")))
    assert unavailable(bf16, info(("FP32", "BF16", "INT8"))) is None
    assert "pip install" in unavailable(SessionSpec("openvino", "fp32"), info((), openvino=None))
    assert unavailable(SessionSpec("onnxruntime", "int8"), info((), openvino=None)) is None


def test_this_cpus_bf16_matches_openvino_and_the_isa_flags():
    here = cpu_info()
    assert here.openvino is not None, "openvino is a dependency of the export extra"
    has_isa = {"amx_bf16", "avx512_bf16"} & set(here.flags)
    assert here.bf16 == bool(has_isa), (here.flags, here.openvino_capabilities)


def verdict(passed: bool) -> GateVerdict:
    row = AttributeVerdict(
        "colour", 1.0, 10, 0, 0.0, failures=() if passed else ("top-1 agreement 90% < 99%",)
    )
    return GateVerdict((row,), images=10, labelled=False, rule="test")


def measured(name: str, ips: float, passed: bool) -> CandidateRecord:
    spec = SessionSpec(*name.split("-"))
    return CandidateRecord(
        spec.runtime, spec.precision, spec.file, spec.config_name, None, {1: ips / 2, 8: ips}, verdict(passed)
    )


def test_the_fastest_candidate_that_passed_is_chosen_and_the_reason_names_the_refused():
    best, why = choose(
        [
            measured("onnxruntime-fp32", 60, True),
            measured("openvino-fp32", 80, True),
            measured("openvino-int8", 150, False),
        ]
    )
    assert best.name == "openvino-fp32" and best.best_batch == 8
    assert "80 img/s" in why and "refused by the gate: openvino-int8" in why
    with pytest.raises(ExportError, match="no CPU candidate"):
        choose([measured("openvino-int8", 150, False)])


def test_taking_turns_rotates_the_order_and_keeps_the_median_of_each_runner():
    def fast(x: np.ndarray) -> list[np.ndarray]:
        return [x]

    def slow(x: np.ndarray) -> list[np.ndarray]:
        return [x]

    # Rates each runner's turns measure, in turn order; one outlier round each.
    scripted = {
        (fast, 1): [100.0, 500.0, 110.0],
        (fast, 8): [200.0, 210.0, 10.0],
        (slow, 1): [60.0, 61.0, 1.0],
        (slow, 8): [90.0, 95.0, 999.0],
    }
    turns: list[tuple[str, int]] = []

    def scripted_rate(runner, images, batch, seconds):
        turns.append((runner.__name__, batch))
        return scripted[(runner, batch)].pop(0)

    images = np.zeros((4, 2, 2, 3), np.uint8)
    rates = time_taking_turns([fast, slow], images, (1, 8), rounds=3, seconds=0.5, timer=scripted_rate)
    assert rates == [{1: 110.0, 8: 200.0}, {1: 60.0, 8: 95.0}]  # medians, the outliers ignored
    # Round 1: fast then slow; round 2: slow then fast; round 3: fast then slow; each at batch 1 then 8.
    order = [name for name, _ in turns[::2]]
    assert order == ["fast", "slow", "slow", "fast", "fast", "slow"]
    assert [batch for _, batch in turns] == [1, 8] * 6


@pytest.fixture(scope="module")
def orphan_checkpoint(tmp_path_factory, request) -> Path:
    """The tests' tiny checkpoint, with its training data pointing nowhere (no real photos to be had)."""
    import torch

    checkpoint = request.getfixturevalue("checkpoint")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["config"]["data"] = str(tmp_path_factory.mktemp("gone") / "catalogue")
    out = tmp_path_factory.mktemp("orphan") / "best.pt"
    torch.save(state, out)
    return out


def test_int8_without_real_photos_is_refused_unless_synthetic_calibration_is_asked(
    orphan_checkpoint, tmp_path
):
    quick = dict(gate_images=16, eval_images=8, calibration_images=16, time_s=0.1)
    with pytest.raises(ExportError, match="--synthetic-calibration"):
        export_checkpoint(
            ExportOptions(checkpoint=orphan_checkpoint, repository=tmp_path, precisions="int8", **quick),
            report=lambda text: None,
        )
    assert not (tmp_path / "fashion").exists()
    auto = export_checkpoint(
        ExportOptions(checkpoint=orphan_checkpoint, repository=tmp_path, precisions="auto", **quick),
        report=lambda text: None,
    )
    assert set(auto.files) == {"fp32"}
    photos = load_export_record(tmp_path, "fashion", auto.version).photos
    assert photos.real_photos is False
    assert "synthetic" in photos.gate.source
    synthetic = export_checkpoint(
        ExportOptions(
            checkpoint=orphan_checkpoint,
            repository=tmp_path,
            precisions="int8",
            synthetic_calibration=True,
            force=True,
            **quick,
        ),
        report=lambda text: None,
    )
    int8 = load_export_record(tmp_path, "fashion", synthetic.version).variant("int8")
    assert int8 is not None and int8.quantisation is not None
    calibration = int8.quantisation.calibration
    assert calibration.real_photos is False and "--synthetic-calibration" in calibration.source


def test_photos_shipped_beside_a_checkpoint_gate_and_calibrate_int8_where_its_training_data_is_gone(
    orphan_checkpoint, checkpoint, tmp_path
):
    """The shipped default model carries validation photos in ``photos/`` beside ``model.pt``: a fresh clone
    without the training data gates and calibrates INT8 on them instead of refusing it."""
    import shutil

    import torch

    from training.synth import MARKER

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(orphan_checkpoint, model_dir / "model.pt")
    data = Path(torch.load(checkpoint, map_location="cpu", weights_only=False)["config"]["data"])
    # The tiny model's own catalogue stands in for shipped real photos (without fashion synth's marker).
    shutil.copytree(data, model_dir / "photos", ignore=shutil.ignore_patterns(MARKER))
    quick = dict(gate_images=16, eval_images=8, calibration_images=16, time_s=0.1)
    result = export_checkpoint(
        ExportOptions(
            checkpoint=model_dir / "model.pt",
            repository=tmp_path / "repo",
            precisions="int8",
            force=True,
            **quick,
        ),
        report=lambda text: None,
    )
    record = load_export_record(tmp_path / "repo", "fashion", result.version)
    shipped = f"photos shipped with the model ({model_dir / 'photos'})"
    assert record.photos.real_photos and record.photos.gate.source.startswith(shipped)
    assert record.photos.gate.images == 16 and record.photos.labelled
    int8 = record.variant("int8")
    assert int8 is not None and int8.quantisation is not None
    calibration = int8.quantisation.calibration
    assert calibration.real_photos and calibration.source.startswith(shipped) and calibration.images == 16


def test_a_reduced_precision_that_fails_the_gate_stops_the_export_and_writes_nothing(checkpoint, tmp_path):
    # A gate that allows no change of confidence at all: INT8 (not bit-identical to FP32) fails it.
    options = dict(gate_images=24, eval_images=8, calibration_images=16, time_s=0.1, max_confidence_delta=0.0)
    with pytest.raises(PrecisionError, match="int8 fails the accuracy gate"):
        export_checkpoint(
            ExportOptions(
                checkpoint=checkpoint,
                repository=tmp_path,
                precisions="int8",
                synthetic_calibration=True,
                **options,
            ),
            report=lambda text: None,
        )
    assert not (tmp_path / "fashion").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "fashion").iterdir()
    )


def test_every_candidate_is_timed_and_gated_and_the_metadata_says_which_is_served(exported):
    repo, result = exported
    cpu = load_export_record(repo, "fashion", 1).cpu
    names = [c.name for c in cpu.candidates]
    assert names[:2] == ["onnxruntime-fp32", "openvino-fp32"] and "openvino-int8" in names
    ran = [c for c in cpu.candidates if c.unavailable is None]
    assert all(set(c.throughput_ips) == {1, 8} and c.gate is not None and c.gate.attributes for c in ran)
    assert cpu.timing == TimingRecord((1, 8), 3, pytest.approx(0.2 / 3))
    fastest = max((c for c in ran if c.passed), key=lambda c: c.best_ips)
    assert (cpu.chosen.runtime, cpu.chosen.precision) == (fastest.runtime, fastest.precision)
    assert cpu.why.startswith("fastest that passed")
    assert "openvino-bf16" not in names  # bf16 was not asked for in this export
    assert result.chosen is not None and result.chosen.runtime == cpu.chosen.runtime
    assert cpu.ranking[0] == cpu.chosen and all(c.passed for c in cpu.ranking)


@pytest.mark.server
def test_real_triton_runs_the_openvino_candidate_in_the_python_backend(exported):
    import tritonclient.http as httpclient

    from export.runtimes import REFERENCE
    from export.sessions import open_session
    from orchestration.triton import TritonServer
    from tests.test_export import ATOL, images

    repo, result = exported
    batch = images(3, seed=5)
    want = open_session(REFERENCE, result.files["fp32"])(batch)
    with TritonServer(
        repo, ["fashion"], model_config_name="cpu_openvino_fp32", startup_timeout_s=90
    ) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        inp = httpclient.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        response = client.infer("fashion", [inp])
        tensors = [o["name"] for o in response.get_response()["outputs"]]
        by_name = {name: response.as_numpy(name) for name in tensors}
        client.close()
    meta = json.loads((repo / "fashion" / "1" / "metadata.json").read_text())
    for out, expected in zip(meta["outputs"], want, strict=True):
        np.testing.assert_allclose(by_name[out["tensor"]], expected, rtol=0, atol=ATOL)


# --- one session spec: what the export gates and times is what the config carries and the backend builds
def backend_model(monkeypatch, config_path: Path, model_dir: Path, version: str = "1"):
    """``export/triton_python_model.py`` initialised from a written config, as Triton's python stub would
    (its ``triton_python_backend_utils`` exists only inside Triton: a stand-in with the names it uses)."""
    import importlib.util
    import sys
    import types

    from google.protobuf import json_format

    from tests.test_export import parse_config

    utils = types.ModuleType("triton_python_backend_utils")
    utils.TritonModelException = type("TritonModelException", (Exception,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    source = Path(__file__).resolve().parents[1] / "export" / "triton_python_model.py"
    spec = importlib.util.spec_from_file_location("model_under_test", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse_config(config_path), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(model_dir), "model_version": version}
    )
    return model


def config_spec(path: Path) -> SessionSpec:
    from tests.test_export import parse_config

    params = {k: v.string_value for k, v in parse_config(path).parameters.items()}
    return SessionSpec.from_parameters(params)


def test_the_timed_and_the_served_session_are_built_from_the_same_spec(exported, monkeypatch):
    repo, result = exported
    record = load_export_record(repo, "fashion", 1)
    configs = repo / "fashion" / "configs"
    # configs/cpu.pbtxt carries the spec the chosen candidate was timed with, and every configured
    # candidate's config carries its own; none of them lets ONNX Runtime's threads spin.
    assert config_spec(configs / "cpu.pbtxt") == result.timed[record.chosen.name]
    configured = [c for c in record.cpu.candidates if c.configured]
    assert configured and all(
        config_spec(configs / f"{c.config_name}.pbtxt") == result.timed[c.name] for c in configured
    )
    assert all(not spec.allow_spinning for spec in result.timed.values())
    # The python backend builds its session from that config with the same function, to the same settings.
    for name in ("cpu_openvino_fp32", "cpu_onnxruntime_fp32"):
        model = backend_model(monkeypatch, configs / f"{name}.pbtxt", repo / "fashion")
        timed = result.timed[model.session.spec.name]
        # (the backend's spec is of the copy of export/sessions.py it loaded: compared by its values)
        assert SessionSpec(**model.session.spec.__dict__) == timed
        assert model.session.reported() == timed.runtime_settings()  # as the runtime reports it, built
        assert model.outputs == [o.tensor for o in load_export_record_outputs(repo)]


def test_the_bulk_session_runs_one_stream_per_core_and_answers_as_the_exports_own_from_two_threads(exported):
    """``fashion tag --local`` runs the chosen OpenVINO file in throughput mode: each caller borrows its own
    infer request, so two threads at once get what the export's (latency) session gives one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from export.sessions import open_session
    from tests.test_export import images

    repo, _ = exported
    own = SessionSpec("openvino", "fp32", threads=2)
    bulk = own.for_throughput(2)
    assert (bulk.num_streams, bulk.threads, bulk.performance_hint, bulk.file) == (
        2,
        2,
        "THROUGHPUT",
        own.file,
    )
    assert SessionSpec("onnxruntime", "fp32").for_throughput(2) == SessionSpec("onnxruntime", "fp32")
    assert own.for_throughput(1) == own
    path = repo / "fashion" / "1" / own.file
    reference, session = open_session(own, path), open_session(bulk, path)
    batches = [images(4, seed=s) for s in range(6)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(session, batches))
    for batch, outputs in zip(batches, got, strict=True):
        for a, b in zip(reference(batch), outputs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert session.reported()["NUM_STREAMS"] == "2"


def load_export_record_outputs(repo: Path):
    from fashion.metadata import load_metadata

    return load_metadata(repo, "fashion", 1).outputs


def test_the_bf16_candidate_runs_model_onnx_with_openvinos_bf16_hint(tmp_path):
    """What can be checked on any CPU: the BF16 candidate's spec, the config it is written into, and the
    spec read back from that config (the backend's path) asking OpenVINO for bf16 on model.onnx."""
    from export.repository import ServingConfig, model_config
    from export.runtimes import candidates

    bf16 = next(s for s in candidates(("fp32", "bf16"), 2) if s.precision == "bf16")
    assert (bf16.runtime, bf16.file, bf16.config_name) == ("openvino", "model.onnx", "cpu_openvino_bf16")
    assert bf16.openvino_properties()["INFERENCE_PRECISION_HINT"] == "bf16"
    text = model_config("fashion", SCHEMA, 32, ServingConfig(), backend="python", session=bf16)
    (tmp_path / "cpu_openvino_bf16.pbtxt").write_text(text)
    assert config_spec(tmp_path / "cpu_openvino_bf16.pbtxt") == bf16
    assert 'string_value: "model.onnx"' in text and 'string_value: "bf16"' in text
    with pytest.raises(ValueError, match="contradicts"):  # a config naming another file is refused
        SessionSpec.from_parameters({**bf16.parameters(), "model_filename": "model.int8.onnx"})


HAS_BF16 = cpu_info().bf16


@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not HAS_BF16,
                reason="compiling with the bf16 hint needs a CPU with AMX-BF16 or AVX512-BF16 "
                f"(this one: {cpu_info().model}); the fp32 case checks the same path here",
            ),
        ),
    ],
)
def test_openvino_compiles_the_session_with_the_specs_precision_hint(exported, precision):
    from export.sessions import open_session

    repo, _ = exported
    spec = SessionSpec("openvino", precision, threads=2)
    session = open_session(spec, repo / "fashion" / "1" / spec.file)
    reported = session.reported()
    assert reported["INFERENCE_PRECISION_HINT"] == {"fp32": "f32", "bf16": "bf16"}[precision]
    assert reported == spec.runtime_settings()


# --- the refusal policy and the choice, step by step (no export, nothing patched) ------------------------
def gated(name: str, passed: bool, rate: float | None = None):
    from export.pipeline import Gated, GateSubject
    from export.sessions import Session

    spec = SessionSpec(*name.split("-"))
    session = None
    if rate is not None:  # a stand-in session whose speed the test sets (time_runner times it)
        session = Session(
            spec, Path(spec.file), lambda batch: (time.sleep(len(batch) / rate), [batch])[1], [], dict
        )
    return Gated(GateSubject(spec, spec.name), verdict(passed), None, session)


def test_the_refusal_policy_is_one_for_every_precision_resolved_once_from_the_options():
    from export.pipeline import Refusal, decide

    failing = [
        gated("onnxruntime-fp32", True),
        gated("onnxruntime-int8", False),
        gated("openvino-int8", False),
    ]
    made = ("fp32", "int8")
    said: list[str] = []
    options = {
        "refuse": ExportOptions(checkpoint=Path("x.pt"), precisions="int8"),
        "auto": ExportOptions(checkpoint=Path("x.pt"), precisions="auto"),
        "auto as a tuple": ExportOptions(checkpoint=Path("x.pt"), precisions=("auto",)),
        "force": ExportOptions(checkpoint=Path("x.pt"), precisions="int8", force=True),
    }
    assert {k: o.refusal for k, o in options.items()} == {
        "refuse": Refusal.REFUSE,
        "auto": Refusal.LEAVE_OUT,
        "auto as a tuple": Refusal.LEAVE_OUT,  # was REFUSE-like: only the string "auto" left refused ones out
        "force": Refusal.FORCE,
    }
    with pytest.raises(PrecisionError, match="int8 fails the accuracy gate on colour"):
        decide(failing, made, options["refuse"].refusal, said.append)
    for key in ("auto", "auto as a tuple"):
        left_out = decide(failing, made, options[key].refusal, said.append)
        assert left_out.written == {"fp32"} and not left_out.forced
    forced = decide(failing, made, options["force"].refusal, said.append)
    assert forced.written == {"fp32", "int8"} and forced.forced == {"int8"}
    # FP16 goes through the same policy (it used to have a gate path of its own).
    fp16 = [gated("onnxruntime-fp16", False)]
    with pytest.raises(PrecisionError, match="fp16 fails"):
        decide(fp16, ("fp32", "fp16"), Refusal.REFUSE, said.append)
    assert decide(fp16, ("fp32", "fp16"), Refusal.LEAVE_OUT, said.append).written == {"fp32"}
    # One candidate of a precision passing keeps the precision.
    mixed = [gated("onnxruntime-int8", False), gated("openvino-int8", True)]
    assert decide(mixed, made, Refusal.REFUSE, said.append).written == {"fp32", "int8"}


def test_the_fastest_candidate_that_passed_is_served_and_a_refused_one_never_is(tmp_path):
    from export.images import ExportImages, ImageSet
    from export.pipeline import Decision, GateResult, PhotoPlan, rank

    fast_refused = gated("openvino-int8", False, rate=4000)
    slow_passed = gated("onnxruntime-fp32", True, rate=400)
    mid_passed = gated("openvino-fp32", True, rate=1000)
    images = np.zeros((8, 4, 4, 3), np.uint8)
    plan = PhotoPlan(ExportImages(ImageSet(images, "test"), None, None), ())
    opts = ExportOptions(checkpoint=Path("x.pt"), time_s=0.3, force=True)
    for forced in (frozenset(), frozenset({"int8"})):
        gates = GateResult(
            info(("FP32",)), (slow_passed, fast_refused, mid_passed), Decision(frozenset(), forced)
        )
        ranking = rank(opts, gates, plan, lambda text: None)
        refused = next(c for c in ranking.candidates if c.name == "openvino-int8")
        assert refused.best_ips > ranking.chosen.best_ips  # it was the fastest, and is not served
        assert ranking.chosen.name == "openvino-fp32" and ranking.chosen.passed
        assert refused.configured == bool(forced) and refused.forced == bool(forced)
        assert set(ranking.timed) == {"onnxruntime-fp32", "openvino-int8", "openvino-fp32"}


# --- the gate compares what a user receives -------------------------------------------------------------
def test_a_photo_exactly_at_the_uncertain_threshold_cannot_fail_the_gate_on_a_floats_last_bit():
    threshold = 0.6
    at = [threshold, (1 - threshold) / 2, (1 - threshold) / 2]  # FP32's confidence is the threshold itself
    reference = probs([at] * 5 + [[0.9, 0.05, 0.05]] * 95)
    below = np.nextafter(np.float32(threshold), np.float32(0))  # one float below: the flag flips
    candidate = probs([[float(below), 0.2, 0.2]] * 5 + [[0.9, 0.05, 0.05]] * 95)
    doc = gate(SCHEMA, reference, candidate, None, {"colour": threshold})
    flag = doc.attributes[0].flag("uncertain")
    assert flag is not None and flag.at_threshold == 5 and flag.images == 95 and flag.agreement == 1.0
    assert flag.raised != flag.raised_fp32  # the flag did flip on those photos...
    assert doc.passed  # ...and the gate does not fail for it
    # Without the margin the same photos fail it: the margin is what excuses them.
    from export.parity import GateRule

    strict = gate(SCHEMA, reference, candidate, None, {"colour": threshold}, GateRule(flag_margin=0.0))
    assert not strict.passed and "uncertain agreement" in strict.attributes[0].failures[0]


def test_the_gate_refuses_flipped_uncertain_flags_quantised_confidences_and_reordered_top_k():
    reference = probs([[0.7, 0.2, 0.1]] * 100)
    thresholds = {"colour": 0.6}
    # The uncertain flag raised on 5 % of photos where FP32 is confidently above the threshold.
    flagged = probs([[0.55, 0.35, 0.1]] * 5 + [[0.7, 0.2, 0.1]] * 95)
    row = gate(SCHEMA, reference, flagged, None, thresholds).attributes[0]
    assert not row.passed and any("uncertain" in f for f in row.failures) and row.agreement == 1.0
    # Probabilities quantised to the top class alone (the INT8 defect of issue 23): same top-1 everywhere.
    quantised = probs([[0.6, 0.0, 0.0]] * 100)
    row = gate(SCHEMA, reference, quantised, None, thresholds).attributes[0]
    assert row.agreement == 1.0 and row.confidence_mean_delta == pytest.approx(0.1)
    assert any("confidence" in f for f in row.failures)
    # Second and third place swapped on every photo: top-1 agrees, the top-3 list does not.
    swapped = probs([[0.7, 0.1, 0.2]] * 100)
    row = gate(SCHEMA, reference, swapped, None).attributes[0]
    assert row.agreement == 1.0 and row.top_k_agreement == 0.0 and not row.passed


def test_the_gate_refuses_a_candidate_whose_confidences_are_worse_calibrated_against_the_labels():
    labels = np.zeros((100, 1), dtype=np.int64)
    labels[:30, 0] = 1  # FP32 is right on 70 %, with confidence 0.7: calibrated
    reference = probs([[0.7, 0.2, 0.1]] * 100)
    overconfident = probs([[0.97, 0.02, 0.01]] * 100)  # same answers, confidence 0.97
    row = gate(SCHEMA, reference, overconfident, labels).attributes[0]
    assert row.ece_fp32 == pytest.approx(0.0, abs=1e-6) and row.ece == pytest.approx(0.27, abs=1e-6)
    assert row.accuracy == row.accuracy_fp32 and any("calibration" in f for f in row.failures)
