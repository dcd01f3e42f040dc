"""Weight: the IPRM code's parameter-free per-coordinate feature weighting (the documentation's weight page).

Each modality's features are softmaxed over their coordinates, the softmaxes are normalised
across modalities, and the weighted sum of features feeds one shared linear head. CMML's learned
scalar attention is available as ``weight_mode=cmml_attention``.
"""

from mmbalance.methods.concat import UNIMODAL_LOSS

from mmbalance.config import Option
from mmbalance.method import Method
from mmbalance.registry import register_method


@register_method("weight", "naive fusion: per-coordinate softmax weighting of features, one shared head")
class Weight(Method):
    name = "weight"
    fusion = "weight"
    options = {
        "unimodal_loss": UNIMODAL_LOSS,
        "weight_mode": Option("softmax_coord", "how modality weights are formed", ("softmax_coord", "cmml_attention")),
    }

    def trains_unimodal_heads(self) -> bool:
        return bool(self.cfg["unimodal_loss"])

    def label(self) -> str:
        base = "Weight" if self.cfg["weight_mode"] == "softmax_coord" else "Weight (CMML attention)"
        return base + (" + uni CE" if self.cfg["unimodal_loss"] else "")
