"""``python -m pipeline <stage>``: the only place that reads argv.

Params are loaded and validated once, before anything heavy is imported; a bad params.yaml
stops the stage with exit code 2 and one line naming the key, the value and what is allowed.
Every other user error is one line too, never a traceback: a device that is not there (exit
code 2, like a bad param), missing or malformed data, files and checkpoints, an unusable
tracking server (exit code 1). A stage stopped by SIGINT or SIGTERM exits with 128 + signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pipeline.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `flow`, `bench`, `compare`, `score` and `serve-model` have arguments of their own (and their own --help).
    sub = bool(argv) and argv[0] in ("flow", "bench", "compare", "score", "serve-model")
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__.splitlines()[0], add_help=not sub
    )
    parser.add_argument(
        "command",
        choices=(*STAGES, "flow", "bench", "compare", "score", "serve-model"),
        help="a DVC stage, the Prefect flow, the benchmark, the recipe comparison, the score of your own images, "
        "or serving the registry's champion",
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="show no progress (by default: bars on a terminal, else a line every runtime.progress_seconds)",
    )
    if sub:
        args, extra = parser.parse_known_args(argv)
    else:
        args, extra = parser.parse_args(argv), []

    from pipeline.config import ConfigError, load_params

    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.distributed import DistributedError
    from pipeline.langevin import KernelError
    from pipeline.progress import progress_mode
    from pipeline.runtime import DeviceError
    from pipeline.tracking import TrackingError
    from pipeline.train import TrainingDiverged, TrainingInterrupted

    progress = progress_mode(not args.no_progress, sys.stderr)  # bar on a terminal, else plain lines
    try:
        if args.command in STAGES:
            import importlib

            stage = importlib.import_module(f"pipeline.stages.{args.command}")
            if args.command in ("prepare", "evaluate", "ood", "register"):
                stage.run(params)
            else:
                stage.run(params, progress=progress)
        elif args.command == "flow":
            from pipeline.flows import main as flow_main

            return flow_main(extra, params_path=args.params)
        elif args.command == "bench":
            from pipeline.bench import main as bench_main

            return bench_main(params, extra)
        elif args.command == "compare":
            from pipeline.compare import main as compare_main

            return compare_main(extra, params_path=args.params)
        elif args.command == "score":
            from pipeline.score import main as score_main

            return score_main(params, extra)
        elif args.command == "serve-model":
            return serve_model(params, extra)
    except (DeviceError, KernelError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return 128 + exc.signum
    except (DataError, CheckpointError, TrackingError, TrainingDiverged, DistributedError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted (SIGINT); run it again to redo it", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as exc:  # a file that cannot be read or written: disk full, no permission, ...
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_model(params, argv: list[str]) -> int:
    """``python -m pipeline serve-model [--port N]``: ``mlflow models serve`` of the registry's champion.

    Binds 127.0.0.1 only. Checks first that the champion exists (one line, exit 1, if not), then
    replaces this process with MLflow's scoring server, which Ctrl-C stops.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline serve-model", description=serve_model.__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=5001, help="the port on 127.0.0.1 (default 5001)")
    args = parser.parse_args(argv)
    from pipeline import tracking

    uri = tracking.tracking_uri()
    version = tracking.champion_version(params.registry, uri)  # TrackingError: one line, exit 1
    model_uri = f"models:/{params.registry.model_name}@champion"
    print(f"serve-model: {model_uri} (version {version}) on http://127.0.0.1:{args.port}/invocations", flush=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the server resolves models:/ in the same store
    # MLflow starts the server as `uvicorn` from PATH: this interpreter's, also from an unactivated virtualenv.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    os.execv(sys.executable, [*command, "-h", "127.0.0.1", "-p", str(args.port)])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
