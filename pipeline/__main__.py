"""``python -m pipeline <stage>``: the only place that reads argv.

Params are loaded and validated once, before anything heavy is imported; a bad params.yaml
stops the stage with exit code 2 and one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import os
import sys

STAGES = ("prepare", "train_classifier", "train", "generate", "evaluate", "ood", "restore")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `flow`, `bench`, `compare` and `score` have arguments of their own (and their own --help): hand them the rest.
    sub = bool(argv) and argv[0] in ("flow", "bench", "compare", "score")
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__.splitlines()[0], add_help=not sub
    )
    parser.add_argument(
        "command",
        choices=(*STAGES, "flow", "bench", "compare", "score"),
        help="a DVC stage, the Prefect flow, the benchmark, the recipe comparison, or the score of your own images",
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
    progress = not args.no_progress and sys.stderr.isatty()

    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.distributed import DistributedError
    from pipeline.tracking import TrackingError
    from pipeline.train import TrainingDiverged, TrainingInterrupted

    try:
        if args.command in STAGES:
            import importlib

            stage = importlib.import_module(f"pipeline.stages.{args.command}")
            if args.command in ("prepare", "evaluate", "ood"):
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
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return 128 + exc.signum
    except (DataError, CheckpointError, TrackingError, TrainingDiverged, DistributedError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
