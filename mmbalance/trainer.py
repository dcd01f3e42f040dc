"""The trainer's public names (kept here so plugins and scripts that import them keep working).

The training engine lives in :mod:`mmbalance.engine`, split by job: ``loop`` (epochs, phases,
evaluation, the run's entry point), ``services`` (what methods call through ``self.trainer``),
``checkpoint`` (save and restore), ``record`` (the run header and record file) and ``runtime``
(device and seeds).
"""

from mmbalance.cache import to_device  # batches onto the device, for methods
from mmbalance.engine.loop import RandomInitWarning, Trainer, key_diagnostic
from mmbalance.engine.runtime import epoch_seed, resolve_device, seed_everything
from mmbalance.engine.services import HELDOUT_SEED

__all__ = [
    "HELDOUT_SEED", "RandomInitWarning", "Trainer", "epoch_seed", "key_diagnostic", "resolve_device",
    "seed_everything", "to_device",
]
