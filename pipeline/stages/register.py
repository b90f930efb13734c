"""Stage ``register``: the trained model into MLflow's model registry, through the FID quality gate.

One registered version per trained model (a re-run for the same model reuses its version and
decides again, e.g. after ``evaluate`` re-ran). ``champion`` moves to it only if its FID beats
the champion's by ``registry.fid_margin``; otherwise it is the ``challenger``. The outcome is
written to ``paths.registry_info`` (read by the Prefect report) and printed in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import DataError
from pipeline.stages.common import file_md5, write_json


def run(params: Params) -> dict:
    out = Path(params.paths.registry_info)
    run_id = tracking.read_run_info(params.paths.run_info)
    skipped = (
        "registry.enabled is false" if not params.registry.enabled
        else "tracking.enabled is false" if not params.tracking.enabled
        else f"no MLflow run in {params.paths.run_info}" if not run_id
        else None
    )
    if skipped:
        outcome = {"registered": False, "reason": skipped}
        write_json(outcome, out)
        print(f"register: not registered ({skipped})")
        return outcome
    # Reopened first: a store or run that cannot be used stops the stage in one line.
    tracker = tracking.resume_run(params.tracking, run_id, params.flat())
    metrics_path = Path(params.paths.metrics_dir) / "evaluate.json"
    needed = {params.paths.model: "train", params.paths.classifier: "train_classifier", metrics_path: "evaluate"}
    for path, stage in needed.items():
        if not Path(path).is_file():
            raise DataError(f"register: {path} not found; run the {stage} stage first")
    metrics = json.loads(metrics_path.read_text())
    if not isinstance(metrics.get("fid"), (int, float)):
        raise DataError(f"register: {metrics_path} has no FID; run the evaluate stage again")

    run_tags = tracker.tags()
    version_tags = {
        "dvc.model_md5": file_md5(params.paths.model),
        "dvc.classifier_md5": file_md5(params.paths.classifier),  # FIDs compare only with the same features
        "fid_n": str(metrics.get("fid_n", "")),
        **{k: run_tags[k] for k in ("git.commit", "dvc.exp_name") if k in run_tags},
    }
    try:
        outcome = tracking.register_model(
            params.registry, run_id, params.paths.model, float(metrics["fid"]), version_tags
        )
        tracker.set_tags(  # what was decided then; the live aliases are the registry's (they move later)
            {
                "registry.version": f"{outcome['model_name']} v{outcome['version']}",
                "registry.decision": f"{outcome['alias']}: {outcome['reason']}",
            }
        )
    finally:  # logging the model reopened the run; its training is over either way
        tracker.close("FINISHED")
    write_json(outcome, out)
    verdict = "kept" if outcome["already_champion"] else "promoted" if outcome["promoted"] else "not promoted"
    print(
        f"register: {outcome['model_name']} v{outcome['version']} -> {outcome['alias']} ({verdict}): "
        f"{outcome['reason']}"
    )
    return outcome
