"""``fashion tune``: Optuna's TPE over ``fashion train``, with pruning, in a storage that survives the
process.

A short sequence of typed steps:

1. ``load_base``: today's recipe (``--config``, the shipped ``models/default/recipe.yaml`` by default) and the
   ``--set`` overrides, as a validated ``TrainConfig``;
2. ``load_space``: the search space (``training/tune_space.yaml``, extended or narrowed by ``--space``),
   checked against the recipe;
3. ``open_study``: the study in its storage — SQLite under ``--out`` by default, or ``--storage URL`` (an
   RDB shared by many workers) — with Optuna's heartbeat, so that a trial whose worker died is failed and
   queued again (``RetryHeartbeatStaleTrialCallback``); today's recipe is queued as the first trial;
4. ``run_trials``: ``study.optimize`` until the study holds ``--trials`` finished (complete or pruned)
   trials; each trial is one ``train(cfg, on_epoch=...)`` into ``OUT/trials/NNNN``, reporting its validation
   score per epoch, stopped at once (``optuna.TrialPruned``) when the pruner says so; frozen-trunk trials
   share one trunk cache (``OUT/trunk-cache``, one key per frozen-stage count and image size);
5. ``write_report``: ``trials.csv`` (and the table printed), ``best.yaml`` (a recipe ``fashion train
   --config`` takes), plots, and ``report.md`` comparing the best trial with today's recipe on the
   validation split, and on the drift split when the recipe splits by period.

Any number of processes may run the same command against one storage: Optuna hands each its own trials.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url  # optuna's RDB storage is SQLAlchemy

from fashion.console import emit, table
from fashion.errors import UserError
from training.config import ConfigError, TrainConfig
from training.loop import EpochRecord, Metrics
from training.train import preprocessing_for, train

log = logging.getLogger(__name__)

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "models" / "default" / "recipe.yaml"
DEFAULT_SPACE = Path(__file__).with_name("tune_space.yaml")
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Settings a trial must not change: they define the data, the split the trials are compared on, where a
# trial writes, or act after training where the validation score a trial reports cannot see them.
FIXED = {
    "data": "the catalogue", "format": "the catalogue", "attributes": "the heads",
    "out": "where a trial writes", "resume": "where a trial starts", "trunk_cache": "the cache's folder",
    "seed": "the split", "val_fraction": "the split", "split_by": "the split", "val_from": "the split",
    "max_samples": "the split", "hold_out": "the split",
    "prior_correction": "best.pt after training, which the reported validation score never sees "
    "(try it on a trained model with fashion evaluate --prior-correction)",
    "novelty_quantile": "the novelty gate, fitted after training (trials skip it, best.yaml keeps it)",
    "title_blend": "the title-only heads' vote, set at calibration after training, which the reported "
    "validation score never sees (try it with fashion calibrate --title-blend)",
}
# What every trial changes in the recipe: the novelty gate is fitted after training, never moves the
# validation score, and cost the shipped recipe 21 minutes; the tuned recipe (best.yaml) keeps the recipe's.
TRIAL_SETTINGS: dict[str, Any] = {"novelty_quantile": 0.0}
MIN_IMPORTANCE_TRIALS = 4  # complete trials before parameter importances mean anything (fANOVA over them)
CONSECUTIVE_FAILURES = 3  # a worker stops after this many failed trials in a row (a setting that cannot work)


class TuneError(UserError, ValueError):
    """The study cannot run as asked; the message says what to change."""


@contextmanager
def experimental() -> Iterator[None]:
    """Optuna's heartbeat, retry callback, grouped multivariate TPE and matplotlib plots are marked
    experimental; they are used on purpose, as Optuna's guidance for distributed runs asks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


# --- the settings of a study ----------------------------------------------------------------------


@dataclass(frozen=True)
class TuneConfig:
    data: str
    out: str
    trials: int  # finished (complete or pruned) trials the study should hold, over all its workers
    recipe: str | None = None  # today's recipe; None: the shipped models/default/recipe.yaml
    settings: tuple[tuple[str, Any], ...] = ()  # ``--set key=value`` over the recipe, for every trial
    space: str | None = None  # a YAML file over training/tune_space.yaml
    storage: str | None = None  # an Optuna RDB URL; None: sqlite under ``out``
    study: str = "fashion-tune"
    pruner: str = "median"
    prune_from_epoch: int = 2  # the first epoch at which a trial may be pruned
    prune_startup_trials: int = 4  # finished trials before the median pruner prunes anything
    startup_trials: int = 10  # TPE's random trials before it models the space
    seed: int | None = None  # the sampler's; leave it unset when several workers share a study
    timeout_min: float | None = None  # this worker starts no trial after this many minutes
    heartbeat_s: int = 60
    grace_s: int = 180  # a running trial without a heartbeat for this long is failed and queued again
    max_retry: int = 2  # times a trial whose worker died is queued again
    trunk_cache: str | None = None  # None: the recipe's, else OUT/trunk-cache
    baseline: bool = True  # queue today's recipe as a trial (never pruned) to compare the best with
    report: bool = True  # write the report when this worker is done

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise TuneError(f"--trials must be 0 (report only) or more, got {self.trials}")
        if self.pruner not in PRUNERS:
            raise TuneError(f"--pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.prune_from_epoch < 1 or self.prune_startup_trials < 0 or self.startup_trials < 0:
            raise TuneError("--prune-from-epoch must be 1 or more, the startup trial counts 0 or more")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise TuneError(f"the grace period ({self.grace_s} s) must exceed the heartbeat "
                            f"({self.heartbeat_s} s), which must be 1 s or more")
        if self.max_retry < 0:
            raise TuneError(f"--max-retry must be 0 or more, got {self.max_retry}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"


@dataclass(frozen=True)
class Base:
    """Today's recipe: the keys its file (and ``--set``) name, and the configuration trials start from."""

    keys: tuple[str, ...]
    config: TrainConfig

    def recipe(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe's settings with ``params`` over them: what ``fashion train --config`` takes."""
        values = self.config.to_dict()
        return {k: params.get(k, values[k]) for k in (*self.keys, *[p for p in params if p not in self.keys])}


def load_base(cfg: TuneConfig) -> Base:
    recipe = Path(cfg.recipe) if cfg.recipe else DEFAULT_RECIPE
    if not recipe.is_file():
        raise TuneError(f"recipe {recipe} not found; pass --config RECIPE.yaml")
    loaded = yaml.safe_load(recipe.read_text()) or {}
    if not isinstance(loaded, dict):
        raise TuneError(f"{recipe} must hold a mapping of setting: value")
    settings = dict(cfg.settings)
    keys = [k.replace("-", "_") for k in loaded] + [k for k in settings if k not in loaded]
    config = TrainConfig.from_sources(str(recipe), {**settings, "data": cfg.data, "out": cfg.out})
    return Base(tuple(k for k in keys if k not in ("data", "out")), config)


# --- the search space -----------------------------------------------------------------------------


def _is_int_setting(name: str) -> bool:
    kind = str(next(f.type for f in fields(TrainConfig) if f.name == name))
    return "int" in kind and "float" not in kind


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (``low``/``high``, ``log``, ``step``) or ``choices``, sampled only
    when every ``when`` setting has one of its values."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @classmethod
    def from_dict(cls, name: str, doc: Any) -> Param:
        if not isinstance(doc, dict) or not set(doc) <= {"low", "high", "log", "step", "choices", "when"}:
            raise TuneError(f"space entry {name!r}: a mapping of low/high/log/step, or choices, and when")
        when = doc.get("when") or {}
        if not isinstance(when, dict):
            raise TuneError(f"space entry {name!r}: when is a mapping of setting: [values]")
        conditions = tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())
        param = cls(name, doc.get("low"), doc.get("high"), bool(doc.get("log", False)), doc.get("step"),
                    tuple(doc.get("choices") or ()), conditions)
        if param.choices and param.low is None and param.high is None:
            return param
        if param.choices or param.low is None or param.high is None or not param.low < param.high:
            raise TuneError(f"space entry {name!r}: give choices, or low < high")
        if param.log and param.low <= 0:
            raise TuneError(f"space entry {name!r}: a log scale needs low > 0")
        return param

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.choices:
            doc = {"choices": list(self.choices)}
        if self.log:
            doc["log"] = True
        if self.step is not None:
            doc["step"] = self.step
        if self.when:
            doc["when"] = {k: list(v) for k, v in self.when}
        return doc

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return value is not None and float(self.low or 0) <= float(value) <= float(self.high or 0)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        low, high = self.low or 0, self.high or 0
        if _is_int_setting(self.name):
            return trial.suggest_int(self.name, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(low), float(high), step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]  # the unconditional ones first: a condition reads only those (or the recipe)

    def to_dict(self) -> dict[str, Any]:
        return {p.name: p.to_dict() for p in self.params}

    def sample(self, trial: optuna.Trial, base: TrainConfig) -> dict[str, Any]:
        """The trial's settings: each active parameter suggested, in order."""
        values = base.to_dict()
        params: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                params[p.name] = values[p.name] = p.suggest(trial)
        return params

    def baseline(self, base: TrainConfig) -> dict[str, Any]:
        """Today's recipe as values of the active parameters (its image size resolved from the backbone's
        contract when the recipe leaves it to the backbone)."""
        values = base.to_dict()
        values["image_size"] = preprocessing_for(base).image_size
        out = {p.name: values[p.name] for p in self.params if p.active(values)}
        outside = [f"{k}={v!r} ({next(p for p in self.params if p.name == k).to_dict()})"
                   for k, v in out.items() if not next(p for p in self.params if p.name == k).contains(v)]
        if outside:
            raise TuneError(f"today's recipe lies outside the search space: {'; '.join(outside)}; widen the "
                            f"space (--space) or run without the baseline trial (--no-baseline)")
        return out


def load_space(path: str | None, base: TrainConfig) -> SearchSpace:
    """``training/tune_space.yaml`` with the entries of ``path`` over it (``name: null`` removes one)."""
    doc = yaml.safe_load(DEFAULT_SPACE.read_text())
    if path:
        extra = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        if not isinstance(extra, dict):
            raise TuneError(f"--space {path}: a YAML mapping of setting: {{low, high}} or {{choices}}")
        doc.update(extra)
    known = {f.name for f in fields(TrainConfig)}
    params = [Param.from_dict(name, entry) for name, entry in doc.items() if entry is not None]
    for p in params:
        if p.name not in known:
            raise TuneError(f"space entry {p.name!r} is not a fashion train setting; known: {sorted(known)}")
        if p.name in FIXED:
            raise TuneError(f"{p.name} cannot be searched: it changes {FIXED[p.name]}")
        for extreme in p.choices or (p.low, p.high):  # every value must make a valid configuration
            value: dict[str, Any] = {p.name: extreme}
            if _is_int_setting(p.name) and not p.choices:
                value[p.name] = int(extreme or 0)
            try:
                replace(base, **value)
            except (ConfigError, TypeError) as e:
                raise TuneError(f"space entry {p.name!r}: {extreme!r} is not a valid value: {e}") from e
    unconditional = {p.name for p in params if not p.when}
    for p in params:
        if any(k in {q.name for q in params} - unconditional for k, _ in p.when):
            raise TuneError(f"space entry {p.name!r}: a condition may name only unconditional settings")
    mixing = [p.name for p in params if p.name in ("mixup_alpha", "cutmix_alpha")]
    frozen = next((p for p in params if p.name == "freeze_blocks"), None)
    for name in mixing:
        p = next(q for q in params if q.name == name)
        frozen_values = (base.freeze_blocks,) if frozen is None else frozen.choices or (1,)
        if any(v != 0 for v in frozen_values) and dict(p.when).get("freeze_blocks") != (0,):
            raise TuneError(f"{name} needs `when: {{freeze_blocks: [0]}}`: the frozen trunk's cached "
                            "features cannot be mixed (training.sources refuses MixUp/CutMix with them)")
    return SearchSpace(tuple(sorted(params, key=lambda p: bool(p.when))))


# --- the study --------------------------------------------------------------------------------------


_SCHEMA_TRIES = 5


def make_storage(cfg: TuneConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with a heartbeat: a trial whose worker stops beating for ``grace_s`` is failed and
    queued again up to ``max_retry`` times (Optuna's recipe for workers that may die)."""
    url = cfg.storage_url
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    # SQLite: wait for another worker's write instead of failing; a server: drop connections it closed.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    shown = _redacted(url)  # logs and errors never carry a database password

    def attempt() -> optuna.storages.RDBStorage:
        with experimental():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_s, grace_period=cfg.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(cfg.max_retry),
            )

    # Workers started together on a new database race to create its schema (Optuna records its version
    # with an INSERT that only one can win); the loser finds the schema made and connects on its next try.
    for retry in range(1, _SCHEMA_TRIES):
        try:
            return attempt()
        except sqlalchemy.exc.DBAPIError as e:  # IntegrityError / OperationalError from the schema race
            log.info("storage %s: another worker is creating the schema (%s); trying again", shown, e.orig)
            time.sleep(0.5 * retry)
    try:  # the last try
        return attempt()
    except sqlalchemy.exc.DBAPIError as e:
        raise TuneError(f"cannot open the study's storage {shown}: {e.orig}") from e


def _redacted(url: str) -> str:
    """``url`` with its password, if any, as ``***`` (SQLAlchemy's own rendering)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1]  # not a URL SQLAlchemy reads: at least drop any credentials


def make_pruner(cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup_trials,
                                           n_warmup_steps=cfg.prune_from_epoch)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.prune_from_epoch, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, base: Base, space: SearchSpace) -> optuna.Study:
    """The study (created, or loaded to resume); today's recipe queued first in a new one."""
    baseline = space.baseline(base.config) if cfg.baseline else None  # refused before anything is written
    storage = make_storage(cfg)
    with experimental():
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=cfg.startup_trials, seed=cfg.seed, multivariate=True, group=True,
            constant_liar=True,  # workers running at once are steered away from each other's points
        )
    pruner = make_pruner(cfg, base.config.epochs)
    try:  # exactly one worker creates the study (the database's unique name decides) and queues the baseline
        study = optuna.create_study(storage=storage, study_name=cfg.study, direction="maximize",
                                    sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=cfg.study, sampler=sampler, pruner=pruner)
        if study.user_attrs.get("space", space.to_dict()) != space.to_dict():
            log.warning("the search space differs from the one study %s started with; TPE models each "
                        "parameter's history as it was recorded", cfg.study)
        return study
    log.info("study %s created in %s", cfg.study, redacted(cfg.storage_url))
    study.set_user_attr("space", space.to_dict())
    study.set_user_attr("recipe", base.recipe({}))
    if baseline is not None:
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    return study


def redacted(url: str) -> str:
    """The storage URL without its password, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Reporter:
    """The trainer's epoch callback: the validation score to Optuna each epoch, and ``optuna.TrialPruned``
    at once when the pruner says so (the run directory stays as that epoch left it)."""

    def __init__(self, trial: optuna.Trial, prunable: bool) -> None:
        self.trial, self.prunable = trial, prunable

    def __call__(self, record: EpochRecord) -> bool:
        self.trial.report(record.val_score, record.epoch)
        if self.prunable and self.trial.should_prune():
            raise optuna.TrialPruned(f"at epoch {record.epoch}, validation score {record.val_score:.4f}")
        return False


def brief(metrics: Metrics) -> dict[str, dict[str, float]]:
    return {k: {m: v[m] for m in ("accuracy", "macro_f1", "harmonic_f1")} for k, v in metrics.items()}


@dataclass
class Objective:
    """One trial: the sampled settings over today's recipe, trained into ``OUT/trials/NNNN``; its value is
    the trainer's best validation score."""

    cfg: TuneConfig
    base: Base
    space: SearchSpace
    trunk_cache: str
    train_fn: Callable[..., Any] = train
    ran: int = 0

    def __call__(self, trial: optuna.Trial) -> float:
        baseline = bool(trial.user_attrs.get("baseline"))
        params = self.space.sample(trial, self.base.config)
        run_dir = Path(self.cfg.out) / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_id())
        self.ran += 1
        settings = replace(self.base.config, out=str(run_dir), trunk_cache=self.trunk_cache, resume=None,
                           **TRIAL_SETTINGS, **params)
        log.info("trial %d%s: %s", trial.number, " (today's recipe)" if baseline else "", params)
        try:
            result = self.train_fn(settings, on_epoch=Reporter(trial, prunable=not baseline))
        except KeyboardInterrupt:  # Ctrl-C: this trial fails, its settings wait for the same command again
            trial.set_user_attr("note", "interrupted")
            again = {"requeued_from": trial.number, **({"baseline": True} if baseline else {})}
            trial.study.enqueue_trial(params, user_attrs=again)
            raise
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("note", f"error: {e}"[:300])
            raise
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("val", brief(result.val_metrics))
        return float(result.best_score)


@dataclass
class Budget:
    """Stops this worker once the study holds ``trials`` finished trials, or gives up after
    ``CONSECUTIVE_FAILURES`` of its own trials failed in a row."""

    trials: int
    failures: int = 0

    @property
    def gave_up(self) -> bool:
        return self.failures >= CONSECUTIVE_FAILURES

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.gave_up:
            log.error("%d trials failed in a row (the last: %s); this worker stops", self.failures,
                      trial.user_attrs.get("note", "no message"))
            study.stop()
        elif finished(study) >= self.trials:
            study.stop()


@dataclass(frozen=True)
class Ran:
    """What this worker did."""

    started: int  # trials
    gave_up: bool  # stopped after CONSECUTIVE_FAILURES failures in a row


def run_trials(cfg: TuneConfig, study: optuna.Study, base: Base, space: SearchSpace) -> Ran:
    """This worker's share of the trials."""
    with experimental():
        optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed, queued again
    if finished(study) >= cfg.trials:
        log.info("study %s holds %d finished trials (asked for %d)", cfg.study, finished(study), cfg.trials)
        return Ran(0, False)
    cache = cfg.trunk_cache or base.config.trunk_cache or str(Path(cfg.out) / "trunk-cache")
    objective = Objective(cfg, base, space, cache)
    budget = Budget(cfg.trials)
    study.optimize(objective, callbacks=[budget], catch=(UserError,), gc_after_trial=True,
                   timeout=None if cfg.timeout_min is None else 60 * cfg.timeout_min)
    return Ran(objective.ran, budget.gave_up)


# --- the report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One line of ``trials.csv``."""

    number: int
    state: str
    value: float | None
    epochs: int  # epochs that reported a validation score
    minutes: float | None
    worker: str
    retry_of: int | None
    note: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, trial: FrozenTrial, again_as: int | None = None) -> TrialRow:
        """``again_as``: the trial that runs this one's settings again (it was interrupted, or its worker
        died)."""
        notes = ["today's recipe"] if trial.user_attrs.get("baseline") else []
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            notes.append(f"pruned at epoch {max(trial.intermediate_values)}")
        elif trial.state == TrialState.FAIL:
            # A trial that ended by an exception says why; one failed by the heartbeat cannot.
            died = "note" not in trial.user_attrs
            notes.append(trial.user_attrs.get("note", "its worker died (no heartbeat)"))
            if again_as is not None:
                notes.append(f"retried as {again_as}")
            elif died:
                notes.append("not retried (max_retry)")
        minutes = trial.duration.total_seconds() / 60 if trial.duration is not None else None
        return cls(trial.number, trial.state.name, trial.value, len(trial.intermediate_values), minutes,
                   trial.user_attrs.get("worker", ""), runs_again(trial), "; ".join(notes),
                   dict(trial.params))

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "state": self.state, "value": self.value, "epochs": self.epochs,
                "minutes": None if self.minutes is None else round(self.minutes, 2), "worker": self.worker,
                "retry_of": self.retry_of, "note": self.note, **self.params}


CSV_FIELDS = ("trial", "state", "value", "epochs", "minutes", "worker", "retry_of", "note")


def runs_again(trial: FrozenTrial) -> int | None:
    """The trial whose settings this one runs again, if any: one whose worker died (queued again by
    Optuna's heartbeat retry) or one interrupted by Ctrl-C (queued again by ``Objective``)."""
    with experimental():
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[-1] if history else trial.user_attrs.get("requeued_from")


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    trials = study.get_trials(deepcopy=False)
    again = {runs_again(t): t.number for t in trials if runs_again(t) is not None}
    return [TrialRow.of(t, again.get(t.number)) for t in trials]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write_text(path: Path, text: str) -> Path:
    """Written whole or not at all (workers sharing a folder may report at the same time)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_table(rows: Sequence[TrialRow], out: Path) -> Path:
    names = sorted({k for r in rows for k in r.params})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_FIELDS, *names])
    writer.writeheader()
    writer.writerows(r.to_dict() for r in rows)
    emit(table(["trial", "state", "value", "epochs", "min", "note", *names],
               [[r.number, r.state, _fmt(r.value), r.epochs, "" if r.minutes is None else f"{r.minutes:.2f}",
                 r.note,
                 *[_fmt(r.params.get(n)) for n in names]] for r in rows]))
    return write_text(out / "trials.csv", buffer.getvalue())


def write_best_recipe(study: optuna.Study, base: Base, cfg: TuneConfig, baseline: FrozenTrial | None) -> Path:
    best = study.best_trial
    recipe = base.recipe(best.params)
    than = f" (today's recipe: {baseline.value:.4f})" if baseline is not None else ""
    header = (
        f"# fashion tune: study {cfg.study}, trial {best.number} of {len(study.trials)}, validation score "
        f"{best.value:.4f}{than}\n"
        f"#   fashion train --config {Path(cfg.out) / 'best.yaml'} --data {cfg.data} --out runs/tuned\n"
    )
    return write_text(Path(cfg.out) / "best.yaml", header + yaml.safe_dump(recipe, sort_keys=False))


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, learning curves (pruned trials end early) and parameter importances, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots  # lazy: needs matplotlib, only for a report

    written = []
    drawings: list[tuple[str, Callable[[optuna.Study], Any]]] = [
        ("history.png", plots.plot_optimization_history),
        ("learning-curves.png", plots.plot_intermediate_values),
        ("importances.png", plots.plot_param_importances),
    ]
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    for name, draw in drawings:
        if name == "importances.png" and complete < MIN_IMPORTANCE_TRIALS:
            log.info("no %s: importances need %d complete trials, the study has %d", name,
                     MIN_IMPORTANCE_TRIALS, complete)
            continue
        try:
            with experimental():
                ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of one finished trial
            log.warning("no %s: %s", name, e)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(out / name)
    return written


@dataclass(frozen=True)
class Contender:
    """A trial in the comparison: its validation result, and its drift result when there is one."""

    label: str
    trial: FrozenTrial
    drift_score: float | None = None
    drift: Metrics | None = None


def drift_of(trial: FrozenTrial, out: Path, name: str, device: str) -> tuple[float | None, Metrics | None]:
    """``fashion evaluate --subset drift`` of the trial's best.pt, when this machine has it."""
    from training.evaluate import evaluate  # lazy: only a recipe split by period has a drift split

    checkpoint = Path(trial.user_attrs.get("run_dir", "")) / "best.pt"
    if not checkpoint.is_file():
        log.warning("trial %d's best.pt is not here (%s): no drift score for it", trial.number, checkpoint)
        return None, None
    result = evaluate(checkpoint, out / "compare" / name, subset="drift", device=device)
    return result.score, result.attributes


def compare(study: optuna.Study, base: Base, out: Path) -> list[Contender]:
    """Today's recipe (the baseline trial) and the best trial, on the validation split (the same for every
    trial: same data, seed and split settings) and on the drift split when the recipe splits by period."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    picked = [("best", study.best_trial)]
    if baseline is not None:
        picked.insert(0, ("today's recipe", baseline))
    contenders = []
    for label, trial in picked:
        drift: tuple[float | None, Metrics | None] = (None, None)
        if base.config.split_by is not None:
            drift = drift_of(trial, out, "baseline" if trial is baseline else "best", base.config.device)
        contenders.append(Contender(label, trial, *drift))
    return contenders


def comparison_table(contenders: Sequence[Contender], split: str | None) -> str:
    attrs = sorted({a for c in contenders for a in c.trial.user_attrs.get("val", {})})
    headers = ["", "trial", "val score", *[f"{a} acc" for a in attrs]]
    rows = [[c.label, c.trial.number, _fmt(c.trial.value),
             *[_fmt(c.trial.user_attrs.get("val", {}).get(a, {}).get("accuracy")) for a in attrs]]
            for c in contenders]
    text = table(headers, rows)
    if split is not None:
        drift_rows = [[c.label, c.trial.number, _fmt(c.drift_score),
                       *[_fmt((c.drift or {}).get(a, {}).get("accuracy")) for a in attrs]]
                      for c in contenders]
        text += f"\n\nDrift split ({split} from the recipe's val_from on):\n\n"
        text += table(["", "trial", "drift score", *[f"{a} acc" for a in attrs]], drift_rows)
    return text


@dataclass(frozen=True)
class TuneResult:
    out: Path
    storage: str
    finished: int
    pruned: int
    ran: Ran
    best_trial: int | None
    best_value: float | None
    baseline_value: float | None
    files: tuple[Path, ...] = ()


def write_report(cfg: TuneConfig, study: optuna.Study, base: Base, ran: Ran) -> TuneResult:
    out = Path(cfg.out)
    rows = trial_rows(study)
    files = [write_table(rows, out)]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    result = TuneResult(out, cfg.storage_url, finished(study), pruned, ran, None, None,
                        baseline.value if baseline else None)
    if not complete:
        emit(f"no complete trial yet in study {cfg.study} ({len(rows)} trials)")
        return replace(result, files=tuple(files))
    files.append(write_best_recipe(study, base, cfg, baseline))
    files += write_plots(study, out)
    contenders = compare(study, base, out)
    text = comparison_table(contenders, base.config.split_by)
    best = study.best_trial
    images = "".join(f"![{p.stem}]({p.name})\n" for p in files if p.suffix == ".png")
    report = (
        f"# fashion tune: study {cfg.study}\n\n"
        f"{result.finished} finished trials ({pruned} pruned) of {len(rows)}. Objective: the trainer's best "
        f"validation score (the mean harmonic F1 over the heads). Best: trial {best.number}, "
        f"{best.value:.4f}.\n\n{text}\n\nBest settings: `{best.params}`; as a recipe: "
        f"[best.yaml](best.yaml); every trial: [trials.csv](trials.csv).\n\n{images}"
    )
    files.append(write_text(out / "report.md", report))
    emit(text)
    emit(f"best trial {best.number}: {best.value:.4f}; recipe {out / 'best.yaml'}; "
         f"report {out / 'report.md'}")
    return replace(result, best_trial=best.number, best_value=best.value, files=tuple(files))


# --- the command ------------------------------------------------------------------------------------


def tune(cfg: TuneConfig) -> TuneResult:
    """Run this worker's share of the study (resuming it if it exists) and write the report."""
    base = load_base(cfg)
    space = load_space(cfg.space, base.config)
    study = open_study(cfg, base, space)
    ran = run_trials(cfg, study, base, space) if cfg.trials else Ran(0, False)
    if not cfg.report:
        pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        return TuneResult(Path(cfg.out), cfg.storage_url, finished(study), pruned, ran, None, None, None)
    return write_report(cfg, study, base, ran)
