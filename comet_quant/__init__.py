"""comet-quant: FMPQ W4Ax + KV4 quantization of LLaMA-family models (after COMET, arXiv 2410.12168).

Importing the package needs neither CUDA nor a compiled extension; heavy modules load lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["QuantScheme", "PRESETS", "get_scheme", "calibrate", "export", "eval_perplexity",
           "load_quantized", "CometError", "__version__"]

_LAZY = {
    "QuantScheme": "scheme", "PRESETS": "scheme", "get_scheme": "scheme",
    "calibrate": "calibrate", "export": "export", "eval_perplexity": "evaluate",
    "load_quantized": "qmodules", "CometError": "errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'comet_quant' has no attribute {name!r}")
