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
