// CPU reference attention, shared by the dense and sparse paths of the engine so that with the
// same rows in the same order both give bit-identical results.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_ATTENTION_H_
#define KVRECALL_GPU_WORKER_BACKENDS_ATTENTION_H_

namespace kvrecall::worker {

// Softmax attention of `num_q` query heads (one kv-head's group) over `m` K/V rows.
//   q:      [num_q][head_dim]   fp32
//   keys:   row i at keys + i * key_stride,   head_dim fp32 values
//   values: row i at values + i * value_stride, head_dim fp32 values
//   out:    [num_q][head_dim]   fp32
// scale is usually 1/sqrt(head_dim). Accumulates in row order with a numerically stable
// two-pass softmax. REQUIRES: m >= 1.
void AttendRows(const float* q, int num_q, int head_dim, const float* keys, long key_stride,
                const float* values, long value_stride, int m, float scale, float* out);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_BACKENDS_ATTENTION_H_
