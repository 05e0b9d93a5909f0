"""kedit's core: the editing engine, evaluation, and the pieces the flows are built from.

Importing it bounds two native caches of torch's CPU kernels (below); it must happen before
torch runs its first operation, which every kedit entry point ensures by importing this
package first.
"""
import os

# Why. On CPU, torch runs bfloat16 matmuls (the target optimisation's forward/backward,
# keystats) through oneDNN, which keeps one compiled primitive per operand shape in two LRU
# caches, oneDNN's own and ideep's, of 1,024 entries each by default, ~1 MB an entry here.
# Editing and serving meet a new sequence length on nearly every batch and request, so both
# caches fill towards ~2 GB: resident memory grew ~10 MB a batch over a long stream while
# tensors grew 0.7 MB (docs/editing.md, sixteenth round). 64 entries hold the shapes one
# optimisation step reuses, at the same speed; a value set in the environment is kept.
NATIVE_CACHE_ENTRIES = "64"
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_var, NATIVE_CACHE_ENTRIES)
