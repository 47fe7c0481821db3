"""``ray-app <workload> <stage> [options]`` — thin: parse, build the config, run one stage.

Flags are generated from the typed config sections and the workload's options, so ``--help`` always
matches what the code accepts. Anything else can be set with ``--set section.key=value``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel

from ray_app import config as config_mod
from ray_app.workloads import get_workload, names

STAGES: dict[str, tuple[str, str]] = {
    # stage: (config section whose fields become flags, help)
    "prepare": ("prepare", "Ray Data: raw inputs -> Parquet shards + rejects"),
    "train": ("train", "Ray Train TorchTrainer: DDP, checkpoint per epoch, resume by --run-name"),
    "evaluate": ("evaluate", "score the held-out split: accuracy, per-class report, confusion matrix"),
    "register": ("registration", "store the run's model as a new registry version and move an alias"),
    "rollback": ("rollback", "move an alias back to the version it had before its last move"),
    "predict": ("predict", "Ray Data batch inference with an actor pool -> Parquet"),
    "serve": ("serve", "Ray Serve HTTP endpoint with batching and autoscaling"),
    "tune": ("tune", "Ray Tune sweep (ASHA) over the train loop; the best trial is evaluated and registered"),
}
# Stages that act on a training run also take --run-name.
RUN_NAME_STAGES = {"evaluate", "register"}
# Stages that only touch the registry: no Ray instance is started or joined for them.
REGISTRY_ONLY_STAGES = {"rollback"}


def _stage_runner(stage: str) -> Callable[[config_mod.AppConfig], dict[str, Any]]:
    # Imported lazily: `ray-app --help` should not pay for importing torch and Ray.
    if stage == "prepare":
        from ray_app.engine.prepare import run_prepare as runner
    elif stage == "train":
        from ray_app.engine.train import run_train as runner
    elif stage == "evaluate":
        from ray_app.engine.evaluate import run_evaluate as runner
    elif stage == "register":
        from ray_app.engine.register import run_register as runner
    elif stage == "predict":
        from ray_app.engine.predict import run_predict as runner
    elif stage == "rollback":
        from ray_app.engine.rollback import run_rollback as runner
    elif stage == "tune":
        from ray_app.engine.tune import run_tune as runner
    else:
        from ray_app.serving.app import run_serve as runner
    return runner


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str) -> None:
    for name, field in model.model_fields.items():
        kwargs: dict[str, Any] = {
            "dest": f"{prefix}.{name}",
            "default": argparse.SUPPRESS,
            "help": field.description or "",
            "metavar": name.upper(),
        }
        annotation = str(field.annotation)
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif "list" in annotation:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = yaml.safe_load if "str" not in annotation else str
        if field.default is not None and "action" not in kwargs:
            kwargs["help"] += f" (default: {field.default})"
        parser.add_argument(_flag(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-app", description="MLOps on Ray: prepare, train, evaluate, register, predict, serve.")
    parser.add_argument("--log-level", default=None, help="ray_app's own log lines (default: WARNING, or INFO with --verbose)")
    parser.add_argument(
        "--verbose", action="store_true", help="also show Ray's INFO/WARNING lines and all worker output (default: only in Ray's log files)"
    )
    workloads = parser.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for workload_name in names():
        workload = get_workload(workload_name)
        stages = workloads.add_parser(workload_name, help=f"{workload_name} workload").add_subparsers(
            dest="stage", required=True, metavar="STAGE"
        )
        for stage, (section, help_text) in STAGES.items():
            sp = stages.add_parser(stage, help=help_text, description=help_text)
            common = sp.add_argument_group("common")
            common.add_argument("--config", help="YAML config file (CLI flags override it)")
            common.add_argument(
                "--workspace", dest="workspace", default=argparse.SUPPRESS, help="root URI for data, runs, models (default ./workspace)"
            )
            common.add_argument(
                "--models", dest="models", default=argparse.SUPPRESS, help="model registry URI (default <workspace>/models)"
            )
            common.add_argument(
                "--address",
                dest="address",
                default=argparse.SUPPRESS,
                help="Ray cluster address (default: RAY_ADDRESS or a local instance)",
            )
            common.add_argument(
                "--tracking-uri",
                dest="tracking.uri",
                default=argparse.SUPPRESS,
                help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<workspace>/mlflow.db)",
            )
            common.add_argument(
                "--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE", help="any config value, e.g. train.lr=0.001"
            )
            _add_model_flags(sp.add_argument_group(stage), config_mod.AppConfig.model_fields[section].annotation, section)
            if stage in RUN_NAME_STAGES:
                sp.add_argument(
                    "--run-name", dest="train.run_name", default=argparse.SUPPRESS, help="training run to use (default: default)"
                )
            _add_model_flags(sp.add_argument_group(f"{workload_name} options"), workload.Options, "options")
    return parser


def parse_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {k: v for k, v in vars(args).items() if "." in k or k in ("workspace", "models", "address")}
    for item in args.set_values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``ray-app``, ``python -m ray_app``)."""
    from ray_app.worker_start import fewer_gc_pauses

    # A stage's own process imports Ray, torch and more before it starts any work, like a worker
    # (0.5 s of CPU less per command here); a command is short-lived, so the late collection of
    # cyclic garbage costs nothing. Not in run_cli: callers in a process of their own keep theirs.
    fewer_gc_pauses()
    run_cli(argv)
    return 0


def run_cli(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one stage and return its summary (also printed as JSON)."""
    args = build_parser().parse_args(argv)
    # The stage's own INFO lines repeat what its progress lines and JSON summary already say.
    level = args.log_level or ("INFO" if args.verbose else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load_config(args.workload, args.config, parse_overrides(args))
    except ValueError as exc:  # pydantic ValidationError included: say which field is wrong
        raise SystemExit(f"invalid configuration: {exc}") from None
    from ray_app.engine.guards import refuse_overlapping_output

    try:  # before Ray starts: an output over an input is refused at once, with nothing touched
        refuse_overlapping_output(args.stage, config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None

    from ray_app.runtime import connect

    dashboard = (
        connect(config.address, verbose=args.verbose, serving=args.stage == "serve") if args.stage not in REGISTRY_ONLY_STAGES else None
    )
    started = time.perf_counter()
    from ray_app import progress
    from ray_app.registry_store import RegistryError

    runner = _stage_runner(args.stage)
    if not args.verbose:
        progress.quiet_ray_console()  # Ray libraries the stage imported set up their own console loggers
    progress.say(progress.stage_line(args.stage, args.workload))
    try:
        result = runner(config)
    except RegistryError as exc:  # a refused promotion, a damaged registry file, a full disk: the message says it all
        raise SystemExit(f"error: {exc}") from None
    result = {
        "stage": args.stage,
        "workload": args.workload,
        **result,
        "dashboard": dashboard,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    progress.say(progress.stage_line(args.stage, args.workload, result, result["wall_seconds"]))
    print(json.dumps(result, indent=2, default=str))
    if args.stage == "serve" and config.serve.blocking:
        _serve_forever()
    return result


def _serve_forever() -> None:
    print("serving; Ctrl-C to stop", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
