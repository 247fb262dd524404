"""Triton kernels of sparsecore, installed as ``sparsecore.kernels``.

One op per file: ``_<op>_kernel`` (the @triton.jit function), ``<op>(...)`` (launcher: checks,
allocates, launches) and ``<op>_ref(...)`` (pure torch: CPU fallback, test oracle, benchmark provider).
Set ``TRITON_INTERPRET=1`` before importing these modules to run them on CPU tensors.
"""
