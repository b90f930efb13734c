"""The quality gate between registered versions: does a new model take the alias ``champion``?

Pure decisions (no MLflow here; tracking.py applies them to the registry). Lower FID is better.
The new version becomes ``champion`` if there is none yet, or if its FID is at least ``margin``
below the champion's; otherwise it is the ``challenger`` and the champion stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CHAMPION = "champion"
CHALLENGER = "challenger"
# Version tags that must agree for two FIDs to measure the same thing: the feature classifier, the sample count.
COMPARABLE_BY = ("dvc.classifier_md5", "fid_n")


@dataclass(frozen=True)
class Champion:
    version: str
    fid: float | None  # None: the version has no recorded FID
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str  # one line with both FIDs: the version's tag gate.decision and the stage's output

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def decide(
    version: str, fid: float, champion: Champion | None, margin: float, tags: dict[str, str] | None = None
) -> Decision:
    """Champion or challenger for ``version`` with ``fid``, against the current ``champion``.

    ``tags``: the new version's; when a ``COMPARABLE_BY`` tag differs from the champion's the
    gate still decides, and the reason says the two FIDs were not measured alike.
    """
    decision = _decide(version, fid, champion, margin)
    if champion is not None and champion.version != version and tags:
        differs = [k for k in COMPARABLE_BY if k in tags and k in champion.tags and champion.tags[k] != tags[k]]
        if differs:
            note = f"; caution: the champion's FID was measured with another {' and '.join(differs)}"
            decision = Decision(decision.alias, decision.reason + note)
    return decision


def _decide(version: str, fid: float, champion: Champion | None, margin: float) -> Decision:
    if not math.isfinite(fid):
        held = f"; the champion stays v{champion.version}" if champion else ""
        return Decision(CHALLENGER, f"FID {fid} is not finite{held}")
    if champion is None:
        return Decision(CHAMPION, f"first version with a FID ({fid:.4g}): no champion yet")
    if champion.version == version:
        return Decision(CHAMPION, f"already the champion (FID {fid:.4g})")
    if champion.fid is None or not math.isfinite(champion.fid):
        return Decision(CHALLENGER, f"champion v{champion.version} has no recorded FID to compare FID {fid:.4g} with")
    gain = champion.fid - fid
    if gain >= margin:
        return Decision(
            CHAMPION,
            f"FID {fid:.4g} beats champion v{champion.version}'s {champion.fid:.4g} by {gain:.4g} >= margin {margin:g}",
        )
    by = f"{gain:.4g} better" if gain > 0 else ("equal" if gain == 0 else f"{-gain:.4g} worse")
    return Decision(
        CHALLENGER,
        f"FID {fid:.4g} does not beat champion v{champion.version}'s {champion.fid:.4g} "
        f"by the margin {margin:g} ({by})",
    )
