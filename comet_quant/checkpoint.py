"""The quantized checkpoint: tensor naming, writing, opening and validation.

Layout (docs/FORMAT.md is the reference): a directory with ``config.json`` (the model config
plus ``quantization_config``), safetensors shards (one for the embeddings and norms, one per
decoder layer) listed in ``model.safetensors.index.json``, the tokenizer files, and
``comet_manifest.json`` holding the sha256 of every file.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CometError
from .models import SITES, ModelRef, check_architecture, fingerprint
from .outputs import JOB_FILE, read_json, replace_atomically, versions, write_json
from .primitives import pack_int4
from .scheme import FORMAT_VERSION, QuantScheme

QUANT_METHOD = "comet"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "comet_manifest.json"
LINEAR_KEYS = ("qweight", "wscale", "wscale_row", "wzero", "act_perm", "act_groups8", "bias")


def linear_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   perm: torch.Tensor, groups8: int, bias: torch.Tensor | None,
                   row_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear (names without the module prefix).

    Args:
        q: int8 [N, K_pad] int4 codes in permuted column order.
        scale: float [N, K_pad/g]; zero: uint8 [N, K_pad/g] or None; perm: int [K_pad].
        row_scale: float [N] (``int_group_scales``): every ``scale[n, g]`` is ``row_scale[n]``
            times an integer in [1, 16]; stored as ``wscale_row``.
    """
    out = {
        "qweight": pack_int4(q).contiguous(),
        "wscale": scale.to(torch.float16).contiguous(),
        "act_perm": perm.to(torch.int32).clone(),  # per linear: each one self-contained
        "act_groups8": torch.tensor([groups8], dtype=torch.int32),
    }
    if zero is not None:
        out["wzero"] = zero.to(torch.uint8).contiguous()
    if row_scale is not None:
        out["wscale_row"] = row_scale.to(torch.float16).contiguous()
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes the checkpoint one numbered safetensors shard at a time (memory holds one).

    Each shard is written to a temporary name and renamed, so a shard file that exists is
    complete; :meth:`done` adopts such a shard from an interrupted run.
    """

    def __init__(self, out: Path, total: int):
        self.out, self.total = out, total
        self.size = 0
        self.weight_map: dict[str, str] = {}
        self.written: set[int] = set()

    def name(self, k: int) -> str:
        return f"model-{k:05d}-of-{self.total:05d}.safetensors"

    def done(self, k: int) -> bool:
        """Whether shard ``k`` exists (from an earlier, interrupted run); records its tensors."""
        f = self.out / self.name(k)
        if not f.is_file():
            return False
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    self.weight_map[key] = f.name
                    self.size += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        except (SafetensorError, OSError):
            f.unlink()
            return False
        self.written.add(k)
        return True

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        f = self.out / self.name(k)
        replace_atomically(f, lambda path: save_file(
            tensors, path, metadata={"format": "pt", "quant_method": QUANT_METHOD}))
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.weight_map.update(dict.fromkeys(tensors, f.name))
        self.written.add(k)

    def finish(self) -> None:
        if self.written != set(range(1, self.total + 1)):
            raise RuntimeError(f"shards {sorted(set(range(1, self.total + 1)) - self.written)} missing")
        write_json(self.out / INDEX_FILE, {"metadata": {"total_size": self.size},
                                           "weight_map": self.weight_map})


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "U8": 1, "I8": 1, "I64": 8, "F64": 8}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save_checkpoint(out: Path, writer: ShardWriter, config, tokenizer, scheme: QuantScheme,
                    ref: ModelRef, calib_manifest: dict, layers: dict) -> None:
    """Finish a checkpoint whose shards ``writer`` wrote into the (temporary) directory ``out``."""
    writer.finish()
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float16"
    # Counted per activation tensor (input site), as the FMPQ budget is.
    sites = [s for layer in layers.values() for s in layer.values()]
    total = sum(s["k_padded"] // scheme.group_size for s in sites)
    g8 = sum(s["groups8"] for s in sites)
    frac8 = g8 / total if total else 0.0
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "scheme": scheme.to_dict(),
        "source_model": ref.to_dict(),
        "source_fingerprint": fingerprint(ref),
        "calibration": calib_manifest.get("data", {}),
        "layers": layers,
        "summary": {
            "linears": sum(len(v) for v in SITES.values()) * len(layers),
            "activation_groups": total,
            "groups8": g8,
            "fraction_8bit_groups": round(frac8, 6),
            "effective_activation_bits": (
                round(scheme.a_high_bits * frac8 + scheme.a_bits * (1 - frac8), 4)
                if scheme.quantizes_activations else 16),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": versions(),
    }
    write_json(out / "config.json", cfg)
    tokenizer.save_pretrained(out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != JOB_FILE}
    write_json(out / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "scheme": scheme.to_dict(),
                                     "sha256": files})


@dataclass
class QuantizedCheckpoint:
    """An opened, validated checkpoint. Tensors are read on demand."""

    path: Path
    config: dict
    qconfig: dict
    scheme: QuantScheme
    manifest_files: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def hf_config(self):
        from transformers import AutoConfig

        cfg = {k: v for k, v in self.config.items() if k != "quantization_config"}
        return AutoConfig.for_model(**cfg)

    def shards(self) -> list[Path]:
        index = read_json(self.path / INDEX_FILE, f"checkpoint {self.path}")
        return [self.path / f for f in sorted(set(index.get("weight_map", {}).values()))]

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        out = {}
        for f in self.shards():
            try:
                with safe_open(f, framework="pt", device=device) as st:
                    out.update({k: st.get_tensor(k) for k in st.keys()})
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CometError(f"{f} is corrupt or truncated ({str(exc).splitlines()[0]}); "
                                 "re-export the checkpoint") from None
        return out


def is_quantized_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return read_json(cfg, "").get("quantization_config", {}).get("quant_method") == QUANT_METHOD
    except CometError:
        return False


def open_checkpoint(path: str | Path, verify_hashes: bool = True) -> QuantizedCheckpoint:
    """Open a checkpoint, checking that it is complete, unmodified and self-consistent."""
    path = Path(path)
    if not path.is_dir():
        raise CometError(f"checkpoint {path} does not exist; run `comet-quant export` first")
    config = read_json(path / "config.json", f"checkpoint {path}")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CometError(f"{path} is not a comet-quant checkpoint (no comet quantization_config)")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CometError(f"{path} has format version {qc.get('format_version')}; this "
                         f"comet-quant reads version {FORMAT_VERSION}: upgrade or re-export")
    scheme = QuantScheme.from_dict(qc.get("scheme", {}))
    manifest = read_json(path / MANIFEST_FILE, f"checkpoint {path}")
    for name, digest in manifest.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            raise CometError(f"checkpoint file {f} is missing; re-export the checkpoint")
        if verify_hashes and sha256_file(f) != digest:
            raise CometError(f"checkpoint file {f} does not match its recorded sha256 (truncated "
                             "or edited); re-export the checkpoint")
    if manifest.get("scheme", scheme.to_dict()) != scheme.to_dict():
        raise CometError(f"the scheme in {path / 'config.json'} differs from the one recorded in "
                         f"{MANIFEST_FILE}; the config was edited, re-export the checkpoint")
    ckpt = QuantizedCheckpoint(path, config, qc, scheme, tuple(manifest.get("sha256", {})))
    check_architecture(ckpt.hf_config())
    _check_shapes(ckpt)
    return ckpt


def _check_shapes(ckpt: QuantizedCheckpoint) -> None:
    """Every linear's stored tensors agree with the config and the recorded plans."""
    shapes: dict[str, list[int]] = {}
    for f in ckpt.shards():
        try:
            with safe_open(f, framework="pt") as st:
                shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
        except (SafetensorError, OSError) as exc:
            raise CometError(f"{f} is corrupt or truncated ({exc}); re-export the checkpoint") from None
    g = ckpt.scheme.group_size
    emb = shapes.get("model.embed_tokens.weight")
    if emb != [ckpt.config.get("vocab_size"), ckpt.config.get("hidden_size")]:
        raise CometError(f"embedding shape {emb} of {ckpt.path} does not match its config (vocab "
                         f"{ckpt.config.get('vocab_size')}, hidden {ckpt.config.get('hidden_size')}): "
                         "tensors and config come from different models; re-export")
    try:
        for i in range(ckpt.num_layers):
            meta = ckpt.qconfig["layers"][str(i)]
            if meta["attn_in"]["k"] != ckpt.config["hidden_size"] or \
                    meta["mlp_out"]["k"] != ckpt.config["intermediate_size"]:
                raise CometError(f"layer {i} of {ckpt.path} was quantized for another model shape "
                                 "than its config says; re-export the checkpoint")
            for site, linears in SITES.items():
                kp = meta[site]["k_padded"]
                for lin in linears:
                    p = f"model.layers.{i}.{lin}"
                    for key in ("qweight", "wscale", "act_perm", "act_groups8"):
                        if f"{p}.{key}" not in shapes:
                            raise CometError(f"checkpoint {ckpt.path} lacks tensor {p}.{key}; re-export it")
                    qshape, sshape = shapes[f"{p}.qweight"], shapes[f"{p}.wscale"]
                    if ckpt.scheme.int_group_scales and shapes.get(f"{p}.wscale_row") != [qshape[0]]:
                        raise CometError(f"checkpoint {ckpt.path} uses integer group scales but its "
                                         f"tensor {p}.wscale_row is missing or not [N]; re-export it")
                    if qshape[1] * 2 != kp or sshape != [qshape[0], kp // g] or shapes[f"{p}.act_perm"] != [kp]:
                        raise CometError(f"tensor shapes of {p} do not match the checkpoint config "
                                         f"(K_pad={kp}, group {g}); the checkpoint is mismatched, re-export it")
    except KeyError as exc:
        raise CometError(f"checkpoint config of {ckpt.path} lacks layer entry {exc}; the config "
                         "was edited or truncated, re-export") from None
