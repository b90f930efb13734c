"""Bad params stop a stage before any work: exit code 2, one line naming key, value and what is allowed."""

import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params, parse_params, with_overrides
from tests.conftest import ROOT, tiny_params_dict


def test_repository_params_load_and_flatten():
    params = load_params(ROOT / "params.yaml")
    flat = params.flat()
    assert flat["langevin.step_size"] == 10.0 and flat["train.alpha"] == 0.1
    assert flat["buffer.size"] == 8192 and flat["buffer.reinit_prob"] == 0.05
    assert flat["buffer.augment_prob"] == 0.0  # the default draws as the book does
    assert flat["buffer.policy"] == "fifo"  # and stores as the book does
    assert flat["train.kl_weight"] == 0.0 and flat["train.kl_repel"] == 0.0  # and trains on the plain CD loss
    assert flat["langevin.steps"] == 60 and flat["langevin.noise"] == 0.005 and flat["langevin.grad_clip"] == 0.03
    assert flat["train.batch_size"] == 128 and flat["train.lr"] == 2e-3 and flat["train.epochs"] == 30
    # the values the README's results depend on, beyond the book's
    assert flat["train.ema_decay"] == 0.999 and flat["generate.step_size"] == 25.0
    assert flat["train.weight_grad_clip"] == 0.1
    assert flat["generate.final_steps"] == 250 and flat["generate.final_noise"] == 0.07  # the hot end
    assert flat["train.snapshots"] == 10 and flat["train.snapshot_every"] == 24 and flat["generate.snapshots"] == 10
    assert flat["langevin.precision"] == "auto"
    assert flat["runtime.device"] == "auto" and flat["runtime.progress_seconds"] == 30.0
    assert isinstance(params, Params)


def _broken(section, key, value):
    raw = tiny_params_dict()
    if value is _DELETE:
        del raw[section][key]
    else:
        raw[section][key] = value
    return raw


class _Deleted:
    """The key is removed from params.yaml (a stable test id, the same in every pytest-xdist worker)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Deleted()

BAD = [
    ("langevin", "step_size", -1.0, "langevin.step_size"),
    ("langevin", "steps", 0, "langevin.steps"),
    ("langevin", "precision", "fp8", "langevin.precision"),
    ("buffer", "reinit_prob", 1.5, "buffer.reinit_prob"),
    ("buffer", "reinit_prob", -0.1, "buffer.reinit_prob"),
    ("buffer", "size", 8, "buffer.size"),  # smaller than the batch (16)
    ("buffer", "augment_prob", 1.2, "buffer.augment_prob"),
    ("buffer", "augment_shift", 9, "buffer.augment_shift"),
    ("buffer", "augment_shift", 1.5, "buffer.augment_shift"),
    ("buffer", "policy", "lifo", "buffer.policy"),
    ("train", "lr", "fast", "train.lr"),
    ("train", "epochs", 2.5, "train.epochs"),
    ("train", "beta1", 1.0, "train.beta1"),
    ("train", "alpha", _DELETE, "train.alpha"),
    ("train", "alhpa", 0.1, "train.alhpa"),
    ("train", "kl_weight", -1.0, "train.kl_weight"),
    ("train", "kl_repel", 0.3, "train.kl_repel"),  # the entropy without the KL term it belongs to
    ("train", "kl_chains", 0, "train.kl_chains"),
    ("data", "source", "cifar", "data.source"),
    ("runtime", "device", "tpu", "runtime.device"),
    ("runtime", "progress_seconds", -1, "runtime.progress_seconds"),
    ("runtime", "progress_seconds", float("inf"), "runtime.progress_seconds"),
    ("generate", "chain_steps", [0, 10_000], "generate.chain_steps"),
    ("generate", "step_size", 0.0, "generate.step_size"),
    ("tracking", "enabled", "yes", "tracking.enabled"),
    ("evaluate", "accept_share", 1.0, "evaluate.accept_share"),
    ("ood", "cases", ["flip", "mirror"], "ood.cases"),
    ("ood", "flip_exclude", [1, 10], "ood.flip_exclude"),
    ("ood", "shrink_factor", 1.5, "ood.shrink_factor"),
    ("restore", "inpaint_region", "middle", "restore.inpaint_region"),
    ("restore", "denoise_kind", "blur", "restore.denoise_kind"),
    ("restore", "denoise_share", 0.0, "restore.denoise_share"),
]


@pytest.mark.parametrize("section,key,value,named", BAD, ids=[f"{b[0]}.{b[1]}={b[2]!r}" for b in BAD])
def test_bad_params_are_rejected_with_one_line(section, key, value, named):
    with pytest.raises(ConfigError) as info:
        parse_params(_broken(section, key, value))
    message = str(info.value)
    assert named in message
    assert "\n" not in message


def test_unknown_section_and_non_mapping():
    raw = tiny_params_dict()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="unknown section trian"):
        parse_params(raw)
    with pytest.raises(ConfigError):
        parse_params(["not", "a", "mapping"])


def test_overrides_are_validated():
    params = parse_params(tiny_params_dict())
    assert with_overrides(params, {"train.alpha": 0.2}).train.alpha == 0.2
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        with_overrides(params, {"train.nope": 1})
    with pytest.raises(ConfigError, match="buffer.reinit_prob"):
        with_overrides(params, {"buffer.reinit_prob": 2})


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate"])
def test_stage_exits_2_before_any_work(tmp_path, stage):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_broken("langevin", "step_size", -1.0)))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", stage, "--params", str(bad)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "langevin.step_size=-1.0" in lines[0] and "> 0" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no partial outputs
