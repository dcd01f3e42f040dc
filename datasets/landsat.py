"""UCI Statlog Landsat pixels: visible vs near-infrared bands of a 3x3 neighbourhood.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "UCI Statlog Landsat pixels: visible vs near-infrared bands of a 3x3 neighbourhood"


@register_dataset("landsat", DESCRIPTION)
class Landsat(NamedFeatureSet):
    name = "landsat"
    description = DESCRIPTION
    data_subdir = "landsat"
    views = {'visible': 18, 'infrared': 18}
    rows = {'train': 4435, 'test': 2000}
    class_names = (
        "red soil", "cotton crop", "grey soil", "damp grey soil", "soil with vegetation stubble",
        "very damp grey soil",
    )
    modality_names = ('visible', 'infrared')
    defaults = {
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.01,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
