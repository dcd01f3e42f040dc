"""Concat: late fusion by concatenation, o = W [z_1; ...; z_M] + b (the documentation's concat page)."""

from mmbalance.config import Option
from mmbalance.method import Method
from mmbalance.registry import register_method

UNIMODAL_LOSS = Option(
    False,
    "add a CE per modality on separate unimodal heads (the 'uniform baseline', MMPareto's code); "
    "off = one joint loss, and per-modality accuracy is the fused head's part",
)


@register_method("concat", "naive late fusion: concatenated features into one linear head")
class Concat(Method):
    name = "concat"
    fusion = "concat"
    options = {"unimodal_loss": UNIMODAL_LOSS}

    def trains_unimodal_heads(self) -> bool:
        return bool(self.cfg["unimodal_loss"])

    def label(self) -> str:
        return "Concat + uni CE" if self.cfg["unimodal_loss"] else "Concat"
