import subprocess
import sys


def test_package_imports_without_heavy_modules():
    code = ("import sys, comet_quant; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy; print(comet_quant.__version__)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "comet_quant.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for cmd in ("calibrate", "export", "eval"):
        assert cmd in out


def test_kernel_sources_do_not_shadow_the_kernels_package():
    """kernels/ (the CUDA sources) is no Python package: from the repository root, `import kernels`
    must reach the installed Hugging Face package that transformers imports (or nothing), never
    our directory. And the build still finds the sources."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s else None)")
    origin = subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True,
                            text=True).stdout.strip()
    assert origin == "None" or not origin.startswith(str(root / "kernels")), origin
    subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=root,
                   check=True)
    from comet_quant import ops

    assert (ops._source_dir() / "w4ax_wgmma.cu").is_file()
