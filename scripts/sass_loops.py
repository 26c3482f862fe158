"""Instruction mix of the innermost loops of each kernel in a SASS listing.

Counts what one iteration of a kernel's main loop issues (the tool behind the instruction
budgets in docs/BENCHMARKS.md, "Session 6"). The listing comes from `cuobjdump -sass` of the
built extension (scripts/gpu_check.sh saves it as sass.txt.gz) or of an object compiled with
nvcc -c; loops are the spans closed by a backward branch (spin-wait retries excluded).

    python scripts/sass_loops.py sass.txt.gz --kernel quantize_act_rows --loops 4
    python scripts/sass_loops.py w4ax_wgmma.sass --kernel wide_kernel --with IGMMA
"""
from __future__ import annotations

import argparse
import collections
import gzip
import re


def loops(body: str):
    ins = [(int(pc, 16), op.strip()) for pc, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    where = {pc: i for i, (pc, _) in enumerate(ins)}
    for i, (pc, op) in enumerate(ins):
        m = re.search(r"BRA(?:\.\S+)? (0x[0-9a-f]+)", op)
        if m and int(m.group(1), 16) < pc and "U.ANY" not in op and int(m.group(1), 16) in where:
            span = [o for _, o in ins[where[int(m.group(1), 16)]:i + 1]]
            if len(span) > 3:  # mbarrier / try-wait retry loops
                yield span


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("listing", help="cuobjdump -sass output (.gz allowed)")
    ap.add_argument("--kernel", default="", help="substring of the (mangled) kernel names to show")
    ap.add_argument("--with", dest="needle", default="", help="only loops containing this opcode")
    ap.add_argument("--loops", type=int, default=3, help="smallest N loops per kernel")
    args = ap.parse_args()
    opener = gzip.open if args.listing.endswith(".gz") else open
    with opener(args.listing, "rt") as f:
        text = f.read()
    for fn in re.split(r"\n\s*Function : ", text)[1:]:
        name = fn.split("\n", 1)[0].strip()
        if args.kernel not in name:
            continue
        found = sorted((s for s in loops(fn) if args.needle in " ".join(s)), key=len)[:args.loops]
        print(name)
        for span in found:
            mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in span)
            print(f"  loop of {len(span)} instructions:", ", ".join(f"{k} {v}" for k, v in mix.most_common(14)))


if __name__ == "__main__":
    main()
