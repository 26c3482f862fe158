"""Export: FMPQ plans + int4 weights packed in permuted order -> a quantized checkpoint."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibrate import Calibration, CalibrationConfig, calibrate, default_calib_dir
from .checkpoint import ShardWriter, linear_tensors, save_checkpoint
from .errors import CometError
from .fmpq import InputPlan, measured_gains, plan_input, select_groups8
from .gptq import gptq_quantize
from .lazy import LayerwiseModel, return_freed_memory
from .models import SITES, ModelRef, fingerprint, resolve_model
from .outputs import check_output_dir, output_dir, partial_dir
from .primitives import int_row_scales, pad_channels, quantize_weight_rtn, rotate_groups
from .scheme import DEFAULT_PRESET, QuantScheme, get_scheme


def default_export_dir(ref: ModelRef, scheme: QuantScheme) -> Path:
    return Path("comet_quant_out") / f"{ref.name}-{scheme.name}"


def _site_key(layer: int, site: str) -> str:
    return f"{layer}.{site}"


def plan_model(calib: Calibration, scheme: QuantScheme, lm: LayerwiseModel | None = None
               ) -> dict[str, InputPlan]:
    """FMPQ plans of every input site, with the 8-bit groups chosen under the global budget.

    The error criterion (``a8_criterion='error'``) measures each group's gain on the
    calibration rows with the layer's weights, loaded from ``lm`` one layer at a time.
    """
    measure = (scheme.quantizes_activations and scheme.a8_select == "budget"
               and scheme.a8_criterion == "error" and scheme.a8_budget > 0)
    if measure and lm is None:
        raise CometError("a8_criterion='error' needs the model's weights to measure gains")
    plans = {}
    layers = range(calib.manifest["num_layers"])
    for i in tqdm(layers, desc="plan (measure gains)", unit="layer") if measure else layers:
        stats = calib.layer(i)
        layer = lm.materialize(i) if measure else None
        for site, linears in SITES.items():
            what = f"layer {i} {site}"
            plan = plan_input(stats[f"{site}.absmax"], scheme, what=what)
            if measure:
                if f"{site}.sample" not in stats:
                    raise CometError(f"calibration {calib.path} has no activation samples (made by "
                                     "an older comet-quant); re-run calibrate for "
                                     "a8_criterion='error'")
                weights = [layer.get_submodule(lin).weight for lin in linears]
                plan = replace(plan, gains=measured_gains(stats[f"{site}.sample"], weights, plan, scheme))
            plans[_site_key(i, site)] = plan
        if measure:
            lm.release(i)
    return select_groups8(plans, scheme) if scheme.quantizes_activations else plans


def plan_summary(plan: InputPlan) -> dict:
    return {"k": plan.k, "k_padded": plan.k_padded, "groups8": plan.groups8}


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, plan: InputPlan,
                    scheme: QuantScheme, hessian: torch.Tensor | None,
                    sqmean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Permute, quantize and pack one linear layer's weight [N, K] under ``plan``.

    ``sqmean`` (float [K], the input's per-channel mean square) weights the RTN clipping
    search. Returns the checkpoint tensors of the layer without name prefix (docs/FORMAT.md).
    """
    perm = plan.perm.long()
    w = pad_channels(weight.float(), plan.k_padded)[:, perm]
    if scheme.rotate:  # y = x W^T = (x R)(W R)^T for the orthonormal block rotation R
        w = rotate_groups(w, scheme.group_size)
    rows = int_row_scales(w, scheme.group_size) if scheme.int_group_scales else None
    if scheme.w_method == "gptq":
        if hessian is None:
            raise CometError("GPTQ needs calibration Hessians")
        hp = torch.zeros(plan.k_padded, plan.k_padded)
        hp[: plan.k, : plan.k] = hessian.float()
        hp = hp[perm][:, perm]
        if scheme.rotate:
            hp = rotate_groups(rotate_groups(hp, scheme.group_size).t().contiguous(), scheme.group_size)
        q, scale, zero = gptq_quantize(w, hp, scheme.group_size, scheme.w_symmetric,
                                       scheme.gptq_damp, scheme.gptq_block,
                                       act_order=scheme.gptq_act_order, clip=scheme.w_clip,
                                       row_scale=rows)
    else:
        col_weight = None
        if scheme.w_clip and sqmean is not None:
            col_weight = pad_channels(sqmean.float()[None], plan.k_padded)[0, perm]
            if scheme.rotate:  # diagonal of R^T diag(d) R: the group mean of d
                g = scheme.group_size
                col_weight = col_weight.reshape(-1, g).mean(-1, keepdim=True).expand(-1, g).reshape(-1)
        q, scale, zero = quantize_weight_rtn(w, scheme.group_size, scheme.w_symmetric,
                                             scheme.w_clip, col_weight, rows)
    return linear_tensors(q, scale, zero, plan.perm, plan.groups8, bias, rows)


def _open_or_make_calibration(ref: ModelRef, calib: str | Path | None, scheme: QuantScheme,
                              calib_config: CalibrationConfig | None, loaded,
                              resume: bool = False) -> Calibration:
    if calib is not None:
        c = Calibration.open(calib)
        c.check_model(ref)
        if scheme.needs_hessians and not c.manifest.get("hessians"):
            raise CometError(f"scheme '{scheme.name}' uses GPTQ but calibration {calib} has no "
                             "Hessians; re-run `comet-quant calibrate --hessians` or choose an "
                             "RTN scheme (e.g. w4ax-kv4-rtn)")
        return c
    default = default_calib_dir(ref)
    cfg = calib_config or CalibrationConfig()
    cfg.hessians = cfg.hessians or scheme.needs_hessians
    if (default / "manifest.json").is_file():
        try:
            c = Calibration.open(default)
            c.check_model(ref)
            if c.matches(cfg):
                print(f"Using existing calibration {default}")
                return c
        except CometError:
            pass
    calibrate(ref, default, cfg, overwrite=True, loaded=loaded,
              resume=resume and partial_dir(default).is_dir())
    return Calibration.open(default)


def export(model: str | ModelRef | None = None, calib: str | Path | None = None,
           scheme: QuantScheme | str = DEFAULT_PRESET, out: str | Path | None = None,
           overwrite: bool = False, calib_config: CalibrationConfig | None = None,
           resume: bool = False) -> Path:
    """Quantize ``model`` with ``scheme`` and write a checkpoint; returns its directory.

    Without ``calib`` the default calibration directory is reused when it matches, else made.
    Every finished shard is kept as it is written; ``resume`` continues an interrupted export
    (and its calibration) with the same settings, skipping the shards already written.
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    out = Path(out) if out is not None else default_export_dir(ref, scheme)
    check_output_dir(out, overwrite)
    t0 = time.time()
    lm = LayerwiseModel(ref)
    hf_model, tokenizer = lm.model, lm.tokenizer
    cal = _open_or_make_calibration(ref, calib, scheme, calib_config, lm, resume)
    lm.drop_embeddings()  # export reads them from disk when it writes them
    plans = plan_model(cal, scheme, lm)
    num_layers = hf_model.config.num_hidden_layers
    padded = sorted({(p.k, p.k_padded) for p in plans.values() if p.k != p.k_padded})
    for k, kp in padded:
        print(f"note: K={k} is not a multiple of group size {scheme.group_size}: padding with "
              f"{kp - k} zero channels to {kp} (k_policy='pad')")
    job = {"kind": "export", "model_fingerprint": fingerprint(ref), "scheme": scheme.to_dict(),
           "calibration": cal.manifest.get("data"), "calibration_layers": cal.layer_digest()}
    with output_dir(out, overwrite, resume, job) as tmp:
        # Shards: embeddings + final norm, then lm_head when untied, then one per layer, so
        # memory holds one of them at a time.
        tied = hf_model.config.tie_word_embeddings
        first_layer = 2 if tied else 3
        writer = ShardWriter(tmp, num_layers + first_layer - 1)
        if not writer.done(1):
            writer.write(1, {n: t.to(torch.float16) for n, t in lm.non_layer_tensors()})
        if not tied and not writer.done(2):
            writer.write(2, {n: t.to(torch.float16) for n, t in lm.non_layer_tensors(head=True)})
        return_freed_memory()
        for i in tqdm(range(num_layers), desc=f"export {scheme.name}", unit="layer"):
            if writer.done(first_layer + i):
                continue
            stats = cal.layer(i) if scheme.needs_hessians or scheme.w_clip else {}
            layer = lm.materialize(i)
            shard: dict[str, torch.Tensor] = {
                f"model.layers.{i}.{n}": p.detach().to(torch.float16)
                for n, p in layer.named_parameters() if "layernorm" in n}
            for site, linears in SITES.items():
                plan = plans[_site_key(i, site)]
                for lin in linears:
                    mod = layer.get_submodule(lin)
                    qt = quantize_linear(mod.weight, mod.bias, plan, scheme,
                                         stats.get(f"{site}.hessian"), stats.get(f"{site}.sqmean"))
                    shard.update({f"model.layers.{i}.{lin}.{k}": v for k, v in qt.items()})
            lm.release(i)
            writer.write(first_layer + i, shard)
        layer_meta = {str(i): {site: plan_summary(plans[_site_key(i, site)]) for site in SITES}
                      for i in range(num_layers)}
        save_checkpoint(tmp, writer, hf_model.config, tokenizer, scheme, ref, cal.manifest, layer_meta)
    print(f"Quantized checkpoint written to {out} ({time.time() - t0:.0f} s)")
    return out
