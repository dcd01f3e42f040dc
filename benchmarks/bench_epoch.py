"""The baseline cost: one training epoch of Concat, the figure every method is compared with.

Times ``Trainer.train_epoch`` (forward, backward, optimizer step over the whole training
split; no evaluation) of ``concat`` on ``synthetic`` and on ``avdigits`` (skipped when its data
is not found). Run::

    pytest benchmarks/bench_epoch.py                       # CPU or the GPU when there is one
    MMBALANCE_BENCH_DEVICE=cuda pytest benchmarks/bench_epoch.py --benchmark-json=epoch.json
"""

from __future__ import annotations

import os

import pytest

from mmbalance.errors import DataError
from mmbalance.runner import make_trainer

DEVICE = os.environ.get("MMBALANCE_BENCH_DEVICE", "auto")
ROUNDS = int(os.environ.get("MMBALANCE_BENCH_ROUNDS", "3"))


@pytest.mark.parametrize("dataset", ["synthetic", "avdigits"])
def test_concat_epoch(benchmark, dataset, tmp_path):
    trainer = make_trainer("concat", dataset, {"records": str(tmp_path), "device": DEVICE, "progress": "off"})
    try:
        trainer.setup()
    except DataError as exc:
        pytest.skip(str(exc))
    epochs = iter(range(1000))
    benchmark.extra_info.update({"device": str(trainer.device), "batches": len(trainer.loader(trainer.splits.train, True))})
    benchmark.pedantic(lambda: trainer.train_epoch(next(epochs)), rounds=ROUNDS, iterations=1, warmup_rounds=1)
