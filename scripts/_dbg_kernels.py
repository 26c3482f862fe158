import sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
from comet_quant import ops
from test_kernels import make_case, rel_err
ops.build()
for k in (1024, 4096, 8192, 14336):
    for n in (256, 4096):
        g = k // 128; g8 = max(1, g // 10)
        x, perm, _, qw, ws = make_case(1, k, n, g8, seed=3, device="cuda")
        q8, q4, s = torch.ops.comet.quantize_act(x, perm, g8)
        r8, r4, rs = ops.quantize_act_reference(x, perm, g8)
        same = torch.equal(q8, r8) and torch.equal(q4, r4) and torch.equal(s, rs)
        ref = ops.w4ax_gemm_reference(q8, q4, s, qw, ws, g8, torch.float32)
        errs = []
        for split in (1, 2, 8, 0):
            y = torch.ops.comet.w4ax_gemm(q8, q4, s, qw, ws, g8, split, False, torch.float32)
            errs.append(f"split{split}={rel_err(y, ref):.2e}")
        sa = torch.ones_like(s); sw = torch.ones_like(ws)
        yi = torch.ops.comet.w4ax_gemm(q8, q4, sa, qw, sw, g8, 1, False, torch.float32)
        ri = ops.w4ax_gemm_reference(q8, q4, sa, qw, sw, g8, torch.float32)
        print(k, n, "actq_same", same, *errs, "unit_exact", torch.equal(yi, ri), "maxabs ref", float(ref.abs().max()), flush=True)
