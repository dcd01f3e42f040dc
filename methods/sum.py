"""Sum: late fusion by adding per-modality linear heads' logits (the documentation's sum page)."""

from mmbalance.methods.concat import UNIMODAL_LOSS

from mmbalance.method import Method
from mmbalance.registry import register_method


@register_method("sum", "naive late fusion: sum of per-modality linear heads' logits")
class Sum(Method):
    name = "sum"
    fusion = "sum"
    options = {"unimodal_loss": UNIMODAL_LOSS}

    def trains_unimodal_heads(self) -> bool:
        return bool(self.cfg["unimodal_loss"])

    def label(self) -> str:
        return "Sum + uni CE" if self.cfg["unimodal_loss"] else "Sum"
