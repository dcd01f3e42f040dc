"""CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of jointly trained encoders.

TODO docstring
"""

from __future__ import annotations

from mmbalance.datasets.features import NamedFeatureSet

from mmbalance.registry import register_dataset

DESCRIPTION = "CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of jointly trained encoders"


@register_dataset("cremad-joint", DESCRIPTION)
class CremadJoint(NamedFeatureSet):
    name = "cremad-joint"
    description = DESCRIPTION
    data_subdir = "cremad_joint_emb"
    views = {'audio': 512, 'visual': 512}
    rows = {'train': 559, 'test': 185}
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
