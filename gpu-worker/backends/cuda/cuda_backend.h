// The cuda model backend: bf16 weights on one GPU, cuBLAS GEMMs (bf16 inputs, fp32 accumulate)
// and the kernels of kernels.h. Reached through CreateBackend("cuda", ...); registered by
// cuda_backend.cc when the build has CUDA (this target is an OBJECT library, see registry.h).
//
// Data path. ModelBackend's buffers are host fp32, so every call copies its inputs through pinned
// staging buffers to the device, runs the layer math of cuda_model.h (the weights and GEMMs it
// shares with the GPU-resident engine) on the model's stream and copies the outputs back before
// returning: the host Engine's reference path, not the fast one. The fast path is
// gpu-worker/engine/cuda_engine.h (activations, KV cache and attention on the device).
//
// Numerics, per layer, against the cpu backend (fp32 throughout):
//   - the residual stream x stays fp32 (on the device between the calls' GEMMs: o_proj and
//     down_proj accumulate into it with beta = 1);
//   - RMSNorm reads fp32 x and writes bf16; q/k/v, gate/up and the SwiGLU product are rounded to
//     bf16 (as a bf16 Hugging Face model does); Qwen2 biases are added in fp32 before rounding;
//     RoPE is the kernels.h kernel (fp32 math, bf16 result);
//   - the attention input handed to FinishLayer is rounded to bf16 before o_proj;
//   - logits come out of the lm_head GEMM in fp32.
// So q/k/v and activations carry bf16 rounding (relative ~2^-9 per element) where the cpu
// backend has none; tests compare within bf16 tolerances, never bit for bit. Results may
// depend on how rows are batched (cuBLAS picks kernels by shape).
//
// Errors: FAILED_PRECONDITION when no usable CUDA device or driver is present, UNAVAILABLE when
// the device exists but is busy or unavailable, RESOURCE_EXHAUSTED when device or pinned
// memory runs out (loading or later), INVALID_ARGUMENT / NOT_FOUND / DATA_LOSS for checkpoints as
// the cpu backend. A CUDA error during a call gives INTERNAL and leaves the backend unusable.
//
// Thread safety: as ModelBackend (one engine thread at a time); the instance owns its stream,
// cuBLAS handle and buffers on the device that was current when it was created.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gpu-worker/backends/backend.h"

namespace kvrecall::worker {

// Loads `model_dir` (config.json + safetensors) onto the current CUDA device. `num_threads` is
// unused (the host side only stages copies).
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateCudaBackend(const std::string& model_dir,
                                                                int num_threads);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_
