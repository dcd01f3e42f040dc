"""CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of separately trained encoders.

Data: CREMA-D (H. Cao et al., "CREMA-D: Crowd-sourced Emotional Multimodal Actors Dataset",
IEEE Trans. Affective Computing 5(4), 2014; github.com/CheyneyComputerScience/CREMA-D, ODbL 1.0)
clips of actors speaking sentences in six emotions (NEU, HAP, SAD, FEA, DIS, ANG), as frozen
embeddings released by the ReconBoost authors (C. Hua et al., ICML 2024; github.com/huacong/
ReconBoost, ``all_feat/CREMAD/umt_fts``): one 512-d ``audio`` embedding (ResNet-18 on a
log-magnitude spectrogram of 3 s of speech) and one 512-d ``visual`` embedding (ResNet-18 on
video frames) per clip, pooled after a ReLU (non-negative). This is the IPRM paper's first
dataset at a size a CPU trains in seconds; the clips are presumably the standard CREMA-D test
list, unseen by the encoders (the release does not say clip by clip). 720 clips, split 75/25
stratified per class with numpy ``default_rng(0)``: 541 train / 179 test. Files:
``<root>/cremad_unimodal_emb/{train,test}.npz``. The split is small: one validation sample is about
1.8 points, so expect several points of seed noise and use 5 seeds.

The encoders were trained *separately* (the uni-modal teacher, UMT), so both are as good as
each can get alone: the imbalance left is the one between the modalities themselves.

Default modalities: ``audio`` (strong) vs ``visual`` (weak). Evidence, validation accuracy of
each view alone (``unimodal`` method, this recipe, seeds 0-2, last epoch): audio 76.36 +- 0.00,
visual 52.73 +- 0.00 (55 validation clips; every seed gave the same count); Concat reaches
87.27 +- 0.00.

Recipe, from validation accuracy only (``benchmarks/recipe_search.py``, result in
``benchmarks/recipes/cremad-unimodal.json``): Concat on the default pair, validation = a
stratified 10 % of train (55 clips, fixed ``split_seed``), SGD momentum 0.9, cosine to zero,
batch 32 (the step rule), seeds 0-2, score = validation accuracy at the last epoch. Over
epochs {5, 10, 20, 40, 80} x lr {0.005, 0.01, 0.05} (5 epochs and lr 0.005 added because the
first choice, 10 epochs at 0.01, sat on both edges) the best mean is 87.27 at 20 epochs and lr
0.005, also the fewest epochs within 1 point of it (10 epochs at lr 0.01: 86.06). Longer or
faster training overfits these embeddings (80 epochs at lr 0.05: 72.12).
"""

from __future__ import annotations

from mmbalance.datasets.cremad_joint import CremadEmbeddings

from mmbalance.registry import register_dataset

DESCRIPTION = "CREMA-D emotions, frozen audio/visual ResNet-18 embeddings of separately trained encoders"


@register_dataset("cremad-unimodal", DESCRIPTION)
class CremadUnimodal(CremadEmbeddings):
    name = "cremad-unimodal"
    description = DESCRIPTION
    data_subdir = "cremad_unimodal_emb"
    rows = {"train": 541, "test": 179}
    defaults = {**CremadEmbeddings.base_defaults, "epochs": 20, "lr": 0.005}
