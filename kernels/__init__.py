"""Triton kernels of dti_fast, installed as ``dti_fast.kernels``.

Each module holds one kernel and its launcher; importing one needs Triton.
"""
