"""The ``comet-quant`` command line: click parses options and calls one library function each."""
from __future__ import annotations

import sys

import click

from .errors import CometError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Group(click.Group):
    """Turns CometError into one ``error:`` line with exit status 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CometError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written under the final output name", err=True)
            sys.exit(EXIT_INTERRUPTED)


model_opt = click.option("--model", default=None, metavar="MODEL",
                         help="Hugging Face directory, hub id, or .gguf file "
                              "[default: SmolLM2-135M-Instruct, fetched and cached]")
device_opt = click.option("--device", default="auto", show_default=True,
                          help="cpu, cuda, or auto (cuda when available)")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
resume_opt = click.option("--resume", is_flag=True,
                          help="Continue an interrupted run with the same options (kept in .OUT.partial).")


def _calib_options(fn):
    from .calibrate import DEFAULT_BATCH, DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN

    opts = [
        click.option("--dataset", default="calib", show_default=True,
                     help="calib (bundled), wikitext2, c4, pile, or a .txt/.raw/.jsonl/.parquet file"),
        click.option("--nsamples", type=int, default=DEFAULT_NSAMPLES, show_default=True),
        click.option("--seqlen", type=int, default=DEFAULT_SEQLEN, show_default=True),
        click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True),
        click.option("--batch-size", type=int, default=DEFAULT_BATCH, show_default=True),
        device_opt,
        click.option("--workers", type=int, default=0, show_default=True,
                     help="Calibration ranks (torch.distributed, one per GPU); 0: all visible GPUs."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _calib_config(dataset, nsamples, seqlen, seed, batch_size, device, workers, hessians=False):
    from .calibrate import CalibrationConfig

    if batch_size < 1:
        raise CometError("--batch-size must be positive")
    if workers < 0:
        raise CometError("--workers must be 0 (auto) or positive")
    return CalibrationConfig(dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                             hessians=hessians, batch_size=batch_size, device=device, workers=workers)


@click.group(cls=_Group)
@click.version_option(package_name="comet-quant")
def main():
    """FMPQ W4Ax + KV4 quantization of LLaMA-family models."""


@main.command()
@model_opt
@_calib_options
@click.option("--hessians/--no-hessians", default=False, show_default=True,
              help="Also save GPTQ Hessians E[x x^T] of every linear input.")
@click.option("--out", default=None, help="Output directory [default: comet_quant_out/MODEL-calib]")
@overwrite_opt
@resume_opt
def calibrate(model, dataset, nsamples, seqlen, seed, batch_size, device, workers, hessians, out,
              overwrite, resume):
    """Record activation, K/V statistics (and Hessians) layer by layer."""
    from .calibrate import calibrate as run

    run(model, out, _calib_config(dataset, nsamples, seqlen, seed, batch_size, device, workers, hessians),
        overwrite=overwrite, resume=resume)


@main.command()
@model_opt
@click.option("--calib", default=None, help="Calibration directory [default: calibrate first]")
@click.option("--scheme", default="w4ax-kv4", show_default=True, help="Preset (see `schemes`).")
@click.option("--a8-budget", type=float, default=None, help="Largest fraction of 8-bit groups.")
@click.option("--a8-select", type=click.Choice(["budget", "threshold"]), default=None,
              help="How 8-bit groups are chosen (see docs/SCHEME.md).")
@click.option("--a8-threshold", type=float, default=None, help="Outlier ratio for threshold mode.")
@click.option("--a8-criterion", type=click.Choice(["absmax", "error"]), default=None,
              help="Rank groups by outlier score or by measured output error (budget mode).")
@click.option("--a8-layer-cap", type=float, default=None,
              help="Largest fraction of one input's groups in 8 bit [default: 1, no cap].")
@click.option("--act-order/--no-act-order", default=None,
              help="GPTQ column order by Hessian diagonal [default: on].")
@click.option("--clip/--no-clip", default=None, help="Weight clipping search [default: on].")
@click.option("--group-size", type=int, default=None, help="Channels per group [default: 128].")
@click.option("--w-method", type=click.Choice(["rtn", "gptq"]), default=None)
@click.option("--asymmetric", is_flag=True, default=None, help="Asymmetric int4 weights.")
@click.option("--kv-bits", type=click.Choice(["4", "8", "16"]), default=None)
@click.option("--int-group-scales/--free-group-scales", default=None,
              help="Group scales as a row's (a token span's) scale times an integer 1-16, which "
                   "the Hopper GEMM sums in int32 (faster, slightly less accurate; docs/SCHEME.md) "
                   "[default: the preset's].")
@click.option("--a8-span-scales/--a8-group-scales", default=None,
              help="With integer group scales: the 8-bit activation groups of each span share one "
                   "scale, so the Hopper GEMM sums them in int32 too (docs/SCHEME.md) "
                   "[default: the preset's].")
@_calib_options
@click.option("--out", default=None, help="Output directory [default: comet_quant_out/MODEL-SCHEME]")
@overwrite_opt
@resume_opt
def export(model, calib, scheme, a8_budget, a8_select, a8_threshold, a8_criterion, a8_layer_cap,
           act_order, clip, group_size, w_method, asymmetric, kv_bits, int_group_scales, a8_span_scales, dataset,
           nsamples, seqlen, seed, batch_size, device, workers, out, overwrite, resume):
    """Run FMPQ and write a quantized checkpoint."""
    from .export import export as run
    from .scheme import get_scheme

    chosen = get_scheme(scheme, a8_budget=a8_budget, a8_select=a8_select,
                        a8_threshold=a8_threshold, a8_criterion=a8_criterion,
                        a8_layer_cap=a8_layer_cap, gptq_act_order=act_order, w_clip=clip,
                        group_size=group_size, w_method=w_method,
                        w_symmetric=(False if asymmetric else None),
                        kv_bits=int(kv_bits) if kv_bits else None,
                        int_group_scales=int_group_scales, a8_span_scales=a8_span_scales)
    run(model, calib, chosen, out, overwrite,
        _calib_config(dataset, nsamples, seqlen, seed, batch_size, device, workers), resume=resume)


@main.command(name="build-kernels")
def build_kernels():
    """Compile the W4Ax CUDA kernels for this GPU now (otherwise built on first use)."""
    from . import ops

    click.echo(f"Kernels built in {ops.build(verbose=True)}")


@main.command()
@click.argument("checkpoint")
@click.option("--tolerance", type=float, default=1e-2, show_default=True,
              help="Largest relative error allowed (kernels vs reference).")
@click.option("--tokens", type=int, default=64, show_default=True)
def verify(checkpoint, tolerance, tokens):
    """Run every quantized linear of CHECKPOINT through the GPU kernels and the reference."""
    from .verify import verify_checkpoint

    result = verify_checkpoint(checkpoint, tolerance, tokens)
    click.echo(f"{'layer type':<12} {'worst rel. error':>18}")
    for kind, err in result["worst"].items():
        click.echo(f"{kind:<12} {err:>18.3e}")
    if not result["ok"]:
        click.echo(f"error: kernel output differs from the reference by more than {tolerance}", err=True)
        sys.exit(1)
    click.echo(f"all linears within {tolerance}")


@main.command()
@click.argument("checkpoint")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@device_opt
def generate(checkpoint, prompt, max_new_tokens, device):
    """Generate text with a quantized checkpoint (greedy)."""
    from .calibrate import resolve_device
    from .kvcache import cache_keyword
    from .qmodules import load_quantized, new_kv_cache

    if max_new_tokens < 1:
        raise CometError("--max-new-tokens must be at least 1")
    device = resolve_device(device)
    model, tok = load_quantized(checkpoint, device=device)
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         **{cache_keyword(): new_kv_cache(model, ids.shape[1] + max_new_tokens)},
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    click.echo(tok.decode(out[0], skip_special_tokens=True))


@main.command()
@click.argument("checkpoint")
@click.option("--batch", default="1,16,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", type=int, default=1024, show_default=True)
@click.option("--gen-len", type=int, default=256, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs (median).")
@device_opt
@click.option("--reference", default=None, help="FP model [default: the checkpoint's source model].")
@click.option("--no-reference", is_flag=True, help="Benchmark the quantized model only.")
@click.option("--output", default=None, help="JSON result path.")
@click.option("--cuda-graphs/--eager", "graphs", default=None,
              help="Decode through a captured CUDA graph with static caches (both models), or eager "
                   "forwards with growing caches  [default: graphs on a GPU, eager on the CPU]")
def bench(checkpoint, batch, prompt_len, gen_len, repeats, device, reference, no_reference, output, graphs):
    """Prefill/decode throughput and memory of CHECKPOINT (kernels, 4-bit KV) vs its FP16 model."""
    from .bench import benchmark
    from .calibrate import resolve_device

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise CometError(f"--batch takes comma-separated integers (got '{batch}')") from None
    if repeats < 1:
        raise CometError("--repeats must be at least 1")
    device = resolve_device(device)
    if not device.startswith("cuda"):
        click.echo("note: no GPU; timing the reference path on the CPU (not representative)", err=True)
    benchmark(checkpoint, batches, prompt_len, gen_len, device, reference, repeats, no_reference, output,
              graphs=graphs)


@main.command()
def schemes():
    """List the scheme presets."""
    from .scheme import PRESETS

    width = max(len(name) for name in PRESETS) + 2
    for name, s in PRESETS.items():
        click.echo(f"{name:<{width}}{scheme_summary(s)}")


def scheme_summary(s) -> str:
    """One line of a scheme's main choices, as `comet-quant schemes` lists them."""
    if s.a_bits >= 16:
        a = "a16"
    elif s.a_bits == 4 and s.a8_select == "fixed":
        a = f"a4/a8 x{s.a8_groups} grp"
    elif s.a_bits == 4 and s.a8_budget:
        a = f"a4/a8<= {s.a8_budget:.0%}"
    else:
        a = f"a{s.a_bits}"
    extras = [t for t, on in (("hadamard", s.rotate), ("int-group-scales", s.int_group_scales),
                              ("a8-span-scales", s.a8_span_scales)) if on]
    return (f"w4 {s.w_method:<4} {'sym ' if s.w_symmetric else 'asym'} {a:<14} kv{s.kv_bits:<3} "
            f"group {s.group_size}" + (f"  {' '.join(extras)}" if extras else ""))


@main.group(name="eval")
def eval_group():
    """Evaluate models and checkpoints."""


@eval_group.command()
@click.argument("target", required=False)
@click.option("--dataset", default=None,
              help="wikitext2, c4, pile, calib-heldout, or a local file "
                   "[default: wikitext2 test, or the bundled held-out text when offline]")
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-windows", type=int, default=None, help="Evaluate at most N windows.")
@device_opt
@click.option("--reference", default=None, help="FP model to compare a checkpoint against "
                                                 "[default: the checkpoint's source model].")
@click.option("--no-reference", is_flag=True, help="Skip the FP model.")
@click.option("--output", default=None, help="JSON result path.")
@click.option("--backend", type=click.Choice(["simulated", "kernels"]), default="simulated",
              show_default=True, help="Run the checkpoint in PyTorch or with the CUDA kernels.")
def perplexity(target, dataset, seqlen, max_windows, device, reference, no_reference, output, backend):
    """Perplexity of MODEL_OR_CHECKPOINT (a checkpoint: FP reference and quantized side by side)."""
    from .evaluate import eval_perplexity

    if max_windows is not None and max_windows < 1:
        raise CometError("--max-windows must be at least 1")
    eval_perplexity(target, dataset, seqlen, max_windows, device, reference, output, no_reference,
                    backend)


if __name__ == "__main__":
    main()
