"""Torch pieces: encoders, projection head, SoftCon loss, masking, EMA teacher, data loading, probes.

Importing the package asks PyTorch's CPU allocator for transparent huge pages on tensors of 2 MB and more
(``THP_MEM_ALLOC_ENABLE``, read when torch first allocates, so it only takes effect when this package is
imported before torch is): a decoded batch lands in fresh memory, and with 4 kB pages its page faults cost about
as much as the decode itself (1.0 vs 0.3 ms per 13x264x264 sample; ``bench/bench_loader.py``). Set
``THP_MEM_ALLOC_ENABLE=0`` to opt out.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
