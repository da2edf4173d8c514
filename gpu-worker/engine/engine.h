// The decode engine: runs a Llama-family model over a batch of sequences, with layers 0..D-1
// dense (full KV held locally) and the rest sparse: attention over the sink tokens, a recent
// window, and the top-`budget` tokens the tier recalls for each (sequence, kv-head) every step.
//
// In dense mode (EngineOptions.sparse = false) every layer keeps its full KV locally and no tier
// is used: that is the reference the sparse mode is measured against. With the same rows in the
// same (positional) order both modes compute bit-identical attention, so with exact retrieval and
// a budget covering every candidate, sparse decoding equals dense decoding exactly.
//
// Thread safety: one thread drives an engine; it uses its own pool for attention.
#ifndef KVRECALL_GPU_WORKER_ENGINE_ENGINE_H_
#define KVRECALL_GPU_WORKER_ENGINE_ENGINE_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/tier.h"
#include "common/model_spec.h"
#include "common/thread_pool.h"
#include "gpu-worker/backends/backend.h"

namespace kvrecall::worker {

// Sees the post-RoPE q, k and v of every token the engine runs (prefill chunks and decode steps),
// e.g. to dump real Q/K traces. Called on the engine's thread.
//   positions: n token positions; q: [n][num_heads][head_dim]; k, v: [n][num_kv_heads][head_dim]
//   (k and v already rounded to the KV dtype). In a decode step row i belongs to ids[i]; during
//   prefill ids is empty.
class QkvObserver {
 public:
  virtual ~QkvObserver() = default;
  virtual void OnQkv(int layer, absl::Span<const std::string> ids, absl::Span<const int32_t> positions,
                     const float* q, const float* k, const float* v) = 0;
};

struct EngineOptions {
  bool sparse = true;        // false: all layers dense, no tier
  int dense_layers = 2;      // layers [0, dense_layers) always dense
  int sink_tokens = 16;      // always attended, never retrieved
  int window_tokens = 256;   // most recent tokens, always attended (>= 2)
  int budget = 1024;         // recalled tokens per (sequence, sparse layer, kv-head)
  client::Method method = client::Method::kExact;
  int prefill_chunk = 512;   // prompt tokens per forward pass during prefill
  // ctkvr: prompt queries sent to the tier for its query centroids: this many, evenly spaced over
  // the last index_query_window prompt positions (the last position always included).
  int index_queries = 64;
  int index_query_window = 1024;
  // ctkvr lists made on the GPU during prefill (the CUDA engine; ARCHITECTURE §4): the engine
  // takes ctkvr_centroids of the sampled queries (indexer::CtkvrCentroidQueries, the tier's own
  // pick), scores them against each sparse layer's prompt keys while those are on the GPU, and
  // sends the tier just those queries with their top-ctkvr_list_size lists, so that the tier
  // scores only the listed tokens instead of the whole prompt. Both must be at most the tier's
  // ctkvr centroids and list size (8 and 2048, its defaults). Off, and in the host engine, the
  // tier makes the lists from index_queries queries.
  bool gpu_ctkvr_lists = true;
  int ctkvr_centroids = 8;
  int ctkvr_list_size = 2048;
  int num_threads = 0;       // attention threads (0 = every core)
  // Lookahead: each step's selection for every sparse layer is computed from the previous step's
  // queries and issued at the start of the step, so retrieval overlaps compute. The tier needs
  // one staging area per sparse layer (TierOptions::staging_areas >= num_layers - dense_layers).
  bool lookahead = false;
  // With lookahead on the CUDA engine, up to this many sparse layers' Retrieve calls are in
  // flight at once, issued in layer order: one layer's rows stream while the next layers search
  // (the tier's pool is shared, so more than a few only queue). The host engine issues one.
  int lookahead_calls = 4;
  // Delta streaming: the tier sends only rows not already in this engine's slot caches. Off, every
  // selected row is sent every step (the same rows, so the same logits, bit for bit).
  bool delta_streaming = true;
  QkvObserver* observer = nullptr;  // not owned; may be null
  // With lookahead, the tier also keeps the 2 tokens after each of the selection's best this
  // many (client::RetrieveBatch::successors): a copying head attends, step after step, to the
  // token after the one it attended last, which the previous step's query does not rate. On
  // the reference model lookahead without them missed every passkey at 32K, even exact at
  // budget 2048 (docs/benchmarks.md). 0: the plain top-k of the previous step's queries.
  int lookahead_successors = 16;
};

// RetrieveBatch::successors for a call of the engine: lookahead_successors (at most the budget)
// for a lookahead call, 0 for one made with the step's own queries.
inline int RetrieveSuccessors(const EngineOptions& o, bool lookahead) {
  return lookahead ? std::max(0, std::min(o.lookahead_successors, o.budget)) : 0;
}

// K/V of a prompt for every layer, as the engine stores them (fp32 values rounded to kv_dtype).
struct PromptKV {
  std::vector<int32_t> tokens;
  // k[layer], v[layer]: [num_tokens][num_kv_heads][head_dim], fp32.
  std::vector<std::vector<float>> k, v;
  // Sampled prompt queries for ctkvr (EngineOptions.index_queries positions, ascending):
  // query_positions[j], and q[layer]: [num_positions][num_heads][head_dim] fp32 post-RoPE.
  std::vector<int32_t> query_positions;
  std::vector<std::vector<float>> q;
};

struct EngineCounters {
  int64_t steps = 0;
  int64_t tokens_decoded = 0;
  int64_t retrieve_calls = 0;
  int64_t recalled_rows = 0;   // rows the selections named
  int64_t streamed_rows = 0;   // rows that had to be sent (not already in the slot caches)
  int64_t fallback_layers = 0;  // (step, layer)s decoded without the tier's answer (missed deadline...)
  double retrieve_seconds = 0;  // wall time inside Tier::Retrieve
  double append_seconds = 0;    // wall time inside Tier::AppendKV during decode
  double index_build_seconds = 0;  // tier-side BuildIndex time (as the tier reports it)
};

namespace internal {

// Tier failures a step survives by decoding the layer without the tier's answer (deadline,
// unavailable, a stale call).
bool IsTierMiss(const absl::Status& s);

// Sends a decode step's new tokens to the tier in one AppendKVBatch: appends[i] is a sequence's
// token at appends[i].batch.token_start, and *tier_len[i] how many tokens the tier holds of that
// sequence. One the tier holds already - stored by an earlier try of this step whose batch
// failed on another sequence - is not sent again: the tier would refuse it (FAILED_PRECONDITION)
// and the sequence could never decode on. Each one stored advances its *tier_len. Errors: the
// batch's (the first failure's); the stored ones still advance.
absl::Status AppendStepTokens(client::Tier* tier, std::vector<client::SequenceAppend> appends,
                              absl::Span<int64_t* const> tier_len);

// Writes the K/V of prompt tokens [b->token_start, + b->num_tokens) into b->keys / b->values
// (AppendBatch layout, kv_dtype bytes).
using PromptKvSource = std::function<void(client::AppendBatch* b)>;

// The prompt positions whose queries ctkvr gets (PromptKV::query_positions; the GPU engine's
// prefill samples the same): n = min(index_queries, window) positions, ascending, window / n
// (rounded down) apart and ending at the last position, window = min(num_tokens,
// index_query_window). REQUIRES: num_tokens >= 1.
std::vector<int32_t> IndexQueryPositions(const EngineOptions& options, int64_t num_tokens);

// The K/V of a prefilled prompt (fp32, rounded to spec.kv_dtype); refers to `prompt`, which must
// outlive it.
PromptKvSource PromptKvSourceOf(const ModelSpec& spec, const PromptKV& prompt);

// The ctkvr queries an index over [sinks, end) is built with: `num` per sparse layer, taken at
// IndexQueryPositions(options, end) (or the centroids picked from them, with lists),
// layers[l - dense_layers] = [num][num_heads][head_dim] fp32.
struct IndexQueries {
  int64_t end = 0;
  int num = 0;
  std::vector<absl::Span<const float>> layers;
  // Lists made by the worker for these queries over [sinks, end) (kvstore::BuildIndexArgs'
  // ctkvr_lists, one per sparse layer); empty: the tier makes them.
  int list_size = 0;
  std::vector<kvstore::BuildIndexArgs::LayerLists> lists;
};
// Given how many of the prompt's tokens the tier already held when it was opened (a shared
// document's prefix that the sequence adopted), the queries to index with: the prompt's own (end
// = its length), or the adopted prefix's (end = the adopted count) so that every session over
// the document asks for the same index, which the tier then builds and stores once and shares
// (kvstore/index_manager.h "share"); the session's own tokens are scanned exactly until the
// tier's growth indexes them in a part of their own.
using IndexQuerySource = std::function<absl::StatusOr<IndexQueries>(int64_t adopted_tokens)>;

// The tier half of AddSequence, shared by the host and the GPU engine: opens `id` on the tier
// with its prompt `tokens`, appends the KV of every token the tier does not hold yet (in
// transactions of 2048 tokens, from `kv`) and, for ctkvr / cluster, has the tier build the
// index over the sparse layers, for ctkvr with the queries (and lists) `queries` gives once the
// adopted prefix is known. The spans it returns must stay valid until this returns. Adds the
// tier's build time to *index_build_seconds. INVALID_ARGUMENT when the queries' end is not in
// (sinks, prompt length].
absl::Status PushPromptToTier(client::Tier* tier, const ModelSpec& spec,
                              const EngineOptions& options, const std::string& id,
                              absl::Span<const int32_t> tokens, const PromptKvSource& kv,
                              const IndexQuerySource& queries, double* index_build_seconds);
// The same with the prompt's own queries (queries.end = its length).
absl::Status PushPromptToTier(client::Tier* tier, const ModelSpec& spec,
                              const EngineOptions& options, const std::string& id,
                              absl::Span<const int32_t> tokens, const PromptKvSource& kv,
                              IndexQueries queries, double* index_build_seconds);

}  // namespace internal

class Engine {
 public:
  // `model` must outlive the engine; `tier` too, and may be null only when !options.sparse.
  // `spec` is the model's KV spec as registered with the tier.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(ModelBackend* model, client::Tier* tier, ModelSpec spec,
                                                        const EngineOptions& options);

  // Runs the prompt through the model (chunked, causal) and returns its KV; `logits` receives the
  // last prompt token's logits [vocab]. INVALID_ARGUMENT for an empty prompt or bad token ids.
  absl::StatusOr<PromptKV> Prefill(absl::Span<const int32_t> tokens, std::vector<float>* logits);

  // Starts sequence `id` from a prefilled prompt. Sparse mode opens it on the tier and pushes
  // all of its KV (the tier then holds the full cache) and, for ctkvr / cluster, has the tier
  // build the sequence's index; locally it keeps the dense layers, the sinks and the window.
  // ALREADY_EXISTS for an id in use.
  absl::Status AddSequence(const std::string& id, const PromptKV& prompt);

  // One decode step: appends tokens[i] to sequence ids[i] and writes logits [batch][vocab].
  absl::Status Step(absl::Span<const std::string> ids, absl::Span<const int32_t> tokens, std::vector<float>* logits);

  // Forgets a sequence here (and drops it on the tier in sparse mode).
  absl::Status RemoveSequence(const std::string& id);

  ~Engine();
  const EngineOptions& options() const { return options_; }
  const EngineCounters& counters() const { return counters_; }

 private:
  struct Seq;
  Engine(ModelBackend* model, client::Tier* tier, ModelSpec spec, const EngineOptions& options);
  bool IsSparse(int layer) const { return options_.sparse && layer >= options_.dense_layers; }
  void RoundKv(float* x, size_t n) const;
  // One sparse layer's Retrieve for a batch; queries(i) is sequence i's [num_heads][head_dim].
  // On OK the new rows are in the slot caches and each cache's `selected` is the selection; on
  // failure the caches keep their rows and last selection and move to new epochs. `lookahead`:
  // the queries are the previous step's (RetrieveSuccessors).
  absl::Status RetrieveLayer(int l, absl::Span<Seq* const> seqs, absl::Span<const std::string> ids,
                             absl::Span<const int32_t> pos, const std::function<const float*(int)>& queries,
                             int staging_area, bool lookahead);

  ModelBackend* const model_;
  client::Tier* const tier_;
  const ModelSpec spec_;
  const EngineOptions options_;
  const LlamaConfig config_;
  ThreadPool pool_;
  std::map<std::string, std::unique_ptr<Seq>> seqs_;
  EngineCounters counters_;
  uint64_t next_epoch_ = 0;  // slot cache epochs, shared by all sequences
};

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_ENGINE_ENGINE_H_
