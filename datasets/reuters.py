"""Reuters news in five languages, bag of words: a balanced control.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "Reuters news in five languages, bag of words: a balanced control"


@register_dataset("reuters", DESCRIPTION)
class Reuters(NamedFeatureSet):
    name = "reuters"
    description = DESCRIPTION
    data_subdir = "reuters_multilingual"
    views = {"en": 2000, "fr": 2000, "de": 2000, "it": 2000, "es": 2000}
    rows = {"train": 900, "test": 300}
    class_names = tuple(str(k) for k in range(6))
    modality_names = ("es", "en")
    defaults = {
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.01,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
