"""UCI Image Segmentation regions: colour vs shape/edge descriptors.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "UCI Image Segmentation regions: colour vs shape/edge descriptors"


@register_dataset("image-seg", DESCRIPTION)
class ImageSegmentation(NamedFeatureSet):
    name = "image-seg"
    description = DESCRIPTION
    data_subdir = "image_segmentation"
    views = {'shape': 9, 'color': 10}
    rows = {'train': 210, 'test': 2100}
    class_names = ("brickface", "cement", "foliage", "grass", "path", "sky", "window")
    modality_names = ('color', 'shape')
    defaults = {
        "val_fraction": 0.2,
        "epochs": 40,
        "batch_size": 16,
        "lr": 0.05,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
