"""Native GPTQ support: the on-disk format (format.py), QuantLinear with a CPU torch path and Triton
kernels, and the GPTQBackend. Import submodules directly; this package imports nothing heavy."""
