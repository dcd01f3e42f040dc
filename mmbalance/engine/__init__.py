"""The training engine: one cell (method x dataset x config) from set-up to its run record.

``loop``        the Trainer: set-up, epochs and their phases, evaluation, ``fit``
``services``    what a method reaches through ``self.trainer`` (iterate, sub_train, heldout...)
``checkpoint``  the state of the last finished epoch, saved and restored
``record``      the run header and the JSON-lines record
``runtime``     the device a run asked for, and its seeds

The engine imports methods' contract (:mod:`mmbalance.method`) and the pure diagnostics, never
the command line, the grid or the reports.
"""
