"""``fashion.metadata.ExportRecord``: what an export measured and chose, written into ``metadata.json`` and
read back typed by ``fashion serve``, ``fashion bench`` and the gateway."""

from __future__ import annotations

import json

import pytest

from fashion.contract import Preprocessing
from fashion.metadata import (
    FILENAME,
    AttributeVerdict,
    CandidateRecord,
    CpuRecord,
    ExportPhotos,
    ExportRecord,
    FileRecord,
    FlagAgreement,
    GateVerdict,
    HostRecord,
    MetadataError,
    ParityRecord,
    ParityRow,
    PhotoOrigin,
    PhotoSet,
    Quantisation,
    TimingRecord,
    TrainingRecord,
    VariantRecord,
    build_metadata,
    load_export_record,
    load_metadata,
    write_metadata,
)
from fashion.schema import Attribute, LabelSchema

SCHEMA = LabelSchema([Attribute("colour", ("red", "blue", "green"))])


def verdict(*, failures: tuple[str, ...] = ()) -> GateVerdict:
    row = AttributeVerdict(
        attribute="colour",
        agreement=0.995,
        agreement_images=400,
        near_ties=100,
        max_abs_diff=0.03,
        confidence_max_delta=0.03,
        confidence_mean_delta=0.004,
        top_k=3,
        top_k_agreement=1.0,
        flags=(FlagAgreement("uncertain", 0.6, 0.02, 1.0, 490, 10, 51, 50),),
        labelled_images=480,
        accuracy_fp32=0.75,
        accuracy=0.745,
        ece_fp32=0.05,
        ece=0.055,
        failures=failures,
    )
    return GateVerdict((row,), images=500, labelled=True, rule="the rule")


def candidate(runtime: str, precision: str, ips: float, *, gate: GateVerdict | None, **kw) -> CandidateRecord:
    return CandidateRecord(
        runtime=runtime,
        precision=precision,
        file="model.int8.onnx" if precision == "int8" else "model.onnx",
        config_name=f"cpu_{runtime}_{precision}",
        throughput_ips={1: ips / 2, 8: ips},
        gate=gate,
        **kw,
    )


def record() -> ExportRecord:
    reference = candidate("onnxruntime", "fp32", 100, gate=verdict())
    openvino = candidate("openvino", "fp32", 120, gate=verdict())
    int8 = candidate("openvino", "int8", 150, gate=verdict())
    refused = candidate("onnxruntime", "int8", 200, gate=verdict(failures=("agreement 97% < 99%",)))
    bf16 = CandidateRecord("openvino", "bf16", "model.onnx", "cpu_openvino_bf16", unavailable="no BF16")
    calibration = PhotoSet("training split of x (300 photos)", 300, PhotoOrigin.REAL)
    return ExportRecord(
        training=TrainingRecord("c" * 64, "w" * 64, {"backbone": "b"}, 3, 0.8, {"colour": 0.8}, None),
        versions={"torch": "2", "onnxruntime": "1", "openvino": None},
        opset=17,
        files=(FileRecord("fp32", "model.onnx", 10), FileRecord("int8", "model.int8.onnx", 5)),
        photos=ExportPhotos(PhotoSet("validation split of x (500 photos)", 500), True, calibration),
        parity=ParityRecord(1e-4, 64, "validation split", (ParityRow("colour", 1e-7, 1.0, 1.0, 64),)),
        variants=(
            VariantRecord(
                "int8",
                "model.int8.onnx",
                {"openvino-int8": int8.gate, "onnxruntime-int8": refused.gate},  # type: ignore[dict-item]
                written=True,
                quantisation=Quantisation("nncf", calibration, {"stem_conv": ("/Conv",)}, (), None, 40),
            ),
        ),
        cpu=CpuRecord(
            HostRecord("test CPU", ("avx2",), "2026.0", ("FP32", "INT8")),
            2,
            TimingRecord((1, 8), 3, 0.5),
            (reference, openvino, bf16, refused, int8),
            int8,
            "fastest that passed",
        ),
    )


def test_the_record_reads_back_equal_from_its_json():
    original = record()
    assert ExportRecord.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_the_ranking_is_the_candidates_that_passed_fastest_first_and_never_a_refused_one():
    rec = record()
    assert [c.name for c in rec.ranking] == ["openvino-int8", "openvino-fp32", "onnxruntime-fp32"]
    assert rec.chosen.name == "openvino-int8" and rec.chosen.best_batch == 8
    refused = rec.cpu.candidate("onnxruntime-int8")
    assert refused is not None and not refused.passed and not refused.configured
    assert rec.cpu.candidate("openvino-bf16").unavailable == "no BF16"  # type: ignore[union-attr]


def test_a_chosen_candidate_that_is_not_among_the_candidates_is_refused():
    rec = record()
    with pytest.raises(MetadataError, match="not one of the candidates"):
        CpuRecord(rec.cpu.host, 2, rec.cpu.timing, rec.cpu.candidates[:2], rec.cpu.candidates[4], "x")


def test_the_metadata_file_carries_the_record_and_load_export_record_reads_it(tmp_path):
    rec = record()
    doc = build_metadata(
        schema=SCHEMA,
        preprocessing=Preprocessing(image_size=32),
        backbone="b",
        temperatures={},
        thresholds={"colour": 0.6},
        record=rec,
    )
    doc["model"].update(name="fashion", version=1)
    folder = tmp_path / "fashion" / "1"
    folder.mkdir(parents=True)
    write_metadata(folder, doc)
    assert load_export_record(tmp_path, "fashion") == rec
    meta = load_metadata(tmp_path, "fashion", 1)  # what the gateway reads is unchanged
    assert (meta.precision, meta.input.name) == ("int8", "image")
    written = json.loads((folder / FILENAME).read_text())
    # The keys `fashion serve`'s reuse check and older readers use stay where they were.
    assert written["training"]["checkpoint_sha256"] == "c" * 64
    assert written["export"]["cpu"]["chosen"]["why"] == "fastest that passed"


def test_a_document_without_an_export_record_says_so(tmp_path):
    doc = build_metadata(
        schema=SCHEMA,
        preprocessing=Preprocessing(image_size=32),
        backbone="b",
        temperatures={},
        thresholds={},
        training={},
        export={},
    )
    doc["model"].update(name="fashion", version=1)
    (tmp_path / "fashion" / "1").mkdir(parents=True)
    write_metadata(tmp_path / "fashion" / "1", doc)
    with pytest.raises(MetadataError, match="no readable export record"):
        load_export_record(tmp_path, "fashion", 1)


def test_synthetic_photos_are_never_called_real():
    synthetic = PhotoSet("validation split of synth", 24, PhotoOrigin.SYNTHETIC_CATALOGUE)
    assert not synthetic.real_photos and synthetic.to_dict()["real_photos"] is False
    photos = ExportPhotos(PhotoSet("real", 10), True, synthetic)
    assert not photos.real_photos  # real gate photos, synthetic calibration: not "real photos"
    assert ExportPhotos.from_dict(photos.to_dict()) == photos


def test_a_fp16_gate_written_before_the_record_reads_as_one_verdict():
    old = {"file": "model.fp16.onnx", "gate": verdict().to_dict(), "forced": False}
    variant = VariantRecord.from_dict("fp16", old)
    assert set(variant.gates) == {"fp16"} and variant.passed
