"""`fashion tune`: argument parsing only; the study is ``training.tune``. Imports neither torch nor Optuna
until the command runs (``fashion --help`` stays instant, and an install without the ``tune`` extra still
has a working command that says what to install)."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from fashion.console import emit
from fashion.errors import UserError
from fashion.host import keeping_freed_memory

EPILOG = """examples:
  fashion tune --data ../shared/datasets/fashion-products-sample --out runs/tune --trials 40
  fashion tune --data DATA --out runs/tune --trials 40          # the same command again resumes the study
  fashion tune --data DATA --out runs/tune --trials 60 --storage postgresql://user:pw@db/optuna   # a worker
  fashion tune --data DATA --out runs/tune --trials 40 --config my-recipe.yaml --space my-space.yaml \\
      --set epochs=6 --set max_samples=3000

writes OUT/trials/NNNN (one run directory per trial), OUT/trials.csv, OUT/best.yaml (a recipe for
`fashion train --config`), OUT/history.png, OUT/learning-curves.png, OUT/importances.png and OUT/report.md;
the study itself is in OUT/study.db unless --storage names another database (docs/tuning.md)
"""


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value (a fashion train setting), got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "tune",
        help="search the training settings with Optuna (TPE + pruning); the best as a recipe",
        description="Optuna's TPE over `fashion train`: each trial trains with sampled settings and reports "
        "its validation score per epoch; poor trials are pruned. The study lives in a database, so the same "
        "command resumes it and any number of workers can share it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = t.add_argument
    a("--data", required=True, help="dataset folder (any layout `fashion train` reads)")
    a("--out", required=True, help="study folder: trials, trunk cache, study.db, report")
    a("--trials", type=int, required=True,
      help="finished (complete or pruned) trials the study should hold, over all workers; 0: report only")
    a("--config", help="today's recipe, the baseline and the settings every trial starts from "
      "(default: models/default/recipe.yaml)")
    a("--set", dest="settings", action="append", type=_setting, default=[], metavar="KEY=VALUE",
      help="a setting over the recipe for every trial (repeatable), e.g. --set epochs=6")
    a("--space", help="YAML file over the default search space (training/tune_space.yaml); "
      "'name: null' removes an entry")
    a("--storage", help="Optuna RDB URL shared by the workers, e.g. postgresql://user:pw@host/db "
      "(default: sqlite under --out)")
    a("--study", default="fashion-tune", help="study name in the storage (default fashion-tune)")
    a("--pruner", choices=["median", "hyperband", "none"], default="median", help="default median")
    a("--prune-from-epoch", type=int, default=2, help="first epoch a trial may be pruned at (default 2)")
    a("--prune-startup-trials", type=int, default=4,
      help="finished trials before the median pruner prunes (default 4)")
    a("--startup-trials", type=int, default=10, help="TPE's random trials before it models (default 10)")
    a("--seed", type=int, help="the sampler's seed (leave unset when several workers share a study)")
    a("--timeout-min", type=float, help="this worker starts no new trial after this many minutes")
    a("--heartbeat-s", type=int, default=60, help="trial heartbeat interval (default 60)")
    a("--grace-s", type=int, default=180,
      help="a running trial silent this long is failed and queued again (default 180)")
    a("--max-retry", type=int, default=2, help="times a dead worker's trial is queued again (default 2)")
    a("--trunk-cache", help="the frozen trunk's cache folder (default: the recipe's, else OUT/trunk-cache)")
    a("--no-baseline", dest="baseline", action="store_false",
      help="do not queue today's recipe as the first trial")
    a("--no-report", dest="report", action="store_false",
      help="run trials only (a worker among many); a later run with the same --trials writes the report")
    t.set_defaults(func=keeping_freed_memory(_tune))


def _tune(args: argparse.Namespace) -> int:
    # lazy: Optuna and torch load when the command runs
    from training.tune import CONSECUTIVE_FAILURES, TuneConfig, tune

    names = ["data", "out", "trials", "space", "storage", "study", "pruner", "prune_from_epoch",
             "prune_startup_trials", "startup_trials", "seed", "timeout_min", "heartbeat_s", "grace_s",
             "max_retry", "trunk_cache", "baseline", "report"]
    values = {n: getattr(args, n) for n in names}
    cfg = TuneConfig(recipe=args.config, settings=tuple(args.settings), **values)
    result = tune(cfg)
    if result.ran.gave_up:
        raise UserError(f"{CONSECUTIVE_FAILURES} trials failed in a row; why: {result.out / 'trials.csv'}")
    if result.finished < cfg.trials:
        emit(f"the study holds {result.finished} of {cfg.trials} finished trials; the same command goes on")
    return 0
