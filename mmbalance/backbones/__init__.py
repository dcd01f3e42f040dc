"""Built-in encoders. Each module registers builders with ``@register_backbone``.

A backbone builder has the signature ``build(spec: ModalitySpec, out_dim: int | None,
weights: str | None = None, **options) -> nn.Module``; the module maps a batch of that
modality to ``(B, module.out_dim)`` pooled features. ``out_dim=None`` keeps the backbone's
natural width; otherwise a linear projection is added when the widths differ. ``weights`` is a
local file or folder: nothing is downloaded at run time.
"""

BUILTIN = ("mlp", "cnn", "resnet", "i3d", "resnet50", "text", "clip", "sequence")
