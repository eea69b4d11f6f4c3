"""dlkern's Triton device code: ``@triton.jit`` kernels and their pure-Triton helpers, one file per op family.

Imported as ``dlkern.kernels`` (setup.py maps this folder there); never as a top-level ``kernels`` module.
"""
