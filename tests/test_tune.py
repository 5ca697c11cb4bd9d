"""``fashion tune`` (training/tune.py) and the trainer's epoch callback it drives: real studies on a small
synthetic catalogue with timm's tiny ``test_efficientnet``, real Optuna storages, real worker processes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.loop import EpochRecord
from training.train import train

TINY = dict(backbone="test_efficientnet", image_size=32, batch_size=16, workers=0, freeze_blocks=2,
            novelty_quantile=0, min_class_count=0, warmup_epochs=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """160 synthetic products in the Kaggle layout (``fashion synth``)."""
    from training.synth import generate

    root = tmp_path_factory.mktemp("tune") / "synth"
    generate(root, 160, seed=0)
    return root


class Stop(Exception):
    pass


def test_an_epoch_callback_that_asks_to_stop_ends_the_run_after_that_epoch(synth, tmp_path):
    seen: list[EpochRecord] = []

    def on_epoch(record: EpochRecord) -> bool:
        seen.append(record)
        return record.epoch == 2

    cfg = TrainConfig(data=str(synth), out=str(tmp_path / "run"), epochs=4, **TINY)
    result = train(cfg, on_epoch=on_epoch)
    assert [r.epoch for r in seen] == [1, 2] and result.epochs_run == 2
    assert result.best_score == max(r.val_score for r in seen)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_an_exception_from_the_epoch_callback_leaves_a_run_directory_that_resumes(synth, tmp_path):
    def on_epoch(record: EpochRecord) -> bool:
        if record.epoch == 2:
            raise Stop
        return False

    cfg = TrainConfig(data=str(synth), out=str(tmp_path / "run"), epochs=3, **TINY)
    with pytest.raises(Stop):
        train(cfg, on_epoch=on_epoch)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    last = load_checkpoint(run / "last.pt")
    assert last.epoch == 2 and last.extra["best_epoch"] == load_checkpoint(run / "best.pt").epoch
    resumed = TrainConfig(data=str(synth), out=str(tmp_path / "resumed"), epochs=3,
                          resume=str(run / "last.pt"), **TINY)
    assert train(resumed).epochs_run == 1  # epoch 3 only: what the interrupted run left is whole


# --- fashion tune ------------------------------------------------------------------------------------

RECIPE = {**TINY, "epochs": 2, "lr": 0.01}  # today's recipe of these tests: it learns within an epoch
# A learning rate from 1e-6 (learns nothing in 3 epochs) to 3e-2, and the frozen stages; the rest of the
# default space is left at the recipe's values to keep the trials few and short.
SPACE = {"lr": {"low": 1.0e-6, "high": 3.0e-2, "log": True}, "freeze_blocks": {"choices": [1, 2]},
         **{name: None for name in ("head_lr_scale", "weight_decay", "dropout", "label_smoothing",
                                    "class_weights", "logit_adjust", "image_size")}}
ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, doc: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture
def study_files(tmp_path) -> tuple[str, str]:
    return write_yaml(tmp_path / "recipe.yaml", RECIPE), write_yaml(tmp_path / "space.yaml", SPACE)


def tune_args(synth: Path, out: Path, files: tuple[str, str], trials: int, *extra: str) -> list[str]:
    return ["tune", "--data", str(synth), "--out", str(out), "--trials", str(trials), "--config", files[0],
            "--space", files[1], *extra]


def load(out: Path):
    import optuna

    return optuna.load_study(study_name="fashion-tune", storage=f"sqlite:///{out / 'study.db'}")


def worker(args: list[str]):
    """``fashion tune`` as its own process (one torch thread: the tests' machines have two cores)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fashion.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_an_epoch(out: Path, process, timeout_s: float = 90):
    """The running trial once it has reported a validation score (the worker is mid-trial)."""
    import time

    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        # A trial's first metrics.jsonl line: the study exists (it is not ours to create), an epoch is done.
        if any(p.stat().st_size for p in out.glob("trials/*/metrics.jsonl")):
            running = [t for t in load(out).trials if t.state == TrialState.RUNNING and t.intermediate_values]
            if running:
                return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no trial reported an epoch within {timeout_s} s")


@pytest.mark.slow
def test_a_study_prunes_poor_trials_resumes_and_writes_a_recipe_that_fashion_train_takes(
    synth, tmp_path, study_files
):
    import csv

    import yaml
    from optuna.trial import TrialState

    from fashion.cli import main

    out = tmp_path / "study"
    args = tune_args(synth, out, study_files, 4, "--seed", "0", "--prune-from-epoch", "1",
                     "--prune-startup-trials", "1")
    assert main(args) == 0
    trials = load(out).trials
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    baseline = trials[0]
    assert baseline.user_attrs["baseline"] and baseline.state == TrialState.COMPLETE
    assert baseline.params == {"lr": 0.01, "freeze_blocks": 2}  # today's recipe, run first, never pruned
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.intermediate_values) for t in trials]
    for t in pruned:  # stopped at once: its run directory ends at the epoch it was pruned at
        assert len(t.intermediate_values) < RECIPE["epochs"]
        lines = (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(t.intermediate_values)
        assert load_checkpoint(Path(t.user_attrs["run_dir"]) / "last.pt").epoch == len(lines)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == list(range(4))
    assert {r["state"] for r in rows} >= {"COMPLETE", "PRUNED"}
    assert (out / "history.png").stat().st_size > 0 and (out / "learning-curves.png").stat().st_size > 0
    best = load(out).best_trial
    assert f"trial {best.number}" in (out / "report.md").read_text()

    # The same command again: the study is whole, nothing runs; asking for one more runs exactly one.
    assert main(args) == 0 and len(load(out).trials) == 4
    assert main(tune_args(synth, out, study_files, 5, "--prune-from-epoch", "1")) == 0
    assert [t.number for t in load(out).trials] == list(range(5))

    best = load(out).best_trial  # the extra trial may have beaten the others
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe == {**RECIPE, **best.params}
    run = tmp_path / "tuned"
    assert main(["train", "--config", str(out / "best.yaml"), "--data", str(synth), "--out", str(run),
                 "--epochs", "1"]) == 0
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: trained[k] for k in best.params} == best.params


def test_a_worker_that_loses_the_race_to_create_the_storage_schema_connects_on_its_next_try(
    tmp_path, monkeypatch
):
    """Two workers started at once on a new database: Optuna's schema version INSERT is won by one, the
    other gets an IntegrityError (seen in CI). make_storage must try again, not end the worker."""
    import optuna
    import sqlalchemy.exc

    from training.tune import TuneConfig, make_storage

    real = optuna.storages.RDBStorage
    calls = []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:  # the other worker's INSERT landed first
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    out = tmp_path / "study"
    storage = make_storage(TuneConfig(data=str(tmp_path), out=str(out), trials=1))
    assert len(calls) == 2 and storage.get_all_studies() == []


def test_a_storage_that_keeps_refusing_ends_the_worker_with_a_tune_error_after_its_last_try(
    tmp_path, monkeypatch
):
    """Not a schema race but a database that cannot be opened: make_storage gives up after its tries with
    the typed error naming the storage, and waits longer before each new try."""
    import optuna
    import sqlalchemy.exc

    from training import tune

    calls, waits = [], []

    def refusing(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("CONNECT", {}, Exception("database is locked"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refusing)
    monkeypatch.setattr(tune.time, "sleep", waits.append)
    cfg = tune.TuneConfig(data=str(tmp_path), out=str(tmp_path / "study"), trials=1)
    with pytest.raises(tune.TuneError, match=r"cannot open the study's storage sqlite:.*database is locked"):
        tune.make_storage(cfg)
    assert len(calls) == tune._SCHEMA_TRIES
    assert len(waits) == tune._SCHEMA_TRIES - 1 and 0 < waits[0]
    assert all(a < b for a, b in itertools.pairwise(waits))


@pytest.mark.slow
def test_two_workers_share_one_study_and_split_its_trials(synth, tmp_path, study_files):
    from optuna.trial import TrialState

    out = tmp_path / "study"
    args = tune_args(synth, out, study_files, 4, "--no-report", "--pruner", "none")
    workers = [worker(args), worker(args)]
    for w in workers:
        assert w.wait(timeout=240) == 0, w.stderr.read()
    trials = load(out).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Each worker stops once the study holds 4 finished trials; one may have started a 5th by then.
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials)
    by_worker = {t.user_attrs["worker"] for t in trials}
    assert len(by_worker) == 2 and {f":{w.pid}" for w in workers} == {b[b.rindex(":"):] for b in by_worker}
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1  # one worker created the study


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_retried_when_the_same_command_runs_again(
    synth, tmp_path, study_files
):
    import os
    import signal
    import time

    from optuna.trial import TrialState

    from fashion.cli import main

    out = tmp_path / "study"
    # Long enough to be interrupted mid-trial: a tiny epoch takes ~80 ms on a quiet machine, and 3 of them
    # ended the trial before the test saw the first (CI, 2026-12-03); 30 without early stopping leave ~2 s.
    long = {**RECIPE, "epochs": 30, "patience": 30}
    files = (write_yaml(tmp_path / "long.yaml", long), study_files[1])
    args = tune_args(synth, out, files, 1, "--pruner", "none", "--heartbeat-s", "1", "--grace-s", "3")
    process = worker(args)
    victim = wait_for_an_epoch(out, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert load(out).trials[victim.number].state == TrialState.RUNNING  # nobody knows yet
    time.sleep(4)  # the grace period passes without a heartbeat

    assert main(args) == 0
    trials = load(out).trials
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == victim.params and retry[0].user_attrs.get("baseline") is True
    assert len(retry[0].intermediate_values) == long["epochs"]  # run again from its start, all of its epochs
    rows = (out / "trials.csv").read_text().splitlines()
    note = next(line for line in rows if line.startswith(f"{dead.number},"))
    assert "its worker died" in note and f"retried as {retry[0].number}" in note


@pytest.mark.slow
def test_ctrl_c_fails_the_running_trial_visibly_and_the_same_command_finishes_the_study(
    synth, tmp_path, study_files
):
    import signal

    from optuna.trial import TrialState

    from fashion.cli import main

    out = tmp_path / "study"
    # Long enough to be interrupted mid-trial: a tiny epoch takes ~80 ms on a quiet machine, and 3 of them
    # ended the trial before the test saw the first (CI, 2026-12-03); 30 without early stopping leave ~2 s.
    long = {**RECIPE, "epochs": 30, "patience": 30}
    files = (write_yaml(tmp_path / "long.yaml", long), study_files[1])
    args = tune_args(synth, out, files, 1, "--pruner", "none")
    process = worker(args)
    interrupted = wait_for_an_epoch(out, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    trials = load(out).trials
    assert trials[interrupted.number].state == TrialState.FAIL
    assert trials[interrupted.number].user_attrs["note"] == "interrupted"
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].user_attrs["requeued_from"] == interrupted.number

    assert main(args) == 0
    trials = load(out).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == interrupted.params and trials[1].user_attrs["baseline"]  # run again
    assert "interrupted; retried as 1" in (out / "trials.csv").read_text()


def test_the_search_space_refuses_what_a_trial_could_not_honour(tmp_path):
    from training.tune import TuneError, load_space

    base = TrainConfig(data="d", out="o", **RECIPE)
    space = load_space(None, base)
    assert [p.name for p in space.params][-2:] == ["mixup_alpha", "cutmix_alpha"]  # conditions come last
    cases = {
        "mixing frozen features": ({"mixup_alpha": {"low": 0.0, "high": 0.4}}, r"freeze_blocks: \[0\]"),
        "a post-hoc setting": ({"prior_correction": {"low": 0.0, "high": 1.0}}, "never sees"),
        "the split": ({"seed": {"choices": [0, 1]}}, "the split"),
        "an invalid value": ({"class_weights": {"choices": ["none", "loud"]}}, "not a valid value"),
        "an unknown setting": ({"learning_rate": {"low": 0.1, "high": 1}}, "not a fashion train setting"),
    }
    for name, (entry, message) in cases.items():
        with pytest.raises(TuneError, match=message):
            load_space(write_yaml(tmp_path / f"{len(name)}.yaml", entry), base)
    narrowed = load_space(write_yaml(tmp_path / "narrow.yaml", {"lr": {"low": 0.02, "high": 0.03},
                                                               "image_size": None}), base)
    assert "image_size" not in {p.name for p in narrowed.params}
    with pytest.raises(TuneError, match=r"recipe lies outside the search space: lr=0.01"):
        narrowed.baseline(base)


def test_a_storage_url_in_logs_and_errors_never_shows_its_password():
    from training.tune import _redacted

    assert _redacted("postgresql://tuner:s3cret@db:5432/studies") == "postgresql://tuner:***@db:5432/studies"
    assert "s3cret" not in _redacted("not a url://tuner:s3cret@db")
    assert _redacted("sqlite:///runs/tune/study.db") == "sqlite:///runs/tune/study.db"
