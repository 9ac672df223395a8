"""Triton decode-attention kernels for per-head sparse KV caches (``moa_search.kernels``).

Installed as ``moa_search.kernels`` (setuptools package-dir), so this folder never shadows
the PyPI package ``kernels``; modules here import each other relatively only.

- :func:`mixed_decode`: dense / window+sink / elastic heads of a layer in one launch.
- :func:`sparq_decode`: SparQ heads (side-buffer scoring, radix top-k, masked attend);
  :mod:`.sparq_topk` keeps the previous pipeline as the benchmark's baseline.
- :mod:`.reference`: plain PyTorch loops with the same contracts (what tests compare to).
- :mod:`.influence`: the profiler's fused first-order influence of static patterns (imported
  from there by ``moa_search.profile``; not re-exported).
"""

if __name__ == "moa_search.kernels":
    from .decode import mixed_decode
    from .reference import mixed_decode_ref, sparq_decode_ref
    from .sparq import (
        sparq_decode,
        sparq_kernel_bytes,
        sparq_kt_from_cache,
        sparq_side_append,
        to_side,
    )
# else: imported as top-level ``kernels`` because the repo root is on sys.path (e.g.
# ``python -m pytest`` from the root; transformers probes ``kernels`` by importing it). Stay
# empty then: no second copy of the Triton kernels, nothing that looks like PyPI ``kernels``.

__all__ = [
    "mixed_decode",
    "mixed_decode_ref",
    "sparq_decode",
    "sparq_decode_ref",
    "sparq_kernel_bytes",
    "sparq_kt_from_cache",
    "sparq_side_append",
    "to_side",
]
