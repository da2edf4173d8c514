// The CPU backend's matrix multiply: y = x . W^T for weights stored [out][in] (Hugging Face
// nn.Linear layout), with W packed once at load time.
//
// Determinism: every y[i][j] is a single multiply-add chain over k = 0 .. in-1 in order (an FMA
// chain on the AVX2 path, separate multiply and add on the portable one), then + bias[j], then +
// the old y[i][j] when accumulating. So a row's result is bitwise independent of the batch size,
// of its position in the batch, of the tiling and of the thread count; the AVX2 and portable
// paths differ in the last bits.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CPU_INTERNAL_GEMM_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CPU_INTERNAL_GEMM_H_

#include <cstddef>
#include <vector>

#include "common/thread_pool.h"

namespace kvrecall::worker::internal {

enum class CpuIsa { kPortable, kAvx2Fma };

// The best ISA this CPU supports (runtime check via __builtin_cpu_supports). The environment
// variable KVRECALL_CPU_ISA=portable forces the portable path.
CpuIsa DetectCpuIsa();
const char* CpuIsaName(CpuIsa isa);

// Outputs per packed panel (two 8-wide AVX2 registers).
inline constexpr int kGemmPanel = 16;

// A weight matrix w: [rows][cols] (rows = outputs, cols = inputs) repacked as panels of 16
// outputs: data: [ceil(rows / 16)][cols][16] fp32, zero-padded past `rows`, so that the inner
// loop reads 16 consecutive outputs' weights for one input.
class PackedWeight {
 public:
  PackedWeight() = default;
  // w: [rows][cols] fp32, row-major.
  PackedWeight(const float* w, int rows, int cols);

  int rows() const { return rows_; }
  int cols() const { return cols_; }
  int num_panels() const { return (rows_ + kGemmPanel - 1) / kGemmPanel; }
  // panel p: [cols][16] fp32.
  const float* panel(int p) const {
    return data_.data() + static_cast<size_t>(p) * cols_ * kGemmPanel;
  }

 private:
  int rows_ = 0;
  int cols_ = 0;
  std::vector<float> data_;
};

// For i < n, j < w.rows():
//   y[i * ldy + j] = (accumulate ? y[i * ldy + j] : 0) + (sum_k x[i * ldx + k] * W[j][k] + b[j])
// x: [n][ldx] fp32 (the first w.cols() columns are read); y: [n][ldy] fp32 (the first w.rows()
// columns are written); bias: [w.rows()] fp32 or nullptr (b = 0). `pool` may be nullptr (runs on
// the calling thread). REQUIRES: x and y do not overlap.
void Gemm(ThreadPool* pool, CpuIsa isa, const float* x, int n, long ldx, const PackedWeight& w,
          const float* bias, bool accumulate, float* y, long ldy);

}  // namespace kvrecall::worker::internal

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CPU_INTERNAL_GEMM_H_
