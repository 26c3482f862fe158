"""Calibration: run the model layer by layer on sample text and record what FMPQ needs.

Per decoder layer and per linear input site (see ``models.SITES``): per-channel absmax and
mean square of the activation, optionally the GPTQ Hessian ``E[x x^T]``, a fixed-size sample
of activation rows (``{site}.sample``, float16 [S, K], evenly spaced over the calibration
tokens; the error-based FMPQ selection measures layer output error on it), and per-channel
absmax of the K and V projections. Output: ``manifest.json`` plus ``layer_NNN.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data as data_mod
from .errors import CometError
from .layerwise import capture_inputs, run_layer
from .lazy import LayerwiseModel
from .models import SITES, ModelRef, decoder_layers, describe, fingerprint, resolve_model
from .outputs import output_dir, read_json, replace_atomically, versions, write_json

CALIB_FORMAT = "comet-quant-calibration"
CALIB_VERSION = 1
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 512
DEFAULT_SEED = 0
DEFAULT_BATCH = 8
DEFAULT_SAMPLE_TOKENS = 256
DEFAULT_MASSIVE_RATIO = 0.0
FP16_MAX = 65504.0


@dataclass
class CalibrationConfig:
    """What to calibrate on. ``dataset`` is a name or file (see :mod:`comet_quant.data`)."""

    dataset: str = "calib"
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    hessians: bool = False
    batch_size: int = DEFAULT_BATCH
    device: str = "auto"
    #: Parallel workers (torch.distributed ranks, each with a share of the samples); 0 means
    #: one per visible GPU on CUDA and one on the CPU.
    workers: int = 0
    #: Activation rows kept per linear input for the error-based 8-bit group selection.
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    #: Tokens whose squared norm exceeds this multiple of the batch median ("massive
    #: activations", e.g. attention-sink positions) are left out of the Hessian and mean
    #: square, which they would otherwise dominate; 0 keeps every token. absmax sees all.
    massive_ratio: float = DEFAULT_MASSIVE_RATIO


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CometError("--device cuda was requested but CUDA is not available here; "
                         "use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise CometError(f"unknown device '{device}'; use cpu, cuda or auto")
    return device


class _SiteStats:
    """Running statistics of one linear input: float32 accumulators on the compute device."""

    def __init__(self, hessian: bool, sample_every: int = 0, massive_ratio: float = 0.0,
                 token_ids: torch.Tensor | None = None):
        self.hessian = hessian
        self.sample_every = sample_every
        # Global calibration-token index of each row this rank sees, in order (None: 0, 1, ...).
        self.token_ids = token_ids
        self.massive_ratio = massive_ratio
        self.n = self.n_used = 0
        self.absmax = self.sumsq = self.xtx = None
        self.rows: list[torch.Tensor] = []
        self.row_ids: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CometError("non-finite activations during calibration: the model overflows "
                             "in this dtype; calibrate with --device cpu (float32)")
        xs = x
        if self.massive_ratio > 0:
            norms = x.square().sum(1)
            xs = x[norms <= self.massive_ratio * norms.median()]
        amax, ssq = x.abs().amax(0), xs.square().sum(0)
        if self.absmax is None:
            self.absmax, self.sumsq = amax, ssq
            if self.hessian:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        else:
            self.absmax = torch.maximum(self.absmax, amax)
            self.sumsq += ssq
        if self.hessian:
            self.xtx.addmm_(xs.t(), xs)
        self.n_used += xs.shape[0]
        if self.sample_every:
            idx = torch.arange(self.n, self.n + x.shape[0])
            if self.token_ids is not None:
                idx = self.token_ids[idx]
            pick = (idx % self.sample_every) == self.sample_every // 2
            self.rows.append(x[pick.to(x.device)].clamp(-FP16_MAX, FP16_MAX).to(torch.float16).cpu())
            self.row_ids.append(idx[pick])
        self.n += x.shape[0]

    def tensors(self, site: str, distributed: bool = False) -> dict[str, torch.Tensor]:
        if distributed:  # every rank saw a slice of the samples: combine before normalizing
            import torch.distributed as dist

            dist.all_reduce(self.absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(self.sumsq)
            if self.hessian:
                dist.all_reduce(self.xtx)
            n = torch.tensor([self.n, self.n_used], dtype=torch.float64, device=self.absmax.device)
            dist.all_reduce(n)
            self.n, self.n_used = int(n[0].item()), int(n[1].item())
        used = max(self.n_used, 1)
        out = {f"{site}.absmax": self.absmax.cpu(), f"{site}.sqmean": (self.sumsq / used).cpu()}
        if self.hessian:
            out[f"{site}.hessian"] = (self.xtx / used).cpu()
        if self.sample_every:  # every sampled row, in global token order (same for any world)
            rows, ids = torch.cat(self.rows), torch.cat(self.row_ids)
            if distributed:
                import torch.distributed as dist

                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, (rows, ids))
                rows, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            out[f"{site}.sample"] = rows[torch.argsort(ids)].contiguous()
        return out


def _layer_stats(layer, inputs, device: str, hessians: bool, distributed: bool = False,
                 sample_every: int = 0, massive_ratio: float = 0.0,
                 token_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    stats = {site: _SiteStats(hessians, sample_every, massive_ratio, token_ids) for site in SITES}
    kv = {}
    handles = []
    for site, linears in SITES.items():
        mod = layer.get_submodule(linears[0])
        handles.append(mod.register_forward_pre_hook(lambda m, a, s=site: stats[s].add(a[0])))
    for name in ("k", "v"):
        mod = layer.get_submodule(f"self_attn.{name}_proj")

        def kv_hook(_m, _a, out, name=name):
            amax = out.detach().reshape(-1, out.shape[-1]).abs().amax(0).float()
            kv[name] = amax if name not in kv else torch.maximum(kv[name], amax)
        handles.append(mod.register_forward_hook(kv_hook))
    try:
        run_layer(layer, inputs, device, update=True)
    finally:
        for h in handles:
            h.remove()
    tensors = {}
    for site, st in stats.items():
        tensors.update(st.tensors(site, distributed))
    for name in ("k", "v"):
        if distributed:
            import torch.distributed as dist
            dist.all_reduce(kv[name], op=dist.ReduceOp.MAX)
        tensors[f"{name}_proj.absmax"] = kv[name].cpu()
    return tensors


def calibrate_layers(lm: LayerwiseModel, samples: torch.Tensor, cfg: CalibrationConfig, device: str,
                     out: Path, rank: int = 0, world: int = 1, progress: bool = True) -> None:
    """Run every decoder layer over ``samples`` and save its statistics into ``out``.

    With ``world`` > 1 this rank handles samples ``rank::world`` and the statistics are
    combined across ranks (torch.distributed must be initialized); rank 0 writes the files.
    Layers whose file exists (an interrupted run) only run forward to rebuild the next inputs.
    """
    mine = samples[rank::world]
    inputs = capture_inputs(lm.model, mine, cfg.batch_size, device, lm.dtype)
    sample_every = max(1, samples.numel() // cfg.sample_tokens) if cfg.sample_tokens > 0 else 0
    seqlen = samples.shape[1]
    token_ids = (torch.arange(rank, samples.shape[0], world)[:, None] * seqlen
                 + torch.arange(seqlen)[None]).reshape(-1)
    lm.drop_embeddings()
    layers = decoder_layers(lm.model)
    for i in tqdm(range(len(layers)), desc="calibrate", unit="layer", disable=not progress):
        layer = lm.materialize(i).to(device)
        if (out / layer_file(i)).is_file():
            run_layer(layer, inputs, device, update=True)
        else:
            stats = _layer_stats(layer, inputs, device, cfg.hessians, distributed=world > 1,
                                 sample_every=sample_every, massive_ratio=cfg.massive_ratio,
                                 token_ids=token_ids)
            if rank == 0:
                replace_atomically(out / layer_file(i), lambda path: save_file(stats, path))
        lm.release(i)


def calibrate(model: str | ModelRef | None = None, out: str | Path | None = None,
              config: CalibrationConfig | None = None, overwrite: bool = False,
              loaded=None, resume: bool = False) -> Path:
    """Calibrate ``model`` and write statistics to ``out``; returns the output directory.

    ``loaded`` optionally passes an already-opened :class:`LayerwiseModel` for ``model``.
    Decoder layers are loaded from disk one at a time and dropped after use. Each finished
    layer's statistics are saved as they are made; with ``resume`` an interrupted run with the
    same settings continues: finished layers only run forward to rebuild the next inputs, so
    the result is identical to an uninterrupted run.
    """
    cfg = config or CalibrationConfig()
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    out = Path(out) if out is not None else default_calib_dir(ref)
    device = resolve_device(cfg.device)
    job = {"kind": "calibration", "model_fingerprint": fingerprint(ref), "dataset": cfg.dataset,
           "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed, "hessians": cfg.hessians,
           "batch_size": cfg.batch_size, "device": device, "workers": cfg.workers,
           "sample_tokens": cfg.sample_tokens, "massive_ratio": cfg.massive_ratio}
    with output_dir(out, overwrite, resume, job) as tmp:
        t0 = time.time()
        lm = loaded if loaded is not None else LayerwiseModel(ref)
        hf_model, tokenizer = lm.model, lm.tokenizer
        src = data_mod.load_text(cfg.dataset, "calibration")
        ids = data_mod.tokenize(tokenizer, src.text)
        samples = data_mod.calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
        overlap = cfg.nsamples * cfg.seqlen > ids.numel()
        print(f"Calibrating {ref.name} on {src.spec['name']}: {cfg.nsamples} x {cfg.seqlen} "
              f"tokens from {ids.numel()} ({'overlapping windows' if overlap else 'random windows'})"
              f", device {device}{', with Hessians' if cfg.hessians else ''}")
        world = cfg.workers if cfg.workers > 0 else (torch.cuda.device_count() if device == "cuda" else 1)
        world = min(world, cfg.nsamples)
        if world > 1:
            from .distributed import calibrate_distributed

            print(f"Spreading calibration over {world} {'GPUs' if device == 'cuda' else 'processes'}")
            calibrate_distributed(ref, samples, cfg, device, tmp, world)
        else:
            calibrate_layers(lm, samples, cfg, device, tmp)
        manifest = {
            "format": CALIB_FORMAT, "version": CALIB_VERSION,
            "model": ref.to_dict(), "model_fingerprint": fingerprint(ref),
            "model_config": describe(hf_model.config),
            "data": {**src.spec, "arg": cfg.dataset, "purpose": "calibration", "tokens": int(ids.numel()),
                     "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed,
                     "overlapping": overlap},
            "hessians": cfg.hessians, "sample_tokens": cfg.sample_tokens,
            "massive_ratio": cfg.massive_ratio, "num_layers": hf_model.config.num_hidden_layers,
            "device": device, "workers": world,
            "seconds": round(time.time() - t0, 1), "versions": versions(),
        }
        write_json(tmp / "manifest.json", manifest)
    print(f"Calibration written to {out}")
    return out


def layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


def default_calib_dir(ref: ModelRef) -> Path:
    return Path("comet_quant_out") / f"{ref.name}-calib"


@dataclass
class Calibration:
    """A calibration directory, read lazily one layer at a time."""

    path: Path
    manifest: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_dir():
            raise CometError(f"calibration directory {path} does not exist; run "
                             "`comet-quant calibrate --out DIR` first")
        manifest = read_json(path / "manifest.json", f"calibration {path}")
        if manifest.get("format") != CALIB_FORMAT:
            raise CometError(f"{path} is not a comet-quant calibration directory")
        if manifest.get("version") != CALIB_VERSION:
            raise CometError(f"{path} has calibration format version {manifest.get('version')}, "
                             f"this comet-quant reads {CALIB_VERSION}; re-run calibrate")
        return cls(path, manifest)

    def check_model(self, ref: ModelRef) -> None:
        if self.manifest.get("model_fingerprint") != fingerprint(ref):
            raise CometError(f"calibration {self.path} was made for model "
                             f"'{self.manifest['model']['name']}', not '{ref.name}'; calibrate "
                             "this model or pass the matching --model")

    def matches(self, cfg: CalibrationConfig) -> bool:
        """Whether this calibration used the data ``cfg`` asks for (and has what it needs)."""
        d = self.manifest["data"]
        if any(d.get(k) != getattr(cfg, k) for k in ("nsamples", "seqlen", "seed")):
            return False
        if d.get("arg") != cfg.dataset or (cfg.hessians and not self.manifest.get("hessians")):
            return False
        if self.manifest.get("sample_tokens", 0) < cfg.sample_tokens:
            return False
        if self.manifest.get("massive_ratio", 0.0) != cfg.massive_ratio:
            return False
        return d.get("sha256") == data_mod.load_text(cfg.dataset, "calibration").spec["sha256"]

    def layer_digest(self) -> str:
        """sha256 over the layer files' names and sizes: identifies this calibration's content."""
        h = hashlib.sha256()
        for i in range(self.manifest["num_layers"]):
            f = self.path / layer_file(i)
            h.update(f"{f.name}:{f.stat().st_size if f.is_file() else -1}".encode())
        h.update(json.dumps(self.manifest.get("data"), sort_keys=True).encode())
        return h.hexdigest()

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        f = self.path / layer_file(i)
        if not f.is_file():
            raise CometError(f"{f} is missing: the calibration is incomplete; re-run calibrate")
        try:
            return load_file(f)
        except (SafetensorError, OSError) as exc:
            raise CometError(f"{f} is corrupt ({exc}); re-run calibrate") from None
