"""UC Merced land use, 21 classes: GIST, PHOG and LBP descriptors of aerial images.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "UC Merced land use, 21 classes: GIST, PHOG and LBP descriptors of aerial images"


@register_dataset("landuse21", DESCRIPTION)
class LandUse21(NamedFeatureSet):
    name = "landuse21"
    description = DESCRIPTION
    data_subdir = "landuse21"
    views = {"gist": 20, "phog": 59, "lbp": 40}
    rows = {"train": 1575, "test": 525}
    class_names = tuple(str(k) for k in range(21))
    modality_names = ("phog", "gist")
    defaults = {
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.01,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
