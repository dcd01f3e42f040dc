"""mmbalance: a benchmark suite for multimodal-imbalance (modality rebalancing) methods."""

import os

# Large CPU tensors on transparent huge pages (PyTorch's c10 CPU allocator reads this variable
# at its first allocation, so it is set before anything allocates). The AV-digits CNN's
# first-layer activations are ~8 MB each and fresh every step; on 4 KiB pages their TLB misses
# make an epoch 1/0.89 as long on this suite's 2-core CPU (measured with two concurrent cells,
# as a grid runs them: benchmarks/bench_speed.py::test_huge_pages). Only where memory comes
# from changes, never a computed number (a test runs a cell both ways and compares the
# records). An explicit THP_MEM_ALLOC_ENABLE=0 wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
