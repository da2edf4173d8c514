// The GPU-resident decode engine: the decode step of worker::Engine (engine.h) with the
// activations, the KV cache and attention on one GPU. Same semantics and EngineOptions (dense
// mode; or layers [0, dense_layers) dense and the rest sinks + window + the `budget` rows the tier
// recalls per (sequence, kv-head) each step, delta streaming and slot epochs, lookahead), bf16
// throughout where the host engine stores fp32 (see cuda_model.h for the numerics).
//
// Per step, on the model's stream: token ids go up; embedding, then per layer RMSNorm, the fused
// q|k|v GEMM, RoPE, KV append (KvAppend), attention (DecodeAttention over the whole cache of a
// dense layer; SparseAttention over sinks + window + the slot cache of a sparse layer), o_proj and
// the MLP; the logits and their argmax; the sampled ids (and the logits, on request) come down.
// A sparse layer adds the tier round trip: the layer's q ([batch][num_heads][head_dim] bf16)
// comes down to pinned memory, client::Tier::Retrieve (any Tier: LocalTier, RemoteTier) selects
// the rows, and StageRecall, on the thread that called Retrieve, enqueues on a second stream
// SlotScatter, which reads the rows not yet resident (Recalled::rows, in the order of
// fill_slots) straight from the tier's recall buffer - page-locked through PinnedHostRanges, so
// rows cross host memory once, as the tier put them - into the slot cache, and the upload of
// the selection's slot -> token map; the layer's attention waits for that. With lookahead, every
// sparse layer's Retrieve is issued at the start of the step from the previous step's queries on a
// thread of its own, so the tier works while the GPU computes. In sparse mode each step also
// appends the new tokens' K/V of every layer to the tier (they come down once per step).
//
// Device memory (allocated by Create, sized by CudaEngineLimits):
//   dense layers: K, V [max_batch][max_context][num_kv_heads][head_dim] bf16 (contiguous);
//   sparse layers: sinks + window K, V [max_batch][sink_tokens + window_tokens][kv_heads][d]
//     addressed through a page table of page size 1 (position p lives in row p < S ? p :
//     S + (p - S) % W, the window a ring); slot caches K, V [max_batch * kv_heads][budget][d]
//     and their slot -> token maps [max_batch * kv_heads][budget] int32 (-1: not selected).
// Out of device memory is RESOURCE_EXHAUSTED from Create.
//
// Batching: sequence i occupies batch row i of every device buffer. Step decodes every resident
// sequence at once (ids in any order); sequences join (AddSequence) and leave (RemoveSequence,
// which moves the last row into the freed one) between steps.
//
// Prompts come in three ways: PrefillSequence runs the prompt through the model on the device
// (chunked causal prefill, PrefillAttention); AddSequence uploads a PromptKV from the host
// Engine::Prefill; AddSyntheticSequence fills a prompt's KV with deterministic random rows (for
// benchmarks that need no real prompt).
//
// Prefill order and memory. PrefillSequence is layer-major: every chunk of the prompt goes
// through layer l before any goes through layer l + 1. A dense layer's K/V rows go straight into
// the sequence's row of the dense cache, which PrefillAttention reads; a sparse layer keeps only
// sinks + window on the device, yet its prefill attends to the whole prompt, so its K/V rows go
// into a scratch of the whole prompt, whose sinks and window are copied into the sinks + window
// cache once the layer is done. Layer-major needs the residual stream of the whole prompt and one
// sparse layer's scratch; chunk-major (every layer for one chunk) would need the scratch of
// every sparse layer at once - as much as a dense sequence of the prompt's length keeps for
// good, where the sparse mode exists to save device memory. Chosen for that. Per call, for T
// prompt tokens in chunks of C (in brackets: Llama-3-8B, T = 96K, C = 2048, 30 sparse layers):
//   device: x [T][hidden] fp32 (1.61 GB); tokens and positions [2][T] int32; q|k|v
//     [C][q_dim + 2 kv_dim] bf16 and the attention output [C][q_dim] bf16 (42 MB); the logits
//     [vocab] fp32 when asked for; sparse mode adds the scratch, double-buffered so that one
//     layer's rows download while the next layer computes: [2][K|V][T][kv_heads][head_dim]
//     bf16 (0.81 GB); ctkvr with gpu_ctkvr_lists adds the lists' scores (CtkvrLists'
//     workspace, [kv_heads][centroids][T] fp32 and partial sums: 25 MB) and one layer's lists.
//     About 2.5 GB in all (PrefillDeviceBytes), against 12.1 GB of scratch
//     ([30][K|V][T][kv_heads][head_dim]) chunk-major. The model's scratch for C rows (CudaModel
//     max_rows; 0.24 GB) is the model's.
//   host, sparse mode only: every layer's K/V of the prompt, [layers][K|V][T][kv_heads]
//     [head_dim] bf16 (12.9 GB), downloaded layer by layer and pushed to the tier once the last
//     layer is done (an AppendBatch carries every layer of its tokens); the host path's fp32
//     PromptKV is twice that. And the sampled ctkvr queries, pinned, [sparse layers]
//     [IndexQueryPositions][q_dim] bf16 (with GPU-made lists only the centroids' positions),
//     and with GPU-made lists every sparse layer's lists (pinned, [sparse layers][kv_heads]
//     [centroids][list_size] int32: 15 MB).
//
// Thread safety: one thread drives an engine (lookahead starts a helper thread inside Step),
// with the model's device current (CudaModel::device(); the helpers set it themselves). The
// model and the tier must outlive the engine; the engine uses the model's stream. A model that
// is a tensor-parallel shard makes the engine one rank of a group (tp_engine.h): it then holds
// and retrieves only its rank's heads, and every rank's engine must make the same calls.
#ifndef KVRECALL_GPU_WORKER_ENGINE_CUDA_ENGINE_H_
#define KVRECALL_GPU_WORKER_ENGINE_CUDA_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/tier.h"
#include "common/model_spec.h"
#include "common/thread_pool.h"
#include "gpu-worker/backends/cuda/cuda_model.h"
#include "gpu-worker/engine/engine.h"

namespace kvrecall::worker {

struct CudaEngineLimits {
  int max_batch = 8;       // sequences resident at once
  int max_context = 8192;  // tokens per sequence, prompt and decoded together
};

// Where a step's time went (wall seconds, summed over steps).
struct CudaEngineTimes {
  double step = 0;      // whole Step calls
  double gpu = 0;       // GPU busy segments of the steps (CUDA events between host waits)
  double retrieve = 0;  // the engine thread inside Tier::Retrieve or waiting for lookahead's
  double upload = 0;    // StageRecall (planning and enqueuing the scatter, on the call threads)
  double append = 0;    // Tier::AppendKV of the new tokens
  double prefill = 0;   // whole PrefillSequence calls (the tier push included)
};

// Per-call options of CudaEngine::PrefillSequence.
struct CudaPrefillOptions {
  // Prompt tokens per forward pass; 0 = EngineOptions::prefill_chunk. Capped at the model's
  // max_rows (CudaModel sizes its scratch by it): a model loaded with max_rows = max_batch
  // prefills in chunks of max_batch tokens, so load it with max(max_batch, chunk) rows for
  // larger chunks (PrefillAttention was measured at 512-8192; gpu-worker/backends/cuda/NOTES.md).
  int chunk_tokens = 0;
};

class CudaEngine {
 public:
  // `tier` may be null only when !options.sparse. spec: the model's KV spec as registered with
  // the tier (kv_dtype must be bf16). `pinned` (not owned; outlives the engine): in sparse mode,
  // the ranges the tier's recall buffer was pinned into (TierOptions::pin_region calling
  // pinned->Pin); a step whose recalled rows lie outside them fails with FAILED_PRECONDITION.
  // INVALID_ARGUMENT for bad options or limits, RESOURCE_EXHAUSTED when the caches do not fit
  // the device.
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(
      cuda::CudaModel* model, client::Tier* tier, ModelSpec spec, const EngineOptions& options,
      const CudaEngineLimits& limits, const cuda::PinnedHostRanges* pinned = nullptr);
  // Device bytes Create allocates per batch row (caches, slot caches and maps, the page table's
  // row, activations); the attention workspace and the model's
  // own scratch come on top.
  static int64_t DeviceBytesPerSequence(const LlamaConfig& config, const EngineOptions& options,
                                        int max_context);

  // Uploads a prefilled prompt (Engine::Prefill) and, in sparse mode, pushes it to the tier as
  // Engine::AddSequence does. ALREADY_EXISTS for an id in use, RESOURCE_EXHAUSTED when
  // max_batch sequences are resident, INVALID_ARGUMENT when the prompt does not fit max_context.
  absl::Status AddSequence(const std::string& id, const PromptKV& prompt);

  // Runs the prompt `tokens` through the model on the device, in chunks of
  // PrefillChunk(options) tokens (layer-major, header comment), and starts sequence `id` from
  // it; returns once done (the model's stream idle). On OK:
  //   - the sequence is resident and ready for Step exactly as after AddSequence(id,
  //     Engine::Prefill(tokens)): same length and positions, the same cache contents (dense
  //     layers: every prompt row; sparse layers: sinks and window; fresh slot caches and epochs)
  //     up to the GPU's bf16 arithmetic;
  //   - in sparse mode the tier holds the prompt as internal::PushPromptToTier leaves it (every
  //     layer's K/V; for ctkvr / cluster the index, ctkvr's built from the queries of the
  //     positions internal::IndexQueryPositions names, bf16 from the device, as fp32; with
  //     gpu_ctkvr_lists the tier gets ctkvr_centroids of them and their lists, made here by
  //     cuda::CtkvrLists from each sparse layer's keys while they are on the device);
  //   - *last_logits (when not null) holds the last prompt token's logits, [vocab] fp32.
  // Errors: INVALID_ARGUMENT for an empty prompt, a token outside [0, vocab), a prompt of
  // max_context tokens or more (internal::ValidatePrefillPrompt) or a negative chunk_tokens;
  // ALREADY_EXISTS for an id in use; RESOURCE_EXHAUSTED when max_batch sequences are resident or
  // the per-call buffers do not fit the device (PrefillDeviceBytes) or the host; the tier's
  // errors, as AddSequence; INTERNAL for a CUDA error. On error the sequence is not resident
  // and *last_logits is unspecified; a tier error may leave the sequence open on the tier, as
  // AddSequence does.
  absl::Status PrefillSequence(const std::string& id, absl::Span<const int32_t> tokens,
                               const CudaPrefillOptions& options = {},
                               std::vector<float>* last_logits = nullptr);
  // Device bytes PrefillSequence allocates (at most) for a prompt of num_tokens tokens in
  // chunks of chunk_tokens: the header comment's list. The model's own scratch for
  // chunk_tokens rows (CudaModel sizes it by max_rows at load) is not included.
  static int64_t PrefillDeviceBytes(const LlamaConfig& config, const EngineOptions& options,
                                    int64_t num_tokens, int chunk_tokens);
  // The prefill chunk PrefillSequence uses with `options`: options.chunk_tokens, or
  // EngineOptions::prefill_chunk when 0, at most the model's max_rows.
  int PrefillChunk(const CudaPrefillOptions& options) const;

  // A synthetic prompt of num_tokens tokens: every layer's K/V row of token t, kv-head h is
  // SyntheticKv(seed, layer, t, h), written on the device (dense layers whole, sparse layers
  // their sinks and window). Nothing goes to the tier: the caller pushes the same rows
  // (SyntheticKvSource) when the engine is sparse. Errors as AddSequence.
  absl::Status AddSyntheticSequence(const std::string& id, int64_t num_tokens, uint64_t seed);

  // One decode step of every resident sequence: appends tokens[i] to ids[i]; next[i] = the
  // argmax of its logits; logits (if not null) [batch][vocab] fp32 in the order of ids.
  // INVALID_ARGUMENT unless ids are exactly the resident sequences; FAILED_PRECONDITION when one
  // has reached max_context.
  absl::Status Step(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens,
                    std::vector<int32_t>* next, std::vector<float>* logits = nullptr);

  // The argument checks of PrefillSequence and Step: the errors they answer before touching
  // the device or the tier (OK: the call would run). CheckStep's *order (when not null) gets
  // the batch row of each id.
  absl::Status CheckPrefill(const std::string& id, absl::Span<const int32_t> tokens,
                            const CudaPrefillOptions& options = {}) const;
  absl::Status CheckStep(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens,
                         std::vector<int>* order = nullptr) const;

  // Forgets a sequence (and drops it on the tier in sparse mode).
  absl::Status RemoveSequence(const std::string& id);

  ~CudaEngine();
  const EngineOptions& options() const { return options_; }
  const EngineCounters& counters() const { return counters_; }
  const CudaEngineTimes& times() const { return times_; }
  int batch() const { return static_cast<int>(rows_.size()); }
  bool Contains(const std::string& id) const { return FindRow(id) >= 0; }

 private:
  struct Seq;
  struct Device;
  struct LayerRecall;
  CudaEngine(cuda::CudaModel* model, client::Tier* tier, ModelSpec spec,
             const EngineOptions& options, const CudaEngineLimits& limits,
             const cuda::PinnedHostRanges* pinned);
  bool IsSparse(int layer) const { return options_.sparse && layer >= options_.dense_layers; }
  absl::Status Allocate();
  int FindRow(const std::string& id) const;  // -1 when not resident
  // NewRow's checks: a free row, an unused id, a prompt that fits.
  absl::Status CheckNewRow(const std::string& id, int64_t num_tokens) const;
  // Appends a batch row for a new sequence (slot maps reset, fresh epochs).
  // REQUIRES: CheckNewRow(id, num_tokens) is OK.
  absl::Status NewRow(const std::string& id, int64_t num_tokens);
  // Tier::Retrieve of sparse layer l for the batch from queries [batch][num_heads][head_dim]
  // bf16, widened to fp32 where the tier reads them (Tier::QueryStaging) or else into *scratch;
  // on OK *out holds the selections (their rows valid until the next call in the area).
  // `lookahead`: the queries are the previous step's (RetrieveSuccessors).
  absl::Status Retrieve(int l, absl::Span<const int32_t> pos, const uint16_t* queries_bf16,
                        int staging_area, bool lookahead, std::vector<float>* scratch,
                        LayerRecall* out);
  // Enqueues a successful retrieval of sparse layer l on the recall stream: SlotScatter of its
  // new rows from the tier's recall buffer, the layer's slot map up, then applied[l]. Runs on
  // the thread that called Retrieve; FAILED_PRECONDITION when the rows are not in pinned_.
  absl::Status StageRecall(int l, LayerRecall& r);
  absl::Status BeginGpuSegment();
  absl::Status EndGpuSegment();

  cuda::CudaModel* const model_;
  client::Tier* const tier_;
  const cuda::PinnedHostRanges* const pinned_;  // the tier's recall buffer, page-locked
  const ModelSpec spec_;
  const EngineOptions options_;
  const CudaEngineLimits limits_;
  const LlamaConfig config_;
  ThreadPool pool_;  // prompt work (SyntheticKvSource, the prompt's K/V push)
  std::unique_ptr<Device> dev_;
  std::vector<std::unique_ptr<Seq>> rows_;  // batch row i = rows_[i]
  EngineCounters counters_;
  CudaEngineTimes times_;
};

namespace internal {
// PrefillSequence's argument check: INVALID_ARGUMENT for an empty prompt, a token outside
// [0, vocab_size) or more than max_context - 1 tokens (one position must stay free to decode).
absl::Status ValidatePrefillPrompt(absl::Span<const int32_t> tokens, int vocab_size,
                                   int max_context);
}  // namespace internal

// Sets options' recall-buffer hooks (pin_region, unpin_region) to page-lock the buffer through
// `pinned` (not owned; outlives the tier and the engine), as CudaEngine::Create's `pinned` needs.
void PinRecallBuffer(cuda::PinnedHostRanges* pinned, client::TierOptions* options);

// The synthetic K/V of AddSyntheticSequence: K (is_v false) or V of layer `layer`, tokens
// [t0, t0 + n), kv-head h, as bf16 bits at out[i * head_dim + j] ([n][head_dim]).
void SyntheticKv(uint64_t seed, int layer, bool is_v, int num_kv_heads, int head_dim, int64_t t0,
                 int64_t n, int h, uint16_t* out);
// The same rows as an internal::PromptKvSource for the tier (AppendBatch layout), generated on
// `pool` (not owned; must outlive the source).
internal::PromptKvSource SyntheticKvSource(uint64_t seed, const ModelSpec& spec, ThreadPool* pool);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_CUDA_ENGINE_H_
