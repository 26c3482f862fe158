// How fast can the decode GEMM's weight reads stream, with no arithmetic at all?
// The ceiling each access pattern sets for a memory-bound kernel (docs/BENCHMARKS.md, "The
// decode kernels"). Same timing method as scripts/bench_kernels.py: 24 launches per CUDA graph,
// rotating over copies of the matrix so it streams from HBM, median of 15 replays.
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/read_pattern scripts/read_pattern_bench.cu
//   /tmp/read_pattern
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

// FRAGMENT: the decode kernels' pattern. Block = 16 weight rows, warp w takes groups w, w + 8, ...
// of all 16 rows; each load instruction reads 64 bytes from each of 8 rows.
// ROWS: warp w reads rows 2w and 2w + 1 front to back, 512 contiguous bytes per instruction.
enum Pattern { FRAGMENT, ROWS };

template <Pattern P, int U>
__global__ void __launch_bounds__(256, 2) read_kernel(const uint8_t* __restrict__ w, int row_bytes, unsigned* sink) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t n0 = blockIdx.x * 16ull;
  unsigned acc = 0;
  if (P == FRAGMENT) {
    const uint8_t* r0 = w + (n0 + (lane >> 2)) * row_bytes + (lane & 3) * 16;
    const uint8_t* r1 = r0 + 8ull * row_bytes;
    const int groups = row_bytes / 64;
    for (int g = warp; g < groups; g += 8 * U) {
      uint4 v[U][2];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = g + 8 * u < groups;
        v[u][0] = in ? __ldg(reinterpret_cast<const uint4*>(r0 + (g + 8 * u) * 64)) : make_uint4(0, 0, 0, 0);
        v[u][1] = in ? __ldg(reinterpret_cast<const uint4*>(r1 + (g + 8 * u) * 64)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= v[u][0].x ^ v[u][0].w ^ v[u][1].y ^ v[u][1].z;
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint8_t* r = w + (n0 + 2 * warp + h) * row_bytes + lane * 16;
      for (int c = 0; c < row_bytes; c += 512 * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          v[u] = c + 512 * u < row_bytes ? __ldg(reinterpret_cast<const uint4*>(r + c + 512 * u)) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].w;
      }
    }
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads; practically never true
}

template <Pattern P, int U>
void run(const char* name, uint8_t* buf, size_t cap, unsigned* sink, int N, int K) {
  const size_t bytes = static_cast<size_t>(N) * K / 2;
  const int copies = static_cast<int>(std::min<size_t>(16, cap / bytes));
  cudaStream_t s;
  cudaStreamCreate(&s);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int i = 0; i < 24; ++i) read_kernel<P, U><<<N / 16, 256, 0, s>>>(buf + (i % copies) * bytes, K / 2, sink);
  cudaStreamEndCapture(s, &graph);
  cudaGraphInstantiate(&exec, graph, 0);
  for (int i = 0; i < 3; ++i) cudaGraphLaunch(exec, s);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  float ms[15];
  for (float& t : ms) {
    cudaEventRecord(a, s);
    cudaGraphLaunch(exec, s);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&t, a, b);
  }
  std::sort(ms, ms + 15);
  const float us = ms[7] / 24 * 1e3f;
  printf("| %s | %d x %d | %.1f | %.2f |\n", name, N, K, us, bytes / (us * 1e-6) / 1e12);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

int main() {
  const size_t cap = size_t{1} << 30;
  uint8_t* buf;
  unsigned* sink;
  if (cudaMalloc(&buf, cap) != cudaSuccess || cudaMalloc(&sink, 4) != cudaSuccess) {
    fprintf(stderr, "read_pattern_bench: needs a CUDA GPU with 1 GiB free\n");
    return 2;
  }
  cudaMemset(buf, 1, cap);
  const int shapes[][2] = {{4096, 4096}, {6144, 4096}, {28672, 4096}, {4096, 14336},
                           {8192, 8192}, {10240, 8192}, {57344, 8192}, {8192, 28672}};
  printf("| pattern | N x K (int4) | us | TB/s |\n|---|---|---|---|\n");
  for (const auto& sh : shapes) {
    run<FRAGMENT, 4>("fragment (64 B x 8 rows), 4 deep", buf, cap, sink, sh[0], sh[1]);
    run<ROWS, 4>("rows (512 B), 4 deep", buf, cap, sink, sh[0], sh[1]);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    fprintf(stderr, "read_pattern_bench: %s\n", cudaGetErrorString(e));
    return 1;
  }
  return 0;
}
