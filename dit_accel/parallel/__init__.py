"""Parallel inference across processes: ``patch-parallel`` (displaced patch parallelism, DistriFusion and PCPP).

The geometry (:mod:`dit_accel.parallel.patches`) is pure and importable anywhere; the plugin
(:mod:`dit_accel.parallel.patch`) needs an initialised ``torch.distributed`` world of two or more processes.
"""

from dit_accel.parallel.patch import PatchParallelConfig, PatchParallelPlugin

__all__ = ["PatchParallelConfig", "PatchParallelPlugin"]
