"""The benchmark's targets table (scripts/bench_kernels.py) on made-up rows: it runs only on a
GPU otherwise, so its verdicts are checked here."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_kernels as bk  # noqa: E402


def _row(shape, m, fp16, fp8, free, ints=None, a8span=None):
    n, k = bk.SHAPES[shape]
    r = {"shape": shape, "M": m, "N": n, "K": k, "fp16": fp16, "fp8": fp8, "ours10": free,
         "roofline_ms": bk.weight_bytes(n, k) / (bk.COPY_TBPS * 1e12) * 1e3}
    if ints is not None:
        r["int10"], r["int10_a8span"] = ints, a8span
    return r


def _cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_targets_table_verdicts():
    rows = [
        _row("8B qkv", 1, 0.021, 0.018, 0.0068),                         # 3.09x / 2.65x: met
        _row("8B o", 16, 0.016, 0.015, 0.0060),                          # 2.67x: not met
        _row("8B qkv", 64, 0.021, 0.015, 0.014, 0.013, 0.012),           # no target at M = 64
        _row("70B down", 256, 0.187, 0.103, 0.147, 0.110, 0.090),        # 2.08x with a8span: met
        _row("8B down", 1024, 0.164, 0.096, 0.148, 0.100, 0.099),        # 1.66x but 0.97x fp8: not met
        _row("70B o", 4096, 0.80, 0.45, 0.68, 0.44, 0.50),               # int: 1.82x / 1.02x: met
    ]
    lines = bk.targets_table(rows).splitlines()
    body = [_cells(x) for x in lines[2:]]
    assert [(c[0], c[1]) for c in body] == [("8B qkv", "1"), ("8B o", "16"), ("70B down", "256"),
                                           ("8B down", "1024"), ("70B o", "4096")]
    assert [c[7] for c in body] == ["yes", "no", "yes", "no", "yes"]
    assert [c[6] for c in body] == ["free", "free", "a8span", "a8span", "int"]
    assert body[0][4] == "n/a" and body[0][3] == "3.09 / 2.65"
    # The weight bytes of 8B qkv (13.0 MB with the scales) in 6.8 us: 1.91 TB/s, 64% of the copy rate.
    assert body[0][8] == "64"
    assert 0 < int(body[-1][9]) < 100
