"""Numeric building blocks shared by the methods, the engine and the continual mergers.

Exact streaming selection (:mod:`.select`), the compiled kernels (:mod:`.native`, ``kernels.cpp``), an
off-heap block pool (:mod:`.pool`), per-tensor seeded generators (:mod:`.rng`), LAPACK without the GIL
(:mod:`.lapack`), SVD and spectral helpers (:mod:`.svd`, :mod:`.spectral`), magnitude trimming and sign
election (:mod:`.sparsify`), the test-time-adaptation components and coefficient file
(:mod:`.adaptive`, :mod:`.coefficients`), the NaN/Inf check (:mod:`.finite`) and the device check
(:mod:`.device`). Nothing here imports a method, the engine or anything above them.
"""
