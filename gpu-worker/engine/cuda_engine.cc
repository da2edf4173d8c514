#include "gpu-worker/engine/cuda_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/cuda/cpu_reference.h"
#include "gpu-worker/backends/cuda/cuda_status.h"
#include "gpu-worker/backends/cuda/kernels.h"
#include "indexer/index.h"

namespace kvrecall::worker {
namespace {

using cuda::CudaStatus;
using cuda::DeviceMem;
using cuda::PinnedMem;

// Slot epochs name slot caches to the tier. One counter for every CudaEngine of the process, so
// that a new engine over sequences an earlier one left on the tier never reuses an epoch; it
// starts far above the host Engine's counter (which starts at 1) for the same reason.
std::atomic<uint64_t> next_epoch{uint64_t{1} << 40};

// The ctkvr lists a prefill of T tokens makes on the GPU (EngineOptions::gpu_ctkvr_lists), for
// PrefillSequence and PrefillDeviceBytes alike: the centroids' positions (the tier's pick among
// the sampled query positions), one layer's CtkvrLists shape (every field but the pointers) and
// its buffers' sizes.
struct ListPlan {
  std::vector<int32_t> positions;  // ascending
  cuda::CtkvrListsParams shape;
  size_t workspace_bytes = 0;
  size_t tokens = 0;  // per layer: [kv_heads][centroids][list_len] int32
  size_t lse = 0;     // per layer: [kv_heads][centroids][group] fp32
  // Device bytes: the workspace, the centroid queries and one layer's lists.
  size_t device_bytes() const {
    return workspace_bytes + positions.size() * shape.num_q_heads * shape.head_dim * 2 +
           (tokens + lse) * 4;
  }
};
absl::StatusOr<ListPlan> PlanLists(const LlamaConfig& c, const EngineOptions& o, int64_t T) {
  ListPlan plan;
  const std::vector<int32_t> sampled = internal::IndexQueryPositions(o, T);
  for (int i : indexer::CtkvrCentroidQueries(static_cast<int>(sampled.size()), o.ctkvr_centroids)) {
    plan.positions.push_back(sampled[i]);
  }
  cuda::CtkvrListsParams& p = plan.shape;
  p.token_stride = int64_t{c.num_kv_heads} * c.head_dim;
  p.head_stride = c.head_dim;
  p.begin = std::min<int64_t>(o.sink_tokens, T - 1);
  p.end = T;
  p.query_stride = int64_t{c.num_heads} * c.head_dim;
  p.num_centroids = static_cast<int>(plan.positions.size());
  p.num_q_heads = c.num_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  p.list_size = o.ctkvr_list_size;
  ASSIGN_OR_RETURN(plan.workspace_bytes, cuda::CtkvrListsWorkspaceBytes(p));
  const size_t lists = static_cast<size_t>(c.num_kv_heads) * plan.positions.size();
  plan.tokens = lists * static_cast<size_t>(std::min<int64_t>(o.ctkvr_list_size, T - p.begin));
  plan.lse = lists * static_cast<size_t>(c.num_heads / c.num_kv_heads);
  return plan;
}

bool MakesListsOnGpu(const LlamaConfig& c, const EngineOptions& o) {
  return o.sparse && c.num_layers > o.dense_layers && o.method == client::Method::kCtkvr &&
         o.gpu_ctkvr_lists;
}

// Synthetic K/V values: uniform with standard deviation 1.
constexpr float kSyntheticScale = 1.7320508f;
uint64_t SyntheticStream(uint64_t seed, int layer, bool is_v) {
  return seed * 0x100000001B3ull + static_cast<uint64_t>(layer) * 2 + (is_v ? 1 : 0);
}

double Since(absl::Time t0) { return absl::ToDoubleSeconds(absl::Now() - t0); }

}  // namespace

namespace internal {

absl::Status ValidatePrefillPrompt(absl::Span<const int32_t> tokens, int vocab_size,
                                   int max_context) {
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token ", i, " (", tokens[i], ") is outside [0, ", vocab_size, ")"));
    }
  }
  if (static_cast<int64_t>(tokens.size()) >= max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a prompt of ", tokens.size(), " tokens does not fit max_context ", max_context));
  }
  return absl::OkStatus();
}

}  // namespace internal

void SyntheticKv(uint64_t seed, int layer, bool is_v, int num_kv_heads, int head_dim, int64_t t0,
                 int64_t n, int h, uint16_t* out) {
  const uint64_t stream = SyntheticStream(seed, layer, is_v);
  for (int64_t i = 0; i < n; ++i) {
    cuda::FillRandomBf16Reference(out + i * head_dim, head_dim, stream,
                                  ((t0 + i) * num_kv_heads + h) * head_dim, kSyntheticScale);
  }
}

internal::PromptKvSource SyntheticKvSource(uint64_t seed, const ModelSpec& spec, ThreadPool* pool) {
  return [seed, spec, pool](client::AppendBatch* b) {
    const int L = spec.num_layers, Hkv = spec.num_kv_heads, d = spec.head_dim;
    const size_t per_head = static_cast<size_t>(b->num_tokens) * spec.row_bytes();
    for (int l = 0; l < L; ++l) {
      b->keys[l].resize(per_head * Hkv);
      b->values[l].resize(per_head * Hkv);
    }
    pool->ParallelFor(int64_t{L} * 2 * Hkv, [&](int64_t i) {
      const int l = static_cast<int>(i / (2 * Hkv)), h = static_cast<int>(i % Hkv);
      const bool is_v = (i / Hkv) % 2 == 1;
      std::string& dst = is_v ? b->values[l] : b->keys[l];
      SyntheticKv(seed, l, is_v, Hkv, d, b->token_start, b->num_tokens, h,
                  reinterpret_cast<uint16_t*>(dst.data() + h * per_head));
    });
  };
}

struct CudaEngine::Seq {
  std::string id;
  int64_t len = 0;
  int64_t tier_len = 0;      // tokens the tier holds (len, or len + 1 after a step failed late)
  bool has_queries = false;  // Device::q_h holds this row's queries of the last step
  std::vector<std::vector<uint64_t>> epochs;  // [layer][kv_head]; empty for dense layers
};

// One sparse layer's Retrieve: who each entry is and what the tier answered.
struct CudaEngine::LayerRecall {
  absl::Status status;
  std::vector<std::pair<int, int>> entries;  // (batch row, kv-head) of recalled[e]
  std::vector<client::Recalled> recalled;
  bool called = false;      // Tier::Retrieve was called (not for a batch of no entries)
  double seconds = 0;       // inside it (counted by the engine thread)
  int64_t selected_rows = 0;  // rows the selections name (StageRecall)
  int64_t streamed_rows = 0;  // of them, the new rows scattered into slots
  double stage_seconds = 0;   // in StageRecall
  absl::Notification done;  // lookahead: set once status, recalled and seconds are final
};

struct CudaEngine::Device {
  // Activations, max_batch rows each.
  DeviceMem x;       // [rows][hidden] fp32
  DeviceMem qkv;     // [rows][q_dim + 2 kv_dim] bf16
  DeviceMem q;       // [rows][q_dim] bf16, packed (attention and retrieval)
  DeviceMem attn;    // [rows][q_dim] bf16
  DeviceMem logits;  // [rows][vocab] fp32
  DeviceMem io;      // [3][rows] int32: tokens, positions, lengths
  DeviceMem next;    // [rows] int32
  DeviceMem workspace;
  // Per layer: the dense cache, or a sparse layer's sinks + window (header comment).
  std::vector<DeviceMem> k, v;
  DeviceMem ring_table;  // [max_batch][max_context] int32: row of position p in sinks + window
  // Per sparse layer: slot caches and their slot -> token maps.
  std::vector<DeviceMem> slot_k, slot_v, slot_map;
  DeviceMem counts;  // [max_batch * kv_heads] int32, every entry = budget

  // Pinned host memory.
  PinnedMem io_h;      // [3][max_batch] int32
  PinnedMem next_h;    // [max_batch] int32
  PinnedMem logits_h;  // [max_batch][vocab] fp32, allocated on the first request
  PinnedMem q_h;       // [layer][max_batch][q_dim] bf16: each sparse layer's last queries
  PinnedMem newkv_h;   // [layer][max_batch][K kv_dim | V kv_dim] bf16: the step's new rows
  PinnedMem map_h;     // [sparse layer][max_batch * kv_heads][budget] int32
  // A sparse layer's SlotScatter plan, read by the kernel in place: fills_h [sparse layer]
  // [max_batch * kv_heads] cuda::SlotFill (whose rows point into the tier's recall region) and
  // fill_slots_h [sparse layer][max_batch * kv_heads * budget] int32.
  PinnedMem fills_h, fill_slots_h;
  // [sparse layer]: the row addresses of a tier that gives them (TierOptions::row_addresses),
  // [max_batch * kv_heads * budget][2] pointers, allocated by the layer's first such call
  // (StageRecall never runs for one layer on two threads at once).
  std::vector<PinnedMem> fill_addresses_h;
  // StageRecall's work (scatter, slot map up) runs here; applied[sparse layer] marks its end,
  // which the model's stream waits for before the layer's attention.
  cudaStream_t recall_stream = nullptr;
  std::vector<cudaEvent_t> applied;
  std::vector<cudaEvent_t> segments;  // GPU busy segments of a step: begin, end, ...
  int open_segments = 0;

  ~Device() {
    for (cudaEvent_t e : applied) cudaEventDestroy(e);
    for (cudaEvent_t e : segments) cudaEventDestroy(e);
    if (recall_stream != nullptr) cudaStreamDestroy(recall_stream);
  }
};

CudaEngine::CudaEngine(cuda::CudaModel* model, client::Tier* tier, ModelSpec spec,
                       const EngineOptions& options, const CudaEngineLimits& limits,
                       const cuda::PinnedHostRanges* pinned)
    : model_(model),
      tier_(tier),
      pinned_(pinned),
      spec_(std::move(spec)),
      options_(options),
      limits_(limits),
      config_(model->config()),
      pool_(options.num_threads),
      dev_(std::make_unique<Device>()) {}

CudaEngine::~CudaEngine() {
  if (model_ != nullptr) (void)cudaStreamSynchronize(model_->stream());
  if (dev_->recall_stream != nullptr) (void)cudaStreamSynchronize(dev_->recall_stream);
}

int64_t CudaEngine::DeviceBytesPerSequence(const LlamaConfig& c, const EngineOptions& o,
                                           int max_context) {
  const int64_t kvd = int64_t{c.num_kv_heads} * c.head_dim, qd = int64_t{c.num_heads} * c.head_dim;
  const int sparse_layers = o.sparse ? std::max(0, c.num_layers - o.dense_layers) : 0;
  const int dense_layers = c.num_layers - sparse_layers;
  int64_t b = dense_layers * 2 * int64_t{max_context} * kvd * 2;
  if (sparse_layers > 0) {
    const int64_t slots = int64_t{c.num_kv_heads} * o.budget;
    b += sparse_layers * (2 * int64_t{o.sink_tokens + o.window_tokens} * kvd * 2 +
                          2 * slots * c.head_dim * 2 + slots * 4);
    b += c.num_kv_heads * 4 + int64_t{max_context} * 4;
  }
  b += c.hidden_size * 4 + (qd + 2 * kvd) * 2 + 2 * qd * 2 + int64_t{c.vocab_size} * 4 + 4 * 4;
  return b;
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(cuda::CudaModel* model,
                                                               client::Tier* tier, ModelSpec spec,
                                                               const EngineOptions& options,
                                                               const CudaEngineLimits& limits,
                                                               const cuda::PinnedHostRanges* pinned) {
  const LlamaConfig& c = model->config();
  if (spec.num_layers != c.num_layers || spec.num_q_heads != c.num_heads ||
      spec.num_kv_heads != c.num_kv_heads || spec.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("model spec does not match the model's config");
  }
  if (spec.kv_dtype != DType::kBF16)
    return absl::InvalidArgumentError("the GPU engine stores bf16 K/V");
  if (limits.max_batch < 1 || limits.max_batch > model->max_rows() || limits.max_context < 2) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch ", limits.max_batch,
                                                   " must be in [1, ", model->max_rows(),
                                                   "] and max_context >= 2"));
  }
  if (options.sparse) {
    if (tier == nullptr) return absl::InvalidArgumentError("sparse mode needs a tier");
    if (options.window_tokens < 2 || options.sink_tokens < 0 || options.budget < 1 ||
        options.dense_layers < 0 || options.lookahead_calls < 1) {
      return absl::InvalidArgumentError(
          "need window_tokens >= 2, sink_tokens >= 0, budget >= 1, dense_layers >= 0, "
          "lookahead_calls >= 1");
    }
    if (options.gpu_ctkvr_lists && options.method == client::Method::kCtkvr &&
        (options.ctkvr_centroids < 1 || options.ctkvr_list_size < 1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GPU-made ctkvr lists need ctkvr_centroids >= 1 and ctkvr_list_size >= 1, not ",
          options.ctkvr_centroids, " and ", options.ctkvr_list_size));
    }
  }
  if (options.observer != nullptr)
    return absl::InvalidArgumentError("the GPU engine has no QkvObserver");
  if (options.prefill_chunk < 1) return absl::InvalidArgumentError("prefill_chunk must be >= 1");
  std::unique_ptr<CudaEngine> e(
      new CudaEngine(model, tier, std::move(spec), options, limits, pinned));
  RETURN_IF_ERROR(e->Allocate());
  return e;
}

absl::Status CudaEngine::Allocate() {
  Device& d = *dev_;
  const size_t B = limits_.max_batch, T = limits_.max_context, L = config_.num_layers;
  const size_t kvd = model_->kv_dim(), qd = model_->q_dim(), Hkv = config_.num_kv_heads,
               hd = config_.head_dim;
  const size_t S = options_.sink_tokens, W = options_.window_tokens, budget = options_.budget;
  const size_t sparse_layers = options_.sparse ? L - std::min<size_t>(L, options_.dense_layers) : 0;
  RETURN_IF_ERROR(d.x.Allocate(B * config_.hidden_size * 4, "x"));
  RETURN_IF_ERROR(d.qkv.Allocate(B * model_->qkv_width() * 2, "qkv"));
  RETURN_IF_ERROR(d.q.Allocate(B * qd * 2, "q"));
  RETURN_IF_ERROR(d.attn.Allocate(B * qd * 2, "attention output"));
  RETURN_IF_ERROR(d.logits.Allocate(B * config_.vocab_size * 4, "logits"));
  RETURN_IF_ERROR(d.io.Allocate(3 * B * 4, "step inputs"));
  RETURN_IF_ERROR(d.next.Allocate(B * 4, "sampled ids"));
  d.k.resize(L);
  d.v.resize(L);
  d.slot_k.resize(L);
  d.slot_v.resize(L);
  d.slot_map.resize(L);
  for (size_t l = 0; l < L; ++l) {
    const size_t rows = IsSparse(static_cast<int>(l)) ? S + W : T;
    const std::string what =
        absl::StrCat("layer ", l, IsSparse(static_cast<int>(l)) ? " sinks + window" : " KV cache");
    RETURN_IF_ERROR(d.k[l].Allocate(B * rows * kvd * 2, what));
    RETURN_IF_ERROR(d.v[l].Allocate(B * rows * kvd * 2, what));
    if (!IsSparse(static_cast<int>(l))) continue;
    RETURN_IF_ERROR(d.slot_k[l].Allocate(B * Hkv * budget * hd * 2, "slot cache"));
    RETURN_IF_ERROR(d.slot_v[l].Allocate(B * Hkv * budget * hd * 2, "slot cache"));
    RETURN_IF_ERROR(d.slot_map[l].Allocate(B * Hkv * budget * 4, "slot map"));
    RETURN_IF_ERROR(CudaStatus(
        cudaMemsetAsync(d.slot_map[l].as<void>(), 0xff, d.slot_map[l].bytes(), model_->stream()),
        "slot map reset"));
  }
  RETURN_IF_ERROR(d.io_h.Allocate(3 * B * 4, "step inputs"));
  RETURN_IF_ERROR(d.next_h.Allocate(B * 4, "sampled ids"));
  RETURN_IF_ERROR(d.q_h.Allocate(L * B * qd * 2, "queries"));
  RETURN_IF_ERROR(d.newkv_h.Allocate(L * B * 2 * kvd * 2, "new K/V rows"));
  if (sparse_layers > 0) {
    RETURN_IF_ERROR(d.ring_table.Allocate(B * T * 4, "sinks + window page table"));
    std::vector<int32_t> table(B * T);
    for (size_t b = 0; b < B; ++b) {
      for (size_t p = 0; p < T; ++p)
        table[b * T + p] = static_cast<int32_t>(b * (S + W) + (p < S ? p : S + (p - S) % W));
    }
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy(d.ring_table.as<void>(), table.data(), table.size() * 4, cudaMemcpyHostToDevice),
        "page table"));
    RETURN_IF_ERROR(d.counts.Allocate(B * Hkv * 4, "slot counts"));
    const std::vector<int32_t> counts(B * Hkv, static_cast<int32_t>(budget));
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy(d.counts.as<void>(), counts.data(), counts.size() * 4, cudaMemcpyHostToDevice),
        "slot counts"));
    RETURN_IF_ERROR(
        d.fills_h.Allocate(sparse_layers * B * Hkv * sizeof(cuda::SlotFill), "slot fills"));
    RETURN_IF_ERROR(
        d.fill_slots_h.Allocate(sparse_layers * B * Hkv * budget * 4, "recalled rows' slots"));
    d.fill_addresses_h = std::vector<PinnedMem>(sparse_layers);
    RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&d.recall_stream, cudaStreamNonBlocking),
                               "cudaStreamCreate"));
    d.applied.resize(sparse_layers);
    for (cudaEvent_t& e : d.applied) {
      RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                                 "cudaEventCreate"));
    }
    RETURN_IF_ERROR(d.map_h.Allocate(sparse_layers * B * Hkv * budget * 4, "slot maps"));
    std::fill_n(d.map_h.as<int32_t>(), sparse_layers * B * Hkv * budget, -1);
  }
  d.segments.resize(2 * (L + 2));
  for (cudaEvent_t& e : d.segments) {
    RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&e), "cudaEventCreate"));
  }
  return CudaStatus(cudaStreamSynchronize(model_->stream()), "engine allocation");
}

int CudaEngine::FindRow(const std::string& id) const {
  for (size_t i = 0; i < rows_.size(); ++i) {
    if (rows_[i]->id == id) return static_cast<int>(i);
  }
  return -1;
}

absl::Status CudaEngine::CheckNewRow(const std::string& id, int64_t num_tokens) const {
  if (FindRow(id) >= 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence '", id, "' is already running"));
  }
  if (static_cast<int>(rows_.size()) >= limits_.max_batch) {
    return absl::ResourceExhaustedError(
        absl::StrCat("all ", limits_.max_batch, " batch rows are in use"));
  }
  if (num_tokens < 1 || num_tokens >= limits_.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a prompt of ", num_tokens, " tokens does not fit max_context ", limits_.max_context));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::CheckPrefill(const std::string& id, absl::Span<const int32_t> tokens,
                                      const CudaPrefillOptions& options) const {
  RETURN_IF_ERROR(internal::ValidatePrefillPrompt(tokens, config_.vocab_size, limits_.max_context));
  if (options.chunk_tokens < 0) return absl::InvalidArgumentError("chunk_tokens must be >= 0");
  return CheckNewRow(id, static_cast<int64_t>(tokens.size()));
}

absl::Status CudaEngine::NewRow(const std::string& id, int64_t num_tokens) {
  auto s = std::make_unique<Seq>();
  s->id = id;
  s->len = num_tokens;
  s->tier_len = num_tokens;
  s->epochs.resize(config_.num_layers);
  const int row = static_cast<int>(rows_.size());
  const size_t Hkv = config_.num_kv_heads, budget = options_.budget;
  int sparse_index = 0;
  for (int l = 0; l < config_.num_layers; ++l) {
    if (!IsSparse(l)) continue;
    for (size_t h = 0; h < Hkv; ++h) s->epochs[l].push_back(next_epoch.fetch_add(1));
    const size_t first = static_cast<size_t>(row) * Hkv * budget;
    std::fill_n(
        dev_->map_h.as<int32_t>() + (sparse_index++ * limits_.max_batch * Hkv * budget) + first,
        Hkv * budget, -1);
    RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(dev_->slot_map[l].as<int32_t>() + first, 0xff,
                                               Hkv * budget * 4, model_->stream()),
                               "slot map reset"));
  }
  rows_.push_back(std::move(s));
  return absl::OkStatus();
}

absl::Status CudaEngine::AddSequence(const std::string& id, const PromptKV& prompt) {
  if (FindRow(id) >= 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence '", id, "' is already running"));
  }
  const int L = config_.num_layers;
  const int64_t T = static_cast<int64_t>(prompt.tokens.size());
  if (static_cast<int>(prompt.k.size()) != L || static_cast<int>(prompt.v.size()) != L) {
    return absl::InvalidArgumentError("prompt KV has the wrong number of layers");
  }
  const size_t kvd = model_->kv_dim();
  for (int l = 0; l < L; ++l) {
    if (prompt.k[l].size() != static_cast<size_t>(T) * kvd ||
        prompt.v[l].size() != prompt.k[l].size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt KV of layer ", l, " has the wrong size"));
    }
  }
  RETURN_IF_ERROR(CheckNewRow(id, T));
  RETURN_IF_ERROR(NewRow(id, T));
  const size_t row = rows_.size() - 1;
  absl::Cleanup undo = [&] { rows_.pop_back(); };
  if (options_.sparse) {
    std::vector<absl::Span<const float>> queries;
    for (int l = options_.dense_layers; l < L; ++l) queries.push_back(prompt.q[l]);
    RETURN_IF_ERROR(internal::PushPromptToTier(
        tier_, spec_, options_, id, prompt.tokens, internal::PromptKvSourceOf(spec_, prompt),
        {T, static_cast<int>(prompt.query_positions.size()), queries},
        &counters_.index_build_seconds));
  }
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  std::vector<uint16_t> host;
  for (int l = 0; l < L; ++l) {
    for (bool is_v : {false, true}) {
      const std::vector<float>& src = is_v ? prompt.v[l] : prompt.k[l];
      uint16_t* dst = (is_v ? dev_->v[l] : dev_->k[l]).as<uint16_t>();
      if (!IsSparse(l)) {
        host.resize(src.size());
        FromF32(DType::kBF16, src.data(), src.size(), host.data());
        dst += row * limits_.max_context * kvd;
      } else {
        host.assign(static_cast<size_t>(S + W) * kvd, 0);
        for (int64_t p = 0; p < T; ++p) {
          if (p >= S && p < T - W) continue;
          const int64_t r = p < S ? p : S + (p - S) % W;
          FromF32(DType::kBF16, src.data() + p * kvd, kvd, host.data() + r * kvd);
        }
        dst += row * (S + W) * kvd;
      }
      RETURN_IF_ERROR(
          CudaStatus(cudaMemcpy(dst, host.data(), host.size() * 2, cudaMemcpyHostToDevice),
                     "prompt KV upload"));
    }
  }
  std::move(undo).Cancel();
  return absl::OkStatus();
}

absl::Status CudaEngine::AddSyntheticSequence(const std::string& id, int64_t num_tokens,
                                              uint64_t seed) {
  RETURN_IF_ERROR(CheckNewRow(id, num_tokens));
  RETURN_IF_ERROR(NewRow(id, num_tokens));
  const size_t row = rows_.size() - 1;
  absl::Cleanup undo = [&] { rows_.pop_back(); };
  const int64_t kvd = model_->kv_dim(), T = num_tokens, S = options_.sink_tokens,
                W = options_.window_tokens;
  const cudaStream_t st = model_->stream();
  for (int l = 0; l < config_.num_layers; ++l) {
    for (bool is_v : {false, true}) {
      uint16_t* dst = (is_v ? dev_->v[l] : dev_->k[l]).as<uint16_t>();
      const uint64_t stream = SyntheticStream(seed, l, is_v);
      if (!IsSparse(l)) {
        RETURN_IF_ERROR(cuda::FillRandomBf16(dst + row * limits_.max_context * kvd, T * kvd, stream,
                                             0, kSyntheticScale, st));
        continue;
      }
      dst += row * (S + W) * kvd;
      const int64_t sinks = std::min(T, S);
      RETURN_IF_ERROR(cuda::FillRandomBf16(dst, sinks * kvd, stream, 0, kSyntheticScale, st));
      // The window's positions [max(S, T - W), T) in runs that do not wrap around the ring.
      for (int64_t p = std::max(S, T - W); p < T;) {
        const int64_t r = (p - S) % W;
        const int64_t run = std::min(T - p, W - r);
        RETURN_IF_ERROR(cuda::FillRandomBf16(dst + (S + r) * kvd, run * kvd, stream, p * kvd,
                                             kSyntheticScale, st));
        p += run;
      }
    }
  }
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(st), "synthetic KV"));
  std::move(undo).Cancel();
  return absl::OkStatus();
}

int64_t CudaEngine::PrefillDeviceBytes(const LlamaConfig& c, const EngineOptions& o,
                                       int64_t num_tokens, int chunk_tokens) {
  const int64_t kvd = int64_t{c.num_kv_heads} * c.head_dim, qd = int64_t{c.num_heads} * c.head_dim;
  const int64_t T = std::max<int64_t>(num_tokens, 1);
  const int64_t C = std::clamp<int64_t>(chunk_tokens, 1, T);
  const int sparse_layers = o.sparse ? std::max(0, c.num_layers - o.dense_layers) : 0;
  int64_t lists = 0;  // GPU-made ctkvr lists
  if (MakesListsOnGpu(c, o)) {
    const absl::StatusOr<ListPlan> plan = PlanLists(c, o, T);
    if (plan.ok()) lists = static_cast<int64_t>(plan->device_bytes());
  }
  return T * c.hidden_size * 4 + 2 * T * 4 + C * (qd + 2 * kvd) * 2 + C * qd * 2 +
         int64_t{c.vocab_size} * 4 + std::min(sparse_layers, 2) * 2 * T * kvd * 2 + lists;
}

int CudaEngine::PrefillChunk(const CudaPrefillOptions& o) const {
  const int want = o.chunk_tokens > 0 ? o.chunk_tokens : options_.prefill_chunk;
  return std::max(1, std::min(want, model_->max_rows()));
}

absl::Status CudaEngine::PrefillSequence(const std::string& id, absl::Span<const int32_t> tokens,
                                         const CudaPrefillOptions& prefill_options,
                                         std::vector<float>* last_logits) {
  const absl::Time t_start = absl::Now();
  RETURN_IF_ERROR(CheckPrefill(id, tokens, prefill_options));
  const int64_t T = static_cast<int64_t>(tokens.size());
  const bool gpu_lists = MakesListsOnGpu(config_, options_);
  ListPlan lists;  // of GPU-made ctkvr lists (see the buffers below)
  if (gpu_lists) {
    ASSIGN_OR_RETURN(lists, PlanLists(config_, options_, T));
  }
  RETURN_IF_ERROR(NewRow(id, T));
  const size_t row = rows_.size() - 1;
  absl::Cleanup undo = [&] { rows_.pop_back(); };

  Device& d = *dev_;
  const cudaStream_t st = model_->stream();
  const int L = config_.num_layers, hd = config_.head_dim, Hkv = config_.num_kv_heads;
  const int V = config_.vocab_size;
  const int64_t hidden = config_.hidden_size, C = PrefillChunk(prefill_options);
  const size_t qd = model_->q_dim(), kvd = model_->kv_dim(), width = model_->qkv_width();
  const size_t Tz = static_cast<size_t>(T);
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  const int sparse_layers = options_.sparse ? std::max(0, L - options_.dense_layers) : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Per-call buffers (the header comment lists them and their sizes).
  DeviceMem x, io, qkv, attn, logits, scratch_k[2], scratch_v[2];
  RETURN_IF_ERROR(x.Allocate(Tz * hidden * 4, "prefill residual stream"));
  RETURN_IF_ERROR(io.Allocate(2 * Tz * 4, "prefill tokens and positions"));
  RETURN_IF_ERROR(qkv.Allocate(C * width * 2, "prefill q|k|v"));
  RETURN_IF_ERROR(attn.Allocate(C * qd * 2, "prefill attention output"));
  if (last_logits != nullptr) RETURN_IF_ERROR(logits.Allocate(V * 4, "prefill logits"));
  for (int i = 0; i < std::min(sparse_layers, 2); ++i) {
    RETURN_IF_ERROR(scratch_k[i].Allocate(Tz * kvd * 2, "prefill K of a sparse layer"));
    RETURN_IF_ERROR(scratch_v[i].Allocate(Tz * kvd * 2, "prefill V of a sparse layer"));
  }
  // Sparse mode: every layer's K/V on the host for the tier ([layer][K|V][T][kv_dim] bf16) and
  // the sampled queries ([sparse layer][query][q_dim] bf16, pinned).
  std::unique_ptr<uint16_t[]> host_kv;
  PinnedMem q_h;
  std::vector<int32_t> qpos;  // positions whose queries the tier gets
  // ctkvr lists made here (EngineOptions::gpu_ctkvr_lists; ListPlan): the tier gets only the
  // centroids' queries (qpos = lists.positions). Per sparse layer the centroid queries (cq,
  // [centroid][q_dim] bf16) are scored against its keys into list_out (tokens | lse, ListPlan's
  // sizes), which goes down into lists_h [sparse layer][tokens | lse] (pinned).
  DeviceMem cq, list_ws, list_out;
  PinnedMem lists_h;
  std::vector<int32_t> inputs(2 * Tz);  // tokens | positions
  cudaStream_t copy = nullptr;          // downloads layer l - 1 while layer l computes
  cudaEvent_t layer_done[2] = {nullptr, nullptr};
  absl::Cleanup release = [&] {  // nothing may use the buffers above once they are freed
    (void)cudaStreamSynchronize(st);
    if (copy != nullptr) {
      (void)cudaStreamSynchronize(copy);
      (void)cudaStreamDestroy(copy);
    }
    for (cudaEvent_t e : layer_done) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
  };
  if (options_.sparse) {
    const size_t n = static_cast<size_t>(L) * 2 * Tz * kvd;
    host_kv.reset(new (std::nothrow) uint16_t[n]);
    if (host_kv == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("prefill: no ", n * 2, " bytes of host memory for the prompt's K/V"));
    }
    if (gpu_lists) {
      qpos = lists.positions;
      const size_t per_layer = (lists.tokens + lists.lse) * 4;
      RETURN_IF_ERROR(cq.Allocate(qpos.size() * qd * 2, "prefill ctkvr centroid queries"));
      RETURN_IF_ERROR(list_ws.Allocate(lists.workspace_bytes, "prefill ctkvr list workspace"));
      RETURN_IF_ERROR(list_out.Allocate(per_layer, "prefill ctkvr lists"));
      RETURN_IF_ERROR(lists_h.Allocate(sparse_layers * per_layer, "ctkvr lists"));
    } else {
      qpos = internal::IndexQueryPositions(options_, T);
    }
    if (sparse_layers > 0) {
      RETURN_IF_ERROR(q_h.Allocate(sparse_layers * qpos.size() * qd * 2, "prompt queries"));
    }
    RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking), "cudaStreamCreate"));
    for (cudaEvent_t& e : layer_done) {
      RETURN_IF_ERROR(
          CudaStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
    }
  }

  std::copy(tokens.begin(), tokens.end(), inputs.begin());
  std::iota(inputs.begin() + T, inputs.end(), 0);
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(io.as<void>(), inputs.data(), 2 * Tz * 4, cudaMemcpyHostToDevice, st),
      "prefill inputs upload"));
  const int32_t* d_tokens = io.as<int32_t>();
  const int32_t* d_pos = d_tokens + T;
  float* const xp = x.as<float>();
  for (int64_t c0 = 0; c0 < T; c0 += C) {
    const int n = static_cast<int>(std::min(C, T - c0));
    RETURN_IF_ERROR(model_->Embed(d_tokens + c0, n, xp + c0 * hidden));
  }

  // Layer l's K and V of the prompt, [T][kv_dim] each: the dense cache's row or a scratch.
  std::vector<const uint16_t*> k_of(L), v_of(L);
  // Layer l's K/V into host_kv once the model's stream has finished the layer (returns when
  // they are there).
  auto download = [&](int l) -> absl::Status {
    RETURN_IF_ERROR(
        CudaStatus(cudaStreamWaitEvent(copy, layer_done[l % 2], 0), "cudaStreamWaitEvent"));
    for (int is_v = 0; is_v < 2; ++is_v) {
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(host_kv.get() + (static_cast<size_t>(l) * 2 + is_v) * Tz * kvd,
                          is_v ? v_of[l] : k_of[l], Tz * kvd * 2, cudaMemcpyDeviceToHost, copy),
          "prompt K/V download"));
    }
    return CudaStatus(cudaStreamSynchronize(copy), "prompt K/V download");
  };
  for (int l = 0; l < L; ++l) {
    const bool sparse = IsSparse(l);
    const int s = l - options_.dense_layers;  // sparse layers: index among them
    uint16_t *k_dst, *v_dst;
    cuda::KvCacheView view;
    view.token_stride = static_cast<int64_t>(kvd);
    view.head_stride = hd;
    int seq = 0;
    if (!sparse) {  // straight into the sequence's row of the dense cache
      k_dst = d.k[l].as<uint16_t>() + row * limits_.max_context * kvd;
      v_dst = d.v[l].as<uint16_t>() + row * limits_.max_context * kvd;
      view.k = d.k[l].as<uint16_t>();
      view.v = d.v[l].as<uint16_t>();
      view.page_stride = static_cast<int64_t>(limits_.max_context) * kvd;
      seq = static_cast<int>(row);
    } else {
      k_dst = scratch_k[s % 2].as<uint16_t>();
      v_dst = scratch_v[s % 2].as<uint16_t>();
      view.k = k_dst;
      view.v = v_dst;
      view.page_stride = T * static_cast<int64_t>(kvd);
    }
    k_of[l] = k_dst;
    v_of[l] = v_dst;
    size_t next_q = 0;  // qpos[next_q]: the next sampled query position
    for (int64_t c0 = 0; c0 < T; c0 += C) {
      const int n = static_cast<int>(std::min(C, T - c0));
      float* xc = xp + c0 * hidden;
      const uint16_t* q = qkv.as<uint16_t>();
      RETURN_IF_ERROR(model_->Qkv(l, xc, n, d_pos + c0, qkv.as<uint16_t>()));
      for (int is_v = 0; is_v < 2; ++is_v) {
        RETURN_IF_ERROR(CudaStatus(
            cudaMemcpy2DAsync((is_v ? v_dst : k_dst) + c0 * kvd, kvd * 2, q + qd + is_v * kvd,
                              width * 2, kvd * 2, n, cudaMemcpyDeviceToDevice, st),
            "prompt K/V write"));
      }
      for (; sparse && next_q < qpos.size() && qpos[next_q] < c0 + n; ++next_q) {
        RETURN_IF_ERROR(CudaStatus(
            cudaMemcpyAsync(q_h.as<uint16_t>() + (s * qpos.size() + next_q) * qd,
                            q + (qpos[next_q] - c0) * width, qd * 2, cudaMemcpyDeviceToHost, st),
            "prompt query download"));
        if (gpu_lists) {
          RETURN_IF_ERROR(CudaStatus(
              cudaMemcpyAsync(cq.as<uint16_t>() + next_q * qd, q + (qpos[next_q] - c0) * width,
                              qd * 2, cudaMemcpyDeviceToDevice, st),
              "centroid query copy"));
        }
      }
      cuda::PrefillAttentionParams p;
      p.num_tokens = n;
      p.start = static_cast<int>(c0);
      p.num_q_heads = config_.num_heads;
      p.num_kv_heads = Hkv;
      p.head_dim = hd;
      p.q = q;
      p.q_token_stride = static_cast<int64_t>(width);
      p.cache = view;
      p.seq = seq;
      p.scale = scale;
      p.out = attn.as<uint16_t>();
      RETURN_IF_ERROR(cuda::PrefillAttention(p, st));
      RETURN_IF_ERROR(model_->FinishLayer(l, attn.as<uint16_t>(), n, xc));
    }
    if (sparse) {  // the sinks and the window into the sinks + window cache (header comment)
      auto rows_to_ring = [&](int64_t p0, int64_t r0, int64_t count) -> absl::Status {
        for (int is_v = 0; is_v < 2; ++is_v) {
          uint16_t* ring = (is_v ? d.v[l] : d.k[l]).as<uint16_t>() + row * (S + W) * kvd;
          RETURN_IF_ERROR(
              CudaStatus(cudaMemcpyAsync(ring + r0 * kvd, (is_v ? v_dst : k_dst) + p0 * kvd,
                                         count * kvd * 2, cudaMemcpyDeviceToDevice, st),
                         "sinks + window copy"));
        }
        return absl::OkStatus();
      };
      if (const int64_t sinks = std::min(T, S); sinks > 0) {
        RETURN_IF_ERROR(rows_to_ring(0, 0, sinks));
      }
      // The window's positions [max(S, T - W), T) in runs that do not wrap around the ring.
      for (int64_t p = std::max(S, T - W); p < T;) {
        const int64_t r = (p - S) % W;
        const int64_t run = std::min(T - p, W - r);
        RETURN_IF_ERROR(rows_to_ring(p, S + r, run));
        p += run;
      }
    }
    if (sparse && gpu_lists) {  // the layer's lists while its keys are here
      cuda::CtkvrListsParams p = lists.shape;
      p.keys = k_dst;
      p.queries = cq.as<uint16_t>();
      p.tokens = list_out.as<int32_t>();
      p.lse = list_out.as<float>() + lists.tokens;
      RETURN_IF_ERROR(cuda::CtkvrLists(p, list_ws.as<void>(), lists.workspace_bytes, st));
      RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(lists_h.as<int32_t>() + s * (lists.tokens + lists.lse),
                                     list_out.as<void>(), (lists.tokens + lists.lse) * 4,
                                     cudaMemcpyDeviceToHost, st),
                     "ctkvr lists download"));
    }
    if (options_.sparse) {
      // Downloading layer l - 1 now overlaps layer l's compute; the scratch layer l + 1 will
      // write (layer l - 1's, if sparse) is only enqueued after the download has returned.
      RETURN_IF_ERROR(CudaStatus(cudaEventRecord(layer_done[l % 2], st), "cudaEventRecord"));
      if (l > 0) RETURN_IF_ERROR(download(l - 1));
    }
  }
  if (options_.sparse) RETURN_IF_ERROR(download(L - 1));
  if (last_logits != nullptr) {
    RETURN_IF_ERROR(model_->Logits(xp + (T - 1) * hidden, 1, logits.as<float>()));
    last_logits->resize(V);
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(last_logits->data(), logits.as<void>(), V * 4, cudaMemcpyDeviceToHost, st),
        "logits download"));
  }
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(st), "prefill"));

  if (options_.sparse) {
    const size_t nq = qpos.size();
    internal::IndexQueries index{T, static_cast<int>(nq), {}};
    std::vector<std::vector<float>> queries(sparse_layers);
    for (int s = 0; s < sparse_layers; ++s) {
      const uint16_t* src = q_h.as<uint16_t>() + s * nq * qd;
      queries[s].resize(nq * qd);
      for (size_t j = 0; j < nq * qd; ++j) queries[s][j] = Bf16ToF32(src[j]);
      index.layers.push_back(queries[s]);
      if (gpu_lists) {
        const int32_t* l = lists_h.as<int32_t>() + s * (lists.tokens + lists.lse);
        index.lists.push_back(
            {absl::MakeConstSpan(l, lists.tokens),
             absl::MakeConstSpan(reinterpret_cast<const float*>(l) + lists.tokens, lists.lse)});
      }
    }
    index.list_size = gpu_lists ? options_.ctkvr_list_size : 0;
    // host_kv's [T][kv_heads][head_dim] rows as the tier's [kv_heads][tokens][head_dim].
    const uint16_t* kv = host_kv.get();
    const size_t row_bytes = spec_.row_bytes();
    auto source = [&](client::AppendBatch* b) {
      const size_t n = static_cast<size_t>(b->num_tokens);
      for (int l = 0; l < L; ++l) {
        b->keys[l].resize(Hkv * n * row_bytes);
        b->values[l].resize(Hkv * n * row_bytes);
      }
      pool_.ParallelFor(int64_t{L} * 2 * Hkv, [&](int64_t i) {
        const int l = static_cast<int>(i / (2 * Hkv)), h = static_cast<int>(i % Hkv);
        const int is_v = static_cast<int>((i / Hkv) % 2);
        const uint16_t* src =
            kv + ((static_cast<size_t>(l) * 2 + is_v) * Tz + b->token_start) * kvd + h * hd;
        char* dst = (is_v ? b->values[l] : b->keys[l]).data() + h * n * row_bytes;
        for (size_t t = 0; t < n; ++t) std::memcpy(dst + t * row_bytes, src + t * kvd, row_bytes);
      });
    };
    RETURN_IF_ERROR(internal::PushPromptToTier(tier_, spec_, options_, id, tokens, source,
                                               std::move(index), &counters_.index_build_seconds));
  }
  std::move(undo).Cancel();
  times_.prefill += Since(t_start);
  return absl::OkStatus();
}

absl::Status CudaEngine::RemoveSequence(const std::string& id) {
  const int r = FindRow(id);
  if (r < 0) return absl::NotFoundError(absl::StrCat("no sequence '", id, "'"));
  const int last = static_cast<int>(rows_.size()) - 1;
  if (r != last) {  // the last row moves into the freed one
    Device& d = *dev_;
    const cudaStream_t st = model_->stream();
    const size_t kvd = model_->kv_dim(), Hkv = config_.num_kv_heads, budget = options_.budget;
    const size_t S = options_.sink_tokens, W = options_.window_tokens;
    auto move = [&](const DeviceMem& m, size_t row_bytes, size_t used_bytes) {
      return CudaStatus(
          cudaMemcpyAsync(m.as<uint8_t>() + r * row_bytes, m.as<uint8_t>() + last * row_bytes,
                          used_bytes, cudaMemcpyDeviceToDevice, st),
          "batch row move");
    };
    int sparse_index = 0;
    for (int l = 0; l < config_.num_layers; ++l) {
      if (!IsSparse(l)) {
        const size_t row_bytes = limits_.max_context * kvd * 2;
        RETURN_IF_ERROR(move(d.k[l], row_bytes, rows_[last]->len * kvd * 2));
        RETURN_IF_ERROR(move(d.v[l], row_bytes, rows_[last]->len * kvd * 2));
        continue;
      }
      RETURN_IF_ERROR(move(d.k[l], (S + W) * kvd * 2, (S + W) * kvd * 2));
      RETURN_IF_ERROR(move(d.v[l], (S + W) * kvd * 2, (S + W) * kvd * 2));
      const size_t slots = Hkv * budget;
      RETURN_IF_ERROR(
          move(d.slot_k[l], slots * config_.head_dim * 2, slots * config_.head_dim * 2));
      RETURN_IF_ERROR(
          move(d.slot_v[l], slots * config_.head_dim * 2, slots * config_.head_dim * 2));
      RETURN_IF_ERROR(move(d.slot_map[l], slots * 4, slots * 4));
      int32_t* map = d.map_h.as<int32_t>() + sparse_index++ * limits_.max_batch * slots;
      std::copy_n(map + last * slots, slots, map + r * slots);
      uint16_t* q =
          d.q_h.as<uint16_t>() + static_cast<size_t>(l) * limits_.max_batch * model_->q_dim();
      std::copy_n(q + last * model_->q_dim(), model_->q_dim(), q + r * model_->q_dim());
    }
    RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(st), "batch row move"));
    rows_[r] = std::move(rows_[last]);
  }
  rows_.pop_back();
  if (options_.sparse) return tier_->CloseSequence(id, /*drop=*/true);
  return absl::OkStatus();
}

absl::Status CudaEngine::Retrieve(int l, absl::Span<const int32_t> pos,
                                  const uint16_t* queries_bf16, int staging_area, bool lookahead,
                                  std::vector<float>* scratch, LayerRecall* out) {
  const int B = static_cast<int>(pos.size());
  const int Hkv = config_.num_kv_heads, G = config_.num_heads / Hkv, d = config_.head_dim;
  const size_t gd = static_cast<size_t>(G) * d;
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  client::RetrieveBatch batch{l, options_.budget, options_.method, {}, staging_area,
                              RetrieveSuccessors(options_, lookahead)};
  out->entries.clear();
  for (int i = 0; i < B; ++i) {
    const int64_t ws = std::max<int64_t>(S, pos[i] + 1 - W);
    if (ws <= S) continue;  // everything is sink or window
    for (int h = 0; h < Hkv; ++h) {
      out->entries.emplace_back(i, h);
      batch.entries.push_back(
          {rows_[i]->id, h, {}, S, ws, options_.delta_streaming ? rows_[i]->epochs[l][h] : 0});
    }
  }
  // The queries, widened where the tier reads them when it offers that (no copy of them then).
  const size_t n = batch.entries.size();
  absl::Span<float> q =
      n == 0 ? absl::Span<float>()
             : tier_->QueryStaging(spec_, staging_area, n, batch.budget, batch.successors);
  if (q.size() != n * gd) {
    scratch->resize(n * gd);
    q = absl::MakeSpan(*scratch);
  }
  for (size_t k = 0; k < n; ++k) {
    const auto [i, h] = out->entries[k];
    const uint16_t* src = queries_bf16 + (static_cast<size_t>(i) * Hkv + h) * gd;
    float* dst = q.data() + k * gd;
    for (size_t j = 0; j < gd; ++j) dst[j] = Bf16ToF32(src[j]);
    batch.entries[k].queries = absl::MakeConstSpan(dst, gd);
  }
  out->recalled.clear();
  out->called = !batch.entries.empty();
  out->seconds = 0;
  if (!out->called) return absl::OkStatus();
  const absl::Time t0 = absl::Now();
  absl::Status st = tier_->Retrieve(batch, &out->recalled);
  out->seconds = Since(t0);
  if (!st.ok()) {
    // Whatever the tier put or remembers for this call is unknown: new epochs make it resend.
    for (auto [i, h] : out->entries) rows_[i]->epochs[l][h] = next_epoch.fetch_add(1);
  }
  return st;
}

absl::Status CudaEngine::StageRecall(int l, LayerRecall& r) {
  Device& d = *dev_;
  const int Hkv = config_.num_kv_heads, budget = options_.budget;
  const size_t pair = 2 * spec_.row_bytes(), slots = static_cast<size_t>(Hkv) * budget;
  const size_t sl = static_cast<size_t>(l - options_.dense_layers), B = limits_.max_batch;
  cuda::SlotFill* fills = d.fills_h.as<cuda::SlotFill>() + sl * B * Hkv;
  int32_t* fill_slots = d.fill_slots_h.as<int32_t>() + sl * B * slots;
  int32_t* maps = d.map_h.as<int32_t>() + sl * B * slots;
  int32_t next = 0;
  r.selected_rows = r.streamed_rows = 0;
  const uint16_t** addresses = nullptr;  // this layer's, once an entry comes with addresses
  for (size_t e = 0; e < r.entries.size(); ++e) {
    const auto [i, h] = r.entries[e];
    const client::Recalled& rec = r.recalled[e];
    const int32_t n = static_cast<int32_t>(rec.fill_slots.size());
    if (n > 0 && rec.rows == nullptr) {
      // Gathered where the tier keeps them, which must be memory pinned with pin_region: one
      // check of the span of the entry's rows (a stray address would fault the context).
      if (pinned_ == nullptr || rec.row_addresses.size() != 2 * static_cast<size_t>(n)) {
        return absl::FailedPreconditionError(
            "row addresses need the engine's PinnedHostRanges (TierOptions::pin_region) and two "
            "per fill row");
      }
      const auto [lo, hi] = std::minmax_element(rec.row_addresses.begin(), rec.row_addresses.end());
      if (!pinned_->Contains(*lo, static_cast<size_t>(*hi - *lo) + pair / 2)) {
        return absl::FailedPreconditionError(
            "recalled row addresses are not in page-locked memory: the tier must pin its arena "
            "with the engine's PinnedHostRanges (TierOptions::pin_region)");
      }
      if (addresses == nullptr) {
        PinnedMem& table = d.fill_addresses_h[sl];
        if (table.bytes() == 0) {
          RETURN_IF_ERROR(
              table.Allocate(B * slots * 2 * sizeof(void*), "recalled rows' addresses"));
        }
        addresses = table.as<const uint16_t*>();
      }
      std::memcpy(addresses + 2 * static_cast<size_t>(next), rec.row_addresses.data(),
                  2 * static_cast<size_t>(n) * sizeof(void*));
      fills[e] = {nullptr, i, h, next, n, addresses + 2 * static_cast<size_t>(next)};
    } else {
      if (n > 0 && (pinned_ == nullptr || !pinned_->Contains(rec.rows, n * pair))) {
        return absl::FailedPreconditionError(
            "recalled rows are not in page-locked memory: the tier must pin its recall buffer "
            "with the engine's PinnedHostRanges (TierOptions::pin_region)");
      }
      fills[e] = {reinterpret_cast<const uint16_t*>(rec.rows), i, h, next, n};
    }
    std::copy(rec.fill_slots.begin(), rec.fill_slots.end(), fill_slots + next);
    next += n;
    int32_t* map = maps + (static_cast<size_t>(i) * Hkv + h) * budget;
    std::fill_n(map, budget, -1);
    for (size_t j = 0; j < rec.slots.size(); ++j) map[rec.slots[j]] = rec.token_ids[j];
    r.selected_rows += static_cast<int64_t>(rec.token_ids.size());
    r.streamed_rows += n;
  }
  cuda::SlotScatterParams p;
  p.num_entries = static_cast<int>(r.entries.size());
  p.head_dim = config_.head_dim;
  p.batch = batch();
  p.num_kv_heads = Hkv;
  p.budget = budget;
  p.entries = fills;
  p.fill_slots = fill_slots;
  p.num_fill_slots = next;
  p.k_slots = d.slot_k[l].as<uint16_t>();
  p.v_slots = d.slot_v[l].as<uint16_t>();
  p.entry_stride = static_cast<int64_t>(budget) * config_.head_dim;
  p.row_stride = config_.head_dim;
  RETURN_IF_ERROR(cuda::SlotScatter(p, d.recall_stream));
  RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(d.slot_map[l].as<void>(), maps, batch() * slots * 4,
                                             cudaMemcpyHostToDevice, d.recall_stream),
                             "slot map upload"));
  return CudaStatus(cudaEventRecord(d.applied[sl], d.recall_stream), "cudaEventRecord");
}

absl::Status CudaEngine::BeginGpuSegment() {
  Device& d = *dev_;
  return CudaStatus(cudaEventRecord(d.segments[2 * d.open_segments], model_->stream()),
                    "cudaEventRecord");
}

absl::Status CudaEngine::EndGpuSegment() {
  Device& d = *dev_;
  return CudaStatus(cudaEventRecord(d.segments[2 * d.open_segments++ + 1], model_->stream()),
                    "cudaEventRecord");
}

absl::Status CudaEngine::CheckStep(absl::Span<const std::string> ids,
                                   absl::Span<const int32_t> tokens,
                                   std::vector<int>* order) const {
  const int B = batch(), V = config_.vocab_size;
  if (ids.size() != tokens.size() || static_cast<int>(ids.size()) != B || B == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Step decodes every resident sequence (", B, "), one token each"));
  }
  std::vector<int> rows(B, -1), seen(B, 0);
  for (int i = 0; i < B; ++i) {
    rows[i] = FindRow(ids[i]);
    if (rows[i] < 0 || seen[rows[i]]++) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", ids[i], "' is not a resident sequence or is repeated"));
    }
    if (tokens[i] < 0 || tokens[i] >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", tokens[i], " is outside [0, ", V, ")"));
    }
    if (rows_[rows[i]]->len + 1 > limits_.max_context) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence '", ids[i], "' reached max_context ", limits_.max_context));
    }
  }
  if (order != nullptr) *order = std::move(rows);
  return absl::OkStatus();
}

absl::Status CudaEngine::Step(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens,
                              std::vector<int32_t>* next, std::vector<float>* logits) {
  const absl::Time t_step = absl::Now();
  const int B = batch();
  std::vector<int> order;  // order[i]: the batch row of ids[i]
  RETURN_IF_ERROR(CheckStep(ids, tokens, &order));
  Device& d = *dev_;
  const cudaStream_t st = model_->stream();
  const int L = config_.num_layers, V = config_.vocab_size;
  const size_t qd = model_->q_dim(), kvd = model_->kv_dim(), width = model_->qkv_width();
  const int64_t S = options_.sink_tokens, W = options_.window_tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));

  int32_t* io = d.io_h.as<int32_t>();
  int max_len = 0;
  for (int i = 0; i < B; ++i) io[order[i]] = tokens[i];
  for (int r = 0; r < B; ++r) {
    io[B + r] = static_cast<int32_t>(rows_[r]->len);
    io[2 * B + r] = static_cast<int32_t>(rows_[r]->len + 1);
    max_len = std::max(max_len, io[2 * B + r]);
  }
  const std::vector<int32_t> pos(io + B, io + 2 * B);
  const int32_t* d_tokens = d.io.as<int32_t>();
  const int32_t* d_pos = d_tokens + B;
  const int32_t* d_len = d_tokens + 2 * B;
  d.open_segments = 0;
  RETURN_IF_ERROR(BeginGpuSegment());
  RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(d.io.as<void>(), io, 3 * B * 4, cudaMemcpyHostToDevice, st),
                 "step inputs upload"));
  RETURN_IF_ERROR(model_->Embed(d_tokens, B, d.x.as<float>()));

  // Lookahead: every sparse layer's retrieval from the last step's queries, issued now in layer
  // order by lookahead_calls threads of their own (one staging area per layer), so that up to
  // that many calls are in flight.
  const bool lookahead =
      options_.sparse && options_.lookahead &&
      std::all_of(rows_.begin(), rows_.end(), [](const auto& s) { return s->has_queries; });
  std::vector<LayerRecall> recall(static_cast<size_t>(L));
  std::vector<std::vector<float>> queries(static_cast<size_t>(L));  // where the tier offers no room
  // Layer l's Retrieve and, when it succeeds, its StageRecall (on the caller's thread).
  auto recall_layer = [&](int l, int staging_area, bool from_last_step) {
    LayerRecall& r = recall[l];
    r.status =
        Retrieve(l, pos, d.q_h.as<uint16_t>() + static_cast<size_t>(l) * limits_.max_batch * qd,
                 staging_area, from_last_step, &queries[l], &r);
    if (r.status.ok() && r.called) {
      const absl::Time t0 = absl::Now();
      r.status = StageRecall(l, r);
      r.stage_seconds = Since(t0);
      // The tier believes these rows are in their slots now: new epochs make it resend them.
      if (!r.status.ok()) {
        for (auto [i, h] : r.entries) rows_[i]->epochs[l][h] = next_epoch.fetch_add(1);
      }
    }
  };
  std::vector<std::thread> prefetchers;
  std::atomic<int> next_layer{options_.dense_layers};
  if (options_.sparse) {
    // A failed step may have left the last step's scatters in flight, reading recall areas that
    // this step's calls overwrite.
    RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(d.recall_stream), "recall stream"));
  }
  if (lookahead) {
    const int calls = std::min(options_.lookahead_calls, L - options_.dense_layers);
    for (int t = 0; t < calls; ++t) {
      prefetchers.emplace_back([&] {
        // StageRecall enqueues on this engine's device (one of several under tensor
        // parallelism); a failed switch shows as the layer's CUDA error.
        const cuda::ScopedDevice device(model_->device());
        for (int l; (l = next_layer.fetch_add(1)) < L;) {
          recall_layer(l, l - options_.dense_layers, /*from_last_step=*/true);
          recall[l].done.Notify();
        }
      });
    }
  }
  absl::Cleanup join = [&] {
    for (std::thread& t : prefetchers) t.join();
  };

  for (int l = 0; l < L; ++l) {
    const bool sparse = IsSparse(l);
    uint16_t* qkv = d.qkv.as<uint16_t>();
    RETURN_IF_ERROR(model_->Qkv(l, d.x.as<float>(), B, d_pos, qkv));
    cuda::KvAppendParams ap;
    ap.batch = B;
    ap.num_kv_heads = config_.num_kv_heads;
    ap.head_dim = config_.head_dim;
    ap.k = qkv + qd;
    ap.v = qkv + qd + kvd;
    ap.src_stride = static_cast<int64_t>(width);
    ap.positions = d_pos;
    ap.cache_k = d.k[l].as<uint16_t>();
    ap.cache_v = d.v[l].as<uint16_t>();
    cuda::KvCacheView view;
    view.k = d.k[l].as<uint16_t>();
    view.v = d.v[l].as<uint16_t>();
    view.token_stride = static_cast<int64_t>(kvd);
    view.head_stride = config_.head_dim;
    if (sparse) {
      view.page_table = d.ring_table.as<int32_t>();
      view.page_table_stride = limits_.max_context;
      view.page_size = 1;
      view.page_stride = static_cast<int64_t>(kvd);
    } else {
      view.page_stride = static_cast<int64_t>(limits_.max_context) * kvd;
    }
    ap.page_table = view.page_table;
    ap.page_table_stride = view.page_table_stride;
    ap.page_size = view.page_size;
    ap.page_stride = view.page_stride;
    ap.token_stride = view.token_stride;
    ap.head_stride = view.head_stride;
    RETURN_IF_ERROR(cuda::KvAppend(ap, st));
    RETURN_IF_ERROR(CudaStatus(cudaMemcpy2DAsync(d.q.as<void>(), qd * 2, qkv, width * 2, qd * 2, B,
                                                 cudaMemcpyDeviceToDevice, st),
                               "q copy"));
    if (options_.sparse) {  // the new rows, for the tier
      RETURN_IF_ERROR(CudaStatus(
          cudaMemcpy2DAsync(
              d.newkv_h.as<uint16_t>() + static_cast<size_t>(l) * limits_.max_batch * 2 * kvd,
              2 * kvd * 2, qkv + qd, width * 2, 2 * kvd * 2, B, cudaMemcpyDeviceToHost, st),
          "new K/V download"));
    }
    if (!sparse) {
      cuda::DecodeAttentionParams p;
      p.batch = B;
      p.num_q_heads = config_.num_heads;
      p.num_kv_heads = config_.num_kv_heads;
      p.head_dim = config_.head_dim;
      p.max_len = max_len;
      p.q = d.q.as<uint16_t>();
      p.lengths = d_len;
      p.cache = view;
      p.scale = scale;
      p.out = d.attn.as<uint16_t>();
      ASSIGN_OR_RETURN(size_t ws, cuda::DecodeAttentionWorkspaceBytes(p));
      if (ws > d.workspace.bytes()) {
        RETURN_IF_ERROR(d.workspace.Allocate(ws, "attention workspace"));
      }
      RETURN_IF_ERROR(cuda::DecodeAttention(p, d.workspace.as<void>(), d.workspace.bytes(), st));
    } else {
      uint16_t* q_h = d.q_h.as<uint16_t>() + static_cast<size_t>(l) * limits_.max_batch * qd;
      if (lookahead) {
        RETURN_IF_ERROR(EndGpuSegment());
        const absl::Time t0 = absl::Now();
        recall[l].done.WaitForNotification();
        times_.retrieve += Since(t0);
      } else {
        RETURN_IF_ERROR(
            CudaStatus(cudaMemcpyAsync(q_h, d.q.as<void>(), B * qd * 2, cudaMemcpyDeviceToHost, st),
                       "q download"));
        RETURN_IF_ERROR(EndGpuSegment());
        RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(st), "q download"));
        const absl::Time t0 = absl::Now();
        recall_layer(l, 0, /*from_last_step=*/false);
        times_.retrieve += Since(t0);
      }
      if (recall[l].called) {
        counters_.retrieve_seconds += recall[l].seconds;
        counters_.retrieve_calls++;
      }
      const absl::Status& got = recall[l].status;
      // A tier that misses (deadline, unavailable, a stale call) costs accuracy, not the step:
      // the layer runs on sinks + window + the rows of the last selection.
      if (!got.ok()) {
        if (!internal::IsTierMiss(got)) return got;
        counters_.fallback_layers++;
        if (counters_.fallback_layers == 1 || counters_.fallback_layers % 1000 == 0) {
          KV_LOG(WARNING) << "tier missed layer " << l << " (" << got.ToString()
                          << "); decoding it on sinks + window + "
                          << "resident rows (" << counters_.fallback_layers << " so far)";
        }
      }
      if (got.ok() && recall[l].called) {
        counters_.recalled_rows += recall[l].selected_rows;
        counters_.streamed_rows += recall[l].streamed_rows;
        times_.upload += recall[l].stage_seconds;
        RETURN_IF_ERROR(CudaStatus(
            cudaStreamWaitEvent(st, d.applied[l - options_.dense_layers], 0), "recall wait"));
      }
      RETURN_IF_ERROR(BeginGpuSegment());
      cuda::SparseAttentionParams p;
      p.batch = B;
      p.num_q_heads = config_.num_heads;
      p.num_kv_heads = config_.num_kv_heads;
      p.head_dim = config_.head_dim;
      p.max_len = max_len;
      p.num_sinks = static_cast<int>(S);
      p.window = static_cast<int>(W);
      p.q = d.q.as<uint16_t>();
      p.lengths = d_len;
      p.cache = view;
      p.slots.k = d.slot_k[l].as<uint16_t>();
      p.slots.v = d.slot_v[l].as<uint16_t>();
      p.slots.budget = options_.budget;
      p.slots.entry_stride = static_cast<int64_t>(options_.budget) * config_.head_dim;
      p.slots.row_stride = config_.head_dim;
      p.slots.token_ids = d.slot_map[l].as<int32_t>();
      p.slots.counts = d.counts.as<int32_t>();
      p.scale = scale;
      p.out = d.attn.as<uint16_t>();
      ASSIGN_OR_RETURN(size_t ws, cuda::SparseAttentionWorkspaceBytes(p));
      if (ws > d.workspace.bytes()) {
        RETURN_IF_ERROR(d.workspace.Allocate(ws, "attention workspace"));
      }
      RETURN_IF_ERROR(cuda::SparseAttention(p, d.workspace.as<void>(), d.workspace.bytes(), st));
      if (options_.lookahead) {  // next step's queries
        RETURN_IF_ERROR(
            CudaStatus(cudaMemcpyAsync(q_h, d.q.as<void>(), B * qd * 2, cudaMemcpyDeviceToHost, st),
                       "q download"));
      }
    }
    RETURN_IF_ERROR(model_->FinishLayer(l, d.attn.as<uint16_t>(), B, d.x.as<float>()));
  }
  RETURN_IF_ERROR(model_->Logits(d.x.as<float>(), B, d.logits.as<float>()));
  RETURN_IF_ERROR(cuda::Argmax(d.logits.as<float>(), B, V, d.next.as<int32_t>(), st));
  RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(d.next_h.as<void>(), d.next.as<void>(), B * 4, cudaMemcpyDeviceToHost, st),
      "sampled ids download"));
  if (logits != nullptr) {
    if (d.logits_h.bytes() == 0) {
      RETURN_IF_ERROR(
          d.logits_h.Allocate(static_cast<size_t>(limits_.max_batch) * V * 4, "logits"));
    }
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(d.logits_h.as<void>(), d.logits.as<void>(),
                                   static_cast<size_t>(B) * V * 4, cudaMemcpyDeviceToHost, st),
                   "logits download"));
  }
  RETURN_IF_ERROR(EndGpuSegment());
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(st), "decode step"));
  for (int k = 0; k < d.open_segments; ++k) {
    float ms = 0;
    RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&ms, d.segments[2 * k], d.segments[2 * k + 1]),
                               "event time"));
    times_.gpu += ms / 1e3;
  }
  next->resize(B);
  for (int i = 0; i < B; ++i) (*next)[i] = d.next_h.as<int32_t>()[order[i]];
  if (logits != nullptr) {
    logits->resize(static_cast<size_t>(B) * V);
    for (int i = 0; i < B; ++i) {
      std::memcpy(logits->data() + static_cast<size_t>(i) * V,
                  d.logits_h.as<float>() + static_cast<size_t>(order[i]) * V, V * sizeof(float));
    }
  }
  std::move(join).Invoke();

  if (options_.sparse) {
    // The new tokens join the tier's copy of each sequence (their ids travel with their KV).
    const absl::Time t0 = absl::Now();
    const size_t row = spec_.row_bytes();
    std::vector<client::SequenceAppend> appends(B);
    for (int r = 0; r < B; ++r) {
      appends[r].sequence_id = rows_[r]->id;
      client::AppendBatch& b = appends[r].batch;
      b.token_start = pos[r];
      b.num_tokens = 1;
      b.token_ids = {io[r]};
      b.keys.resize(L);
      b.values.resize(L);
      for (int l = 0; l < L; ++l) {
        const uint8_t* src = reinterpret_cast<const uint8_t*>(
            d.newkv_h.as<uint16_t>() + (static_cast<size_t>(l) * limits_.max_batch + r) * 2 * kvd);
        b.keys[l].assign(reinterpret_cast<const char*>(src), config_.num_kv_heads * row);
        b.values[l].assign(reinterpret_cast<const char*>(src) + kvd * 2,
                           config_.num_kv_heads * row);
      }
    }
    std::vector<int64_t*> tier_len(B);
    for (int r = 0; r < B; ++r) tier_len[r] = &rows_[r]->tier_len;
    RETURN_IF_ERROR(internal::AppendStepTokens(tier_, std::move(appends), tier_len));
    const double s = Since(t0);
    counters_.append_seconds += s;
    times_.append += s;
  }
  for (auto& s : rows_) {
    s->len++;
    s->has_queries = options_.lookahead;
  }
  counters_.steps++;
  counters_.tokens_decoded += B;
  times_.step += Since(t_step);
  return absl::OkStatus();
}

void PinRecallBuffer(cuda::PinnedHostRanges* pinned, client::TierOptions* options) {
  options->pin_region = [pinned](uint8_t* data, size_t bytes) { return pinned->Pin(data, bytes); };
  options->unpin_region = [pinned](uint8_t* data) { pinned->Unpin(data); };
}

}  // namespace kvrecall::worker
