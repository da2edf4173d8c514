#include "gpu-worker/backends/cpu/internal/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace kvrecall::worker::internal {
namespace {

constexpr int kMr = 6;              // rows per micro-tile
constexpr int kRowBlock = 8 * kMr;  // rows per task: its x block stays in L2 across panels

// out: [MR][16] = x rows [MR][K] (stride ldx) . panel [K][16].
using Kernel = void (*)(const float* x, long ldx, const float* panel, int k, float* out);

template <int MR>
void KernelPortable(const float* x, long ldx, const float* panel, int k_size, float* out) {
  float c[MR][kGemmPanel] = {};
  for (int k = 0; k < k_size; ++k) {
    const float* b = panel + static_cast<long>(k) * kGemmPanel;
    for (int r = 0; r < MR; ++r) {
      const float a = x[r * ldx + k];
      for (int j = 0; j < kGemmPanel; ++j) c[r][j] += a * b[j];
    }
  }
  std::memcpy(out, c, sizeof(c));
}

// 6 x 16 tile: 12 ymm accumulators + 2 weight registers + 1 broadcast.
template <int MR>
__attribute__((target("avx2,fma"))) void KernelAvx2(const float* x, long ldx, const float* panel,
                                                    int k_size, float* out) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm256_setzero_ps();
    c1[r] = _mm256_setzero_ps();
  }
  for (int k = 0; k < k_size; ++k) {
    const float* b = panel + static_cast<long>(k) * kGemmPanel;
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(out + r * kGemmPanel, c0[r]);
    _mm256_storeu_ps(out + r * kGemmPanel + 8, c1[r]);
  }
}

constexpr Kernel kPortableKernels[kMr + 1] = {
    nullptr,           KernelPortable<1>, KernelPortable<2>, KernelPortable<3>,
    KernelPortable<4>, KernelPortable<5>, KernelPortable<6>};
constexpr Kernel kAvx2Kernels[kMr + 1] = {nullptr,       KernelAvx2<1>, KernelAvx2<2>,
                                          KernelAvx2<3>, KernelAvx2<4>, KernelAvx2<5>,
                                          KernelAvx2<6>};

}  // namespace

CpuIsa DetectCpuIsa() {
  const char* env = std::getenv("KVRECALL_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "portable") == 0) return CpuIsa::kPortable;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2Fma;
  return CpuIsa::kPortable;
}

const char* CpuIsaName(CpuIsa isa) { return isa == CpuIsa::kAvx2Fma ? "avx2+fma" : "portable"; }

PackedWeight::PackedWeight(const float* w, int rows, int cols) : rows_(rows), cols_(cols) {
  data_.assign(static_cast<size_t>(num_panels()) * cols * kGemmPanel, 0.0f);
  for (int p = 0; p < num_panels(); ++p) {
    float* dst = data_.data() + static_cast<size_t>(p) * cols * kGemmPanel;
    for (int j = 0; j < kGemmPanel && p * kGemmPanel + j < rows; ++j) {
      const float* src = w + static_cast<size_t>(p * kGemmPanel + j) * cols;
      for (int k = 0; k < cols; ++k) dst[static_cast<size_t>(k) * kGemmPanel + j] = src[k];
    }
  }
}

void Gemm(ThreadPool* pool, CpuIsa isa, const float* x, int n, long ldx, const PackedWeight& w,
          const float* bias, bool accumulate, float* y, long ldy) {
  if (n <= 0 || w.rows() == 0) return;
  const Kernel* kernels = isa == CpuIsa::kAvx2Fma ? kAvx2Kernels : kPortableKernels;
  const int k_size = w.cols();
  const int panels = w.num_panels();
  const int row_blocks = (n + kRowBlock - 1) / kRowBlock;
  // Panels per task: a task's weights (pb * 16 * K floats) should stay within ~256 KiB of L2,
  // and there should be a few tasks per thread for load balance.
  int pb = std::clamp(4096 / std::max(k_size, 1), 1, panels);
  const int threads = pool == nullptr ? 1 : pool->size() + 1;
  while (pb > 1 && static_cast<long>(row_blocks) * ((panels + pb - 1) / pb) < 4L * threads) {
    pb = (pb + 1) / 2;
  }
  const int col_blocks = (panels + pb - 1) / pb;

  auto task = [&](int64_t t) {
    const int rb = static_cast<int>(t / col_blocks);
    const int cb = static_cast<int>(t % col_blocks);
    const int i_begin = rb * kRowBlock;
    const int i_end = std::min(n, i_begin + kRowBlock);
    const int p_end = std::min(panels, (cb + 1) * pb);
    alignas(64) float tile[kMr * kGemmPanel];
    for (int p = cb * pb; p < p_end; ++p) {
      const float* panel = w.panel(p);
      const int j0 = p * kGemmPanel;
      const int cols = std::min(kGemmPanel, w.rows() - j0);
      for (int i0 = i_begin; i0 < i_end; i0 += kMr) {
        const int mr = std::min(kMr, i_end - i0);
        kernels[mr](x + static_cast<long>(i0) * ldx, ldx, panel, k_size, tile);
        for (int r = 0; r < mr; ++r) {
          float* yr = y + static_cast<long>(i0 + r) * ldy + j0;
          const float* tr = tile + r * kGemmPanel;
          // Branch-free inner loops for each (bias, accumulate) case; same arithmetic order.
          if (bias == nullptr && !accumulate) {
            std::memcpy(yr, tr, cols * sizeof(float));
          } else if (bias == nullptr) {
            for (int j = 0; j < cols; ++j) yr[j] += tr[j];
          } else if (!accumulate) {
            for (int j = 0; j < cols; ++j) yr[j] = tr[j] + bias[j0 + j];
          } else {
            for (int j = 0; j < cols; ++j) yr[j] += tr[j] + bias[j0 + j];
          }
        }
      }
    }
  };
  const int64_t tasks = static_cast<int64_t>(row_blocks) * col_blocks;
  if (pool == nullptr || tasks == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    pool->ParallelFor(tasks, task);
  }
}

}  // namespace kvrecall::worker::internal
