"""Models whose decoder layers stay on disk until one is needed.

Calibration and export touch one decoder layer at a time, so they need never hold the whole
model: the skeleton is built on the meta device, the embeddings, final norm and rotary
buffers are loaded, and each layer's weights are read from the safetensors shards when the
layer is materialized and dropped again on release. Peak memory is then one layer plus the
embeddings and the activations, flat in the number of layers.

GGUF files and ``.bin`` checkpoints cannot be read tensor by tensor; they load whole (the
default SmolLM2 is cached as safetensors, so it takes the lazy path).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from .errors import CometError
from .models import ModelRef, decoder_layers, load_config, load_model

INDEX_FILE = "model.safetensors.index.json"
_LIBC = ctypes.util.find_library("c")


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after large frees otherwise,
    which makes the resident size grow with every layer processed)."""
    if _LIBC:
        try:
            ctypes.CDLL(_LIBC).malloc_trim(0)
        except (OSError, AttributeError):
            pass
LAYER_PREFIX = "model.layers."


def _weight_map(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file for a safetensors model directory, or None if it has none."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CometError(f"{index} is corrupt ({exc}); re-download the model") from None
        return {name: folder / f for name, f in wm.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    try:
        with safe_open(single, framework="pt") as st:
            return {name: single for name in st.keys()}
    except (SafetensorError, OSError) as exc:
        raise CometError(f"could not load model '{folder}': {exc}; check that the files are "
                         "complete (re-download or re-convert them)") from None


class LayerwiseModel:
    """A causal LM with lazily loaded decoder layers.

    ``model`` is a transformers model whose decoder layers are on the meta device until
    :meth:`materialize` loads one; :meth:`release` drops it again. ``lazy`` is False when
    the source could not be read tensor by tensor and everything was loaded up front.
    """

    def __init__(self, ref: ModelRef, dtype: torch.dtype = torch.float32):
        self.ref, self.dtype = ref, dtype
        folder = Path(ref.path)
        self.files = None if (ref.hub_id or ref.gguf_file) else _weight_map(folder)
        if self.files is None:
            self.model, self.tokenizer = load_model(ref, dtype)
            self.lazy = False
            return
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = load_config(ref)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
        except Exception as exc:
            raise CometError(f"could not load the tokenizer of '{ref.path}': {exc}") from None
        # Embeddings stay in their stored dtype (a 128k-token vocabulary is 2 GB in float32);
        # layer inputs are cast to the compute dtype when captured. lm_head is never needed.
        keep = dict(self._read((n for n in self.files
                                if not n.startswith(LAYER_PREFIX) and n != "lm_head.weight"),
                               convert=False))
        self.model.load_state_dict(keep, strict=False, assign=True)
        if config.tie_word_embeddings:
            self.model.tie_weights()
        self.model.eval().requires_grad_(False)
        self.lazy = True

    def _read(self, names, convert: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for f, ns in by_file.items():
            try:
                with safe_open(f, framework="pt") as st:
                    for n in ns:
                        t = st.get_tensor(n)
                        yield n, t.to(self.dtype) if convert else t
            except (SafetensorError, OSError) as exc:
                raise CometError(f"{f} is corrupt or truncated ({exc}); re-download the model") from None

    def materialize(self, i: int) -> torch.nn.Module:
        """Load decoder layer ``i`` into memory (CPU) and return it."""
        layer = decoder_layers(self.model)[i]
        if self.lazy:
            prefix = f"{LAYER_PREFIX}{i}."
            state = {n[len(prefix):]: t for n, t in self._read(n for n in self.files if n.startswith(prefix))}
            missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
            if missing or unexpected:
                raise CometError(f"layer {i} of '{self.ref.path}' does not match its config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return layer

    def release(self, i: int) -> None:
        """Drop decoder layer ``i``'s weights (lazy models) or move it back to the CPU."""
        layer = decoder_layers(self.model)[i]
        layer.to("meta" if self.lazy else "cpu")
        return_freed_memory()

    def non_layer_tensors(self, head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters outside the decoder layers in their stored dtype: the embeddings and final
        norm, or with ``head`` only ``lm_head.weight`` (absent when tied), so that callers
        can hold one of the two large vocabulary matrices at a time."""
        def wanted(n: str) -> bool:
            return not n.startswith(LAYER_PREFIX) and (n == "lm_head.weight") == head

        if not self.lazy:
            for n, p in self.model.named_parameters():
                if wanted(n):
                    yield n, p.detach()
            return
        yield from self._read((n for n in self.files if wanted(n)), convert=False)

    def drop_embeddings(self) -> None:
        """Free the input embeddings once the first layer's inputs are captured (lazy only)."""
        if self.lazy:
            self.model.get_input_embeddings().to("meta")
            return_freed_memory()
