"""What the Hopper int8 tensor cores sustain under the W4Ax GEMM's loop structures (sm_90a only).

A synthetic kernel per configuration: every warpgroup loops over `--groups` K-groups of 128 on a
token tile and weight tile that stay in shared memory (no copies, no ring, no barriers), issuing
the int8 `wgmma` of each group exactly as kernels/w4ax_wgmma.cu does, optionally followed by its
per-group rescale (three instructions per accumulator element). So it measures the ceiling of a
loop structure itself: what a kernel built on it can reach at best. Configurations:

    A operand   rs: weights from registers (expanded from packed int4 in shared memory per group,
                as the real kernel), ss: from shared memory (an int8 tile, no expansion)
    tokens      the wgmma N of a warpgroup's tile (each warpgroup has 64 output channels)
    wgs         warpgroups per block (one block per SM)
    loop        one: issue a group, wait for it, rescale it
                halves: the group as two N/2 halves with a commit each, the first half rescaled
                while the second runs (the 128-token kernel)
                two: two accumulator sets, group i + 1 issued before group i is rescaled
                (the 96-token kernel)
    ping-pong   (optional, 2 warpgroups) 1: the warpgroups take turns issuing their groups' wgmma
                (named barriers), so one's rescale runs while the other's wgmma do
    rescale     0: none (the tensor-core stream alone: the accumulators are never reset, or ptxas
                drops the wgmma whose results are overwritten), 1: the kernel's
                three-instruction rescale, 2: integer group scales (int_group_scales): the
                weight fragments expanded as code x multiplier (weight_fragments_int) and the
                groups summed in the int32 accumulators, no rescale; each group one commit,
                waited for one group later (when the kernel would release its stage)

Writes the CUDA source, builds it with nvcc for sm_90a, runs it, prints one row per
configuration (median of 5 timed launches) and the ptxas resource report:

    python scripts/wgmma_probe.py [--groups 4096] [--out DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# (A operand, tokens, warpgroups, loop, rescale[, ping-pong: the two warpgroups take turns issuing])
CONFIGS = [
    ("rs", 128, 2, "halves", 0),
    ("rs", 128, 2, "halves", 1),
    ("rs", 128, 2, "one", 1),
    ("rs", 128, 2, "halves", 1, 1),
    ("rs", 128, 2, "one", 1, 1),
    ("rs", 192, 2, "halves", 1, 1),
    ("rs", 96, 2, "two", 0),
    ("ss", 128, 2, "halves", 0),
    ("ss", 128, 2, "halves", 1),
    ("rs", 256, 2, "one", 0),
    ("ss", 256, 2, "one", 0),
    ("rs", 192, 2, "halves", 0),
    ("rs", 192, 2, "halves", 1),
    ("ss", 192, 2, "halves", 1),
    ("rs", 128, 3, "halves", 1),
    ("ss", 128, 3, "halves", 1),
    ("rs", 64, 4, "halves", 1),
    ("ss", 64, 4, "halves", 1),
    ("rs", 64, 4, "one", 1),
    ("rs", 128, 2, "one", 2),
    ("rs", 192, 2, "one", 2),
    ("rs", 256, 2, "one", 2),
]
LOOPS = {"one": 0, "halves": 1, "two": 2}


def wgmma_fn(n: int, ss: bool) -> str:
    """One wgmma m64n{n}k32 s8 x s8 -> s32 as an inline-asm function (A from registers or smem)."""
    regs = n // 2
    d = ", ".join(f"%{i}" for i in range(regs))
    outs = ", ".join(f'"+r"(d[{i}])' for i in range(regs))
    if ss:
        a_txt, a_ops, nxt = f"%{regs}", '"l"(da)', regs + 1
        sig = "uint64_t da"
    else:
        a_txt = "{" + ", ".join(f"%{regs + i}" for i in range(4)) + "}"
        a_ops = ", ".join(f'"r"(a[{i}])' for i in range(4))
        nxt = regs + 4
        sig = "const uint32_t (&a)[4]"
    kind = "ss" if ss else "rs"
    return f"""
template <bool ACC>
__device__ __forceinline__ void mma_{kind}_{n}(int (&d)[{regs}], {sig}, uint64_t db) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nxt + 1}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k32.s32.s8.s8 {{{d}}}, {a_txt}, %{nxt}, p;\\n}}\\n"
               : {outs}
               : {a_ops}, "l"(db), "n"(ACC ? 1 : 0));
}}
"""


KERNEL = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#include "wgmma_common.cuh"

// The kernel's own helpers (shared-memory loads, descriptors, wgmma fence / commit / wait,
// weight fragments).
using namespace comet::sm90;

@WGMMA@

template <int N, bool SS> struct Mma;
@DISPATCH@

__device__ __forceinline__ void bar_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

template <int N, bool SS, int WGS, int LOOP, int RESCALE, bool PP = false>
__global__ void __launch_bounds__(WGS * 128, 1) probe(int groups, float* out) {
  constexpr int R = N / 2;           // int32 accumulators per thread
  constexpr int B_BYTES = N * 128;   // token tile [N][128], 128-byte swizzle (content is arbitrary)
  constexpr int A_BYTES = 64 * 128;  // per warpgroup: int8 weights (ss) / packed weights use half
  extern __shared__ uint8_t raw[];
  uint8_t* sm = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023});
  const int T = WGS * 128;
  const int total = B_BYTES + WGS * A_BYTES + N * 4;
  for (int i = threadIdx.x; i < total / 4; i += T) {
    uint32_t h = (i + 1) * 2654435761u;
    reinterpret_cast<uint32_t*>(sm)[i] = (i >= (B_BYTES + WGS * A_BYTES) / 4) ? __float_as_uint(1e-3f * ((h >> 20) + 1)) : h;
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int warp = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 5), 0), lane = threadIdx.x & 31;
  const int wg = warp >> 2, wq = warp & 3, gid = lane >> 2, tig = lane & 3;
  const uint32_t b0 = smem_u32(sm), a0 = b0 + B_BYTES + wg * A_BYTES, s0 = b0 + B_BYTES + WGS * A_BYTES;
  const uint64_t db = desc_k_major_sw128(b0), da = desc_k_major_sw128(a0);
  const uint32_t w_off = a0 + (wq * 16 + gid) * 64 + tig * 16;
  const float ws[2] = {1e-3f * (1 + lane), 2e-3f}, off[2] = {-12582912.f * ws[0], -12582912.f * ws[1]};
  float acc[R];
#pragma unroll
  for (int e = 0; e < R; ++e) acc[e] = 0.f;

  const uint32_t m0 = 1 + (lane & 15), m1 = 16 - (lane & 15);  // integer multipliers (RESCALE == 2)
  auto frags = [&](uint32_t (&a)[4][4]) {
    if constexpr (RESCALE == 2) weight_fragments_int(lds128(w_off), lds128(w_off + 8 * 64), m0, m1, a);
    else weight_fragments(lds128(w_off), lds128(w_off + 8 * 64), a);
  };
  // One group's four k32 steps on tokens [t0, t0 + NN) into d.
  auto steps = [&](auto& d, uint32_t (&a)[4][4], int t0) {
    using M = Mma<sizeof(d) / sizeof(int) * 2, SS>;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t b = db + ((t0 * 128) >> 4) + 2 * k;
      if (k == 0 && RESCALE == 1) M::template run<false>(d, a[k], da + 2 * k, b);  // else nothing is dead code
      else M::template run<true>(d, a[k], da + 2 * k, b);
    }
  };
  auto rescale = [&](int (&d)[R], int j0, int j1) {
#pragma unroll
    for (int e = 4 * j0; e < 4 * j1; ++e) fence_operand(d[e]);
    if constexpr (RESCALE == 1) {
#pragma unroll
      for (int j = j0; j < j1; ++j) {
        const float2 as = lds64f(s0 + 8 * tig + 32 * j);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float t = fmaf(__int_as_float(d[4 * j + e] + 0x4B400000), ws[e >> 1], off[e >> 1]);
          acc[4 * j + e] = fmaf(t, (e & 1) ? as.y : as.x, acc[4 * j + e]);
        }
      }
    }
    __syncwarp();  // as the kernel, which then releases the stage
  };
  auto issue = [&](int (&d)[R]) {
    uint32_t a[4][4];
    if constexpr (!SS) frags(a);
    wgmma_fence();
    if constexpr (LOOP == 1) {
      int(&lo)[R / 2] = *reinterpret_cast<int(*)[R / 2]>(d);
      int(&hi)[R / 2] = *reinterpret_cast<int(*)[R / 2]>(d + R / 2);
      steps(lo, a, 0);
      wgmma_commit();
      steps(hi, a, N / 2);
      wgmma_commit();
    } else {
      steps(d, a, 0);
      wgmma_commit();
    }
  };
  int d0[R];
  // Ping-pong: warpgroup w issues after barrier 1 + w, then lets the other one go (barrier 2 - w).
  auto turn = [&]() { if constexpr (PP) bar_sync(1 + wg); };
  auto pass = [&](int i) { if constexpr (PP) if (wg == 0 || i + 1 < groups) bar_arrive(2 - wg); };
  if constexpr (PP) if (wg == 1) bar_arrive(1);
  if constexpr (RESCALE == 2) {  // one int32 sum over the groups; group i - 1 waited for after i is issued
#pragma unroll
    for (int e = 0; e < R; ++e) d0[e] = 0;
    for (int i = 0; i < groups; ++i) {
      issue(d0);
      wgmma_wait<1>();
      __syncwarp();
    }
    wgmma_wait<0>();
  } else if constexpr (LOOP == 0) {
    for (int i = 0; i < groups; ++i) {
      turn();
      issue(d0);
      pass(i);
      wgmma_wait<0>();
      rescale(d0, 0, N / 8);
    }
  } else if constexpr (LOOP == 1) {
    for (int i = 0; i < groups; ++i) {
      turn();
      issue(d0);
      pass(i);
      wgmma_wait<1>();
      rescale(d0, 0, N / 16);
      wgmma_wait<0>();
      rescale(d0, N / 16, N / 8);
    }
  } else {
    int d1[R];
    issue(d0);
    int i = 0;
    for (; i + 2 < groups; i += 2) {
      issue(d1);
      wgmma_wait<1>();
      rescale(d0, 0, N / 8);
      issue(d0);
      wgmma_wait<1>();
      rescale(d1, 0, N / 8);
    }
    issue(d1);
    wgmma_wait<1>();
    rescale(d0, 0, N / 8);
    wgmma_wait<0>();
    rescale(d1, 0, N / 8);
    if constexpr (!RESCALE) {
#pragma unroll
      for (int e = 0; e < R; ++e) d0[e] += d1[e];
    }
  }
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < R; ++e) s += RESCALE == 1 ? acc[e] : static_cast<float>(d0[e]);  // keeps the results live
  out[blockIdx.x * T + threadIdx.x] = s;
}

template <int N, bool SS, int WGS, int LOOP, int RESCALE, bool PP = false>
void run(const char* name, int groups, int sms, float* out) {
  auto k = probe<N, SS, WGS, LOOP, RESCALE, PP>;
  const int smem = N * 128 + WGS * 64 * 128 + N * 4 + 1024;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int rep = 0; rep < 7; ++rep) {
    cudaEventRecord(a);
    k<<<sms, WGS * 128, smem>>>(groups, out);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t = 0.f;
    cudaEventElapsedTime(&t, a, b);
    if (rep >= 2) ms.push_back(t);
  }
  cudaError_t e = cudaGetLastError();
  std::sort(ms.begin(), ms.end());
  const double t = ms[ms.size() / 2] * 1e-3;
  const double ops = 2.0 * sms * WGS * 64.0 * N * 128.0 * groups;
  printf("| %s | %.3f | %.0f | %s |\n", name, t * 1e3, ops / t / 1e12, e == cudaSuccess ? "ok" : cudaGetErrorString(e));
}

int main(int argc, char** argv) {
  const int groups = argc > 1 ? atoi(argv[1]) : 4096;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  printf("%s, %d SMs, %d groups of 128 per warpgroup\n\n", p.name, sms, groups);
  float* out;
  cudaMalloc(&out, sizeof(float) * sms * 512);
  printf("| A operand, tokens, warpgroups, loop, rescale | ms | TOPS | status |\n|---|---|---|---|\n");
@RUNS@
  return 0;
}
"""


def source() -> str:
    fns, disp, runs = [], [], []
    shapes = set()
    for a, n, wgs, loop, resc, *pp in CONFIGS:
        for nn in (n, n // 2):
            shapes.add((nn, a == "ss"))
        pp = bool(pp and pp[0])
        name = f"{a}, {n}, {wgs}, {loop}{' ping-pong' if pp else ''}, {resc}"
        runs.append(f'  run<{n}, {str(a == "ss").lower()}, {wgs}, {LOOPS[loop]}, {resc}, '
                    f'{str(pp).lower()}>("{name}", groups, sms, out);')
    for n, ss in sorted(shapes):
        fns.append(wgmma_fn(n, ss))
        kind = "ss" if ss else "rs"
        call = f"mma_{kind}_{n}<ACC>(d, da, db)" if ss else f"mma_{kind}_{n}<ACC>(d, a, db)"
        disp.append(f"template <> struct Mma<{n}, {str(ss).lower()}> {{ template <bool ACC> __device__ static "
                    f"void run(int (&d)[{n // 2}], const uint32_t (&a)[4], uint64_t da, uint64_t db) "
                    f"{{ (void)a; (void)da; {call}; }} }};")
    return (KERNEL.replace("@WGMMA@", "\n".join(fns)).replace("@DISPATCH@", "\n".join(disp))
            .replace("@RUNS@", "\n".join(runs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None, help="also write the table and ptxas report here")
    ap.add_argument("--compile-only", action="store_true", help="build (e.g. without a GPU) and stop")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wgmma_probe_"))
    (work / "probe.cu").write_text(source())
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    build = subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                            f"-I{kernels}",
                            "-o", str(work / "probe"), str(work / "probe.cu")], capture_output=True, text=True)
    report = "\n".join(line for line in build.stderr.splitlines()
                       if "registers" in line or "spill" in line or "error" in line or "Function" in line)
    if build.returncode != 0:
        print(build.stderr, file=sys.stderr)
        return 1
    if args.compile_only:
        print(report)
        return 0
    run = subprocess.run([str(work / "probe"), str(args.groups)], capture_output=True, text=True)
    print(run.stdout + run.stderr)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "wgmma_probe.md").write_text(run.stdout + "\n```\n" + report + "\n```\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
