"""Every user mistake is a ``fashion.errors.UserError``: the CLI prints one line and exits 2, no traceback."""

from __future__ import annotations

import importlib

import pytest

from fashion.cli import main
from fashion.errors import UserError

STAGE_ERRORS = [
    ("fashion.contract", "ImageError"),
    ("orchestration.serve", "StackError"),
    ("training.config", "ConfigError"),
    ("training.data", "DatasetError"),
    ("training.checkpoint", "CheckpointError"),
    ("training.model", "ModelError"),
    ("training.weights", "WeightsError"),
    ("export.errors", "ExportError"),
    ("export.errors", "ParityError"),
    ("export.errors", "PrecisionError"),
    ("export.errors", "TensorRTUnavailable"),
    ("export.deploy", "DeployError"),
    ("orchestration.triton", "TritonError"),
    ("gateway.config", "ConfigError"),
    ("fashion.metadata", "MetadataError"),
    ("loadtest.errors", "LoadtestError"),
]


@pytest.mark.parametrize(("module", "name"), STAGE_ERRORS)
def test_every_stage_error_is_a_user_error(module, name):
    assert issubclass(getattr(importlib.import_module(module), name), UserError)


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--checkpoint", "/nonexistent/best.pt"],
        ["bench", "--out", "OUT", "--checkpoint", "/nonexistent/model.pt"],
        ["train", "--data", "/nonexistent/catalogue", "--out", "OUT"],
        ["synth", "--out", "OUT", "--count", "0"],
    ],
)
def test_a_user_mistake_exits_2_with_one_line_and_no_traceback(argv, tmp_path, capsys):
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fashion {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_a_bug_is_not_swallowed_as_a_user_error(monkeypatch, tmp_path):
    import training.synth

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(training.synth, "generate", broken)
    with pytest.raises(ZeroDivisionError):
        main(["synth", "--out", str(tmp_path), "--count", "1"])
