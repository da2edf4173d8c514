// CPU references of the kernels in kernels.h, on the same bf16 inputs in host memory. The
// attention references gather the rows a kernel must attend to, convert them to fp32 and call
// AttendRows (attention.h, the CPU backend's attention); RoPE uses rope.h. Outputs are fp32
// where the kernel's is bf16 and rounding would hide differences (attention), otherwise in the
// kernel's own dtype with the kernel's rounding (bf16 round-to-nearest-even).
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_CPU_REFERENCE_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_CPU_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "gpu-worker/backends/cuda/kernel_params.h"

namespace kvrecall::worker::cuda {

// The rows (positions, and slot indices for sparse) a (sequence, kv-head) attends to, in the
// order the references use: sinks, window, then slots in slot order.
struct AttendedRow {
  bool from_slot = false;
  int index = 0;  // position in the dense cache, or slot index
};
std::vector<AttendedRow> SparseRowsReference(const SparseAttentionParams& p, int b, int kv_head);

// Every pointer in `p` is a host pointer; p.out and p.num_splits are ignored.
// out: [batch][num_q_heads][head_dim] fp32.
void DecodeAttentionReference(const DecodeAttentionParams& p, float* out);
void SparseAttentionReference(const SparseAttentionParams& p, float* out);
// Every pointer in `p` is a host pointer; p.out, p.out_token_stride and p.block_rows are
// ignored. out: [num_tokens][num_q_heads][head_dim] fp32. abs_out (if not null, same shape):
// the same attention over |V|, i.e. sum_j p_j |v_j| / sum_j p_j, the scale of the error that
// rounding the probabilities p_j to bf16 (as the kernel does for P.V) can cause.
void PrefillAttentionReference(const PrefillAttentionParams& p, float* out,
                               float* abs_out = nullptr);
// Host pointers; *num_rejected (if set) is incremented as the kernel's.
void SlotScatterReference(const SlotScatterParams& p);

// Host pointers.
void KvAppendReference(const KvAppendParams& p);
// The same values as FillRandomBf16, on the host.
void FillRandomBf16Reference(uint16_t* out, int64_t n, uint64_t seed, int64_t first, float scale);

void RmsNormReference(const uint16_t* x, const uint16_t* weight, int rows, int dim, float eps,
                      uint16_t* out);
void RopeReference(uint16_t* x, int tokens, int num_heads, int head_dim, int64_t token_stride,
                   const int32_t* positions, const double* inv_freq);
void SwiGluReference(const uint16_t* gate, const uint16_t* up, int rows, int dim, int64_t in_stride,
                     uint16_t* out);
void EmbeddingGatherReference(const uint16_t* table, int vocab, int dim, const int32_t* ids, int n,
                              uint16_t* out);
void ArgmaxReference(const float* logits, int rows, int vocab, int32_t* out);

// CtkvrLists on host pointers: logits and lse in double (lse written to p.lse as fp32), the same
// list rule (ties: the lower position; -0 == +0). scores (if not null) is resized to
// [num_kv_heads][num_centroids][end - begin] and holds score[h][c][t - begin], so that a test
// can tell near ties from errors.
void CtkvrListsReference(const CtkvrListsParams& p, std::vector<double>* scores = nullptr);

// SampleTopP in double precision. ambiguous[r] (if not null) is set where the choice sits within
// `margin` (relative to the row's mass) of a decision boundary, i.e. where fp32 rounding on the
// GPU may legitimately pick a neighbour (the nucleus edge or the sampled interval's ends).
void SampleTopPReference(const float* logits, int rows, int vocab, const float* temperature,
                         const float* top_p, const float* uniform, int32_t* out,
                         bool* ambiguous = nullptr, double margin = 5e-6);

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_CPU_REFERENCE_H_
