"""CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of separately trained encoders.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of separately trained encoders"


@register_dataset("cremad-unimodal", DESCRIPTION)
class CremadUnimodal(NamedFeatureSet):
    name = "cremad-unimodal"
    description = DESCRIPTION
    data_subdir = "cremad_unimodal_emb"
    views = {'audio': 512, 'visual': 512}
    rows = {'train': 541, 'test': 179}
    class_names = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
    modality_names = ('audio', 'visual')
    defaults = {
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.01,
        "scheduler": "cosine",
        "embed_dim": 128,
        "backbone": {},
    }
