"""CUDA sources of the W4Ax kernels, shipped inside the package as ``comet_quant.kernels``."""
