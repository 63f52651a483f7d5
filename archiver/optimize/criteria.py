"""What an artifact must meet to ship: tolerance for faithful exports, task metrics once numbers change on purpose."""

from __future__ import annotations

from archiver.optimize.validate import Criteria
from archiver.spec import ArtifactSpec, ModelSpec

# fp16 keeps ~3 significant digits: the digits CNN's logits move by up to 9e-3 in half precision, so an fp16
# artifact is held to this tolerance (unless its spec sets one) and to top-1 agreement with fp32.
FP16_TOLERANCE = 5e-2
FP16_MIN_TOP1_AGREEMENT = 0.99
# A pruned artifact without int8 keeps at least this share of eager's top-1 answers.
PRUNED_MIN_TOP1_AGREEMENT = 0.9


def criteria_for(model: ModelSpec, artifact: ArtifactSpec) -> Criteria:
    """Numeric tolerance for faithful exports; task metrics once pruning or int8 change the numbers."""
    if artifact.precision == "fp16" and not (artifact.quantize or artifact.prune):
        return Criteria(tolerance=artifact.tolerance or max(model.tolerance, FP16_TOLERANCE),
                        min_top1_agreement=FP16_MIN_TOP1_AGREEMENT)
    if not (artifact.quantize or artifact.prune):
        return Criteria(tolerance=artifact.tolerance or model.tolerance)
    drops = [s.max_accuracy_drop for s in (artifact.quantize, artifact.prune) if s]
    agreement = artifact.quantize.min_top1_agreement if artifact.quantize else PRUNED_MIN_TOP1_AGREEMENT
    return Criteria(tolerance=artifact.tolerance, min_top1_agreement=agreement, max_accuracy_drop_points=min(drops))
