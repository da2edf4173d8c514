// Retrieval indices over one (layer, kv-head)'s post-RoPE keys: one interface, four methods.
//
//   exact   — every key scored; the oracle (indexer/exact.h has the original one-call form).
//   ctkvr   — CTKVR (arXiv 2512.15550): C query centroids = real prompt queries picked by position,
//             each with an inverted list of its top-ρ keys; a search scores the new query group
//             against the centroids, unions the lists of the best m, scores those candidates
//             exactly and keeps the top-k. A query unlike every centroid (a copy step the
//             prompt's queries did not foresee) is scored exactly instead and joins the index as
//             a centroid of its own (CtkvrOptions::min_similarity). The default method.
//   cluster — ClusterKV (arXiv 2412.03213): spherical k-means over keys (cosine assignment,
//             centroid = mean of the raw keys, ~1 cluster per 80 tokens, at most 20 iterations
//             with an early stop once assignments settle, seeded random init), run on chunks of
//             8K positions (segmented clustering, as RetroInfer; ClusterKV's own decode-time
//             clusters are position-local too); a search ranks clusters by q·centroid and, with
//             ClusterOptions::rescore_factor F > 0 (the default, 8), scores the tokens of the
//             best clusters holding F × budget tokens exactly and keeps the best; with F = 0
//             (ClusterKV's own selection) it takes whole clusters until the budget is full (the
//             last one truncated, lowest token ids first).
//   merged  — CentroidKV (arXiv 2506.11418) is not a search index: merged centroids replace
//             tokens. It lives in indexer/merged.h; BuildSegment rejects it.
//
// GQA (ARCHITECTURE.md §1): one selection per kv-head for its whole query group. Token score
//   score(t) = max_h p_h(t),  p_h(t) = softmax over the retrieval range of (q_h · k_t · scale),
// exactly as exact.h. Coarse levels use the analogue:
//   ctkvr   — a centroid is one prompt position's whole query group [group][head_dim]; its list is
//             that group's top-ρ tokens by score(t) over the segment; the similarity of the new
//             group to a centroid is the mean over heads of cos(q_h, c_h). Candidates are scored
//             with the exact group score. Each head's softmax normaliser over the segment is
//             estimated as log Σ exp over the candidates minus log(share of the best centroid's
//             own mass that its list holds), so that candidates are not over-rated next to other
//             segments' tokens.
//   cluster — a cluster's score is max_h of the per-head softmax (over clusters, each weighted by
//             its size) of q_h · centroid · scale, i.e. the probability of its average token
//             (with ClusterOptions::variance_ranking, of an estimate of its mean token
//             probability: + ½ Σ_j (q_hj · scale)² σ²_j, σ² the cluster's key variance).
//
// Segments (ARCHITECTURE.md §3): a Segment indexes a contiguous token range [token_begin,
// token_end) of one (layer, kv-head) — e.g. a shared prefix segment plus the sequence's growing
// suffix segment. Search takes every segment of a sequence, restricts them to the entry's
// retrieval range, scans tokens of the range that no segment covers exactly (recent decode tokens
// not yet appended), and merges with one softmax normaliser per head over the whole range. For
// exact, searching any split into segments equals searching one segment.
//
// Append (decode-time keys): exact just extends its range; ctkvr scores the new keys against
// every centroid and keeps each list the top-ρ of (old list ∪ new keys) under the updated
// normalisers (a key dropped from a list earlier does not come back); cluster holds appended
// keys as pending — scored exactly at search — until W have accumulated, then clusters those W
// into `append_clusters` new clusters.
//
// An index holds no copy of the keys it searches, except ctkvr's per-centroid candidate copies
// (CtkvrOptions::copy_list_rows): every call gets a PagedRows view of the sequence's keys of that
// (layer, kv-head) (ids are positions in that view), which must cover the segments' ranges.
#ifndef KVRECALL_INDEXER_INDEX_H_
#define KVRECALL_INDEXER_INDEX_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

enum class Method : uint8_t { kExact = 0, kCtkvr = 1, kCluster = 2, kMerged = 3 };

absl::string_view MethodName(Method m);  // "exact" | "ctkvr" | "cluster" | "merged"
absl::StatusOr<Method> ParseMethod(absl::string_view name);  // INVALID_ARGUMENT if unknown

struct CtkvrOptions {
  // C: query centroids, picked evenly by position from the given prompt queries (the last one
  // always included). Build cost is C × group × tokens × head_dim multiply-adds; the build keeps
  // a per-thread scratch of C × group × tokens floats for later builds (12 MiB at 8 × 4 × 96K).
  int centroids = 8;
  // ρ: inverted-list length per centroid (its top-ρ tokens by group score).
  int list_size = 2048;
  // m: centroids probed per search (union of their lists = candidates).
  int probe = 1;
  // Novel queries. When the query group's best centroid is less similar than this (mean cosine
  // over the group's heads), the lists were built for queries unlike it and hold no evidence
  // for it — on the reference model these are the answer's copy steps, whose target tokens no
  // prompt query attended. Such a search scores the range exactly, and the query is added as
  // a centroid (its exact top-ρ list, normaliser over the searched range) so that the similar
  // queries of the next steps are served from lists again. 0 turns this off (CTKVR as
  // published). Range [0, 1]. On the reference model 0.45 still missed a 16K needle and 0.5
  // found every one up to 32K, scoring 17-23% of the searches exactly (docs/benchmarks.md).
  float min_similarity = 0.5f;
  // Centroids added by novel queries are kept up to this many; beyond it each new one replaces
  // the oldest added one. 0: novel queries are still scored exactly but nothing is added.
  int max_added = 16;
  // Every list also holds the ±neighbour_radius tokens around its neighbour_tokens best ones:
  // a copying head attends, step after step, to the token after the one it attended last.
  // These neighbours are fixed when the list is made (Append re-ranks only the list itself).
  int neighbour_tokens = 8;
  int neighbour_radius = 8;
  // Each prompt centroid keeps a contiguous copy of its candidates' key rows (its list and
  // neighbours, ascending), made by Build and again by Append (a parsed segment makes each on
  // the first search that needs it). A search that probes one prompt centroid streams those
  // rows instead of gathering them from the pages at random, which waits on memory once a
  // node's keys outgrow the caches; its selection is the same bit for bit. Memory: up to
  // C × (ρ + neighbours) key rows per segment (at the defaults and head_dim 128 in bf16,
  // 4.4 MiB: 9% of the segment's K/V at 96K). Not serialised: a parsed segment has it on.
  bool copy_list_rows = true;
};

struct ClusterOptions {
  int tokens_per_cluster = 80;  // clusters = max(1, tokens / this) at build
  int iterations = 20;          // spherical k-means iterations
  int append_every = 320;       // W: appended tokens are clustered once W have accumulated;
                                // until then they are scored exactly as single tokens
  int append_clusters = 4;      // clusters made from each W appended tokens
  uint64_t seed = 1;            // random initial centroids (distinct tokens); deterministic
  // The build runs k-means separately on consecutive chunks of this many tokens (the last chunk
  // absorbs a remainder shorter than half a chunk), each into chunk / tokens_per_cluster
  // clusters, so the build is linear in the segment's length (one k-means over 96K tokens costs
  // 12× a chunked one) and chunks build in parallel. 0 = one k-means over the whole segment
  // (ClusterKV's code). Decode-time appends are chunks of append_every tokens in either case.
  int segment_tokens = 8192;
  // k-means stops early after an iteration in which at most this fraction of the tokens changed
  // cluster (0 = only when none did); `iterations` stays the cap.
  double tolerance = 0.01;
  // Rank clusters by q·centroid + ½ Σ_j q_j² σ²_j (σ²: the cluster's per-dimension key variance,
  // stored next to the centroid: twice the centroid memory) — an estimate of log mean exp(q·k)
  // over the cluster — instead of q·centroid alone.
  bool variance_ranking = false;
  // Token-level refinement. 0: ClusterKV's own selection — whole clusters by their centroid
  // score until the budget (the last one truncated). F > 0: clusters in the same order until
  // they hold F × budget tokens of the range (candidates), then those tokens are scored exactly
  // (q·k, the group rule) and the best `budget` kept; clusters not taken still count towards the
  // normaliser with their centroid estimate. Search cost: the centroids plus F × budget keys.
  // Whole clusters reach 0.755 attention-mass recall at 96K / budget 1024 on generated data and
  // 0.39–0.41 on the reference model's 8K traces at budget 84; F = 8 reaches 0.95 and 0.93–0.95
  // (docs/benchmarks.md).
  int rescore_factor = 8;
};

struct IndexOptions {
  CtkvrOptions ctkvr;
  ClusterOptions cluster;
};

// The most one ctkvr segment of one (layer, kv-head) ever holds (Segment::MemoryBytes), whatever
// its token range: every prompt centroid and every centroid novel queries may add, each with a
// full list, its logits and neighbours, and the prompt centroids' copies of their key rows
// (copy_list_rows). For sizing a node's memory ahead of builds.
int64_t CtkvrSegmentMaxBytes(const CtkvrOptions& options, int group, int head_dim, DType kv_dtype);

// Applies a --ctkvr_min_similarity flag to *options: a negative value keeps the current
// threshold, a value in [0, 1] replaces it; above 1 (or NaN) is INVALID_ARGUMENT (a cosine).
absl::Status ApplyMinSimilarityFlag(double value, CtkvrOptions* options);

// The prompt queries a ctkvr build takes as its centroids: min(centroids, num_queries) indices
// into the queries, evenly spaced, the last query always included, ascending. A builder that
// makes the lists elsewhere (CtkvrLists) picks its queries with this, so that the tier builds
// the same index from either.
std::vector<int> CtkvrCentroidQueries(int num_queries, int centroids);

// ctkvr inverted lists made elsewhere — a GPU worker makes them during prefill, while the keys
// are on the GPU (ARCHITECTURE.md §4; gpu-worker/backends/cuda/kernels.h CtkvrLists) — for
// BuildInput::ctkvr_lists. With n = min(list_size, token_end - token_begin), for prompt query
// i < num_prompt_queries (every one is a centroid):
//   tokens[i * n, (i + 1) * n): its group's n tokens of the range of highest score(t) (the GQA
//     rule above, under lse), ascending;
//   lse[i * group + h]: q-head h's log Σ exp(scale · q_h · k_t) over the whole range.
// The segment scores the listed tokens itself (their logits, neighbours, list masses and row
// copies), so it is the segment BuildSegment makes from the same queries up to the lists' near
// ties.
struct CtkvrLists {
  int list_size = 0;                // ρ: 1..CtkvrOptions::list_size
  const int32_t* tokens = nullptr;  // [num_prompt_queries][n]
  const float* lse = nullptr;       // [num_prompt_queries][group]
};

// What a segment is built from.
struct BuildInput {
  const PagedRows* keys = nullptr;  // [num_tokens][head_dim] of keys.dtype, post-RoPE
  int64_t token_begin = 0;          // indexed range [token_begin, token_end) of `keys`
  int64_t token_end = 0;
  // ctkvr only: the prompt's last queries for this kv-head's group, in position order,
  // [num_prompt_queries][group][head_dim] fp32 post-RoPE (query position-major, then q-head of the
  // group in order). Other methods ignore them.
  const float* prompt_queries = nullptr;
  int num_prompt_queries = 0;
  int group = 0;
  float scale = 0;  // softmax scale; 0 means 1/sqrt(head_dim)
  // ctkvr only: lists made elsewhere (see CtkvrLists); null = the build makes them. With lists,
  // every prompt query is a centroid: num_prompt_queries at most CtkvrOptions::centroids.
  const CtkvrLists* ctkvr_lists = nullptr;
};

namespace internal {
struct Hits;
class HitsList;
struct SegmentSearch;
class ByteWriter;
}  // namespace internal

// One index segment. Thread safety: const methods may run concurrently; Append must not overlap
// any other call on the same segment (the owner serialises writers, e.g. with a reader/writer
// lock). The keys a segment was built on must not change (committed rows never do).
class Segment {
 public:
  virtual ~Segment() = default;
  virtual Method method() const = 0;
  int64_t token_begin() const { return begin_; }
  int64_t token_end() const { return end_; }  // exclusive; grows with Append

  // Extends the segment to [token_begin(), new_end). `keys` is the (grown) view of the same rows.
  // INVALID_ARGUMENT if new_end < token_end() or new_end > keys.num_tokens or the shape differs.
  // On error the segment is unchanged. `pool` may be null.
  virtual absl::Status Append(const PagedRows& keys, int64_t new_end, ThreadPool* pool) = 0;

  // Approximate heap bytes held by the index (not the keys).
  virtual size_t MemoryBytes() const = 0;

  // A deep copy that shares nothing mutable with this segment (a chain shares its immutable
  // parts), e.g. to Append to while readers keep searching this one.
  virtual std::unique_ptr<Segment> Clone() const = 0;

  // Implementation hook of SerializeSegment(); not for callers. Writes the method's body.
  virtual void SerializeInternal(internal::ByteWriter* w) const = 0;

  // Implementation hook of Search(); not for callers. Appends scored units to *out.
  virtual absl::Status SearchInternal(const internal::SegmentSearch& s,
                                      internal::HitsList* out) const = 0;

 protected:
  Segment(int64_t begin, int64_t end, int head_dim, DType dtype)
      : begin_(begin), end_(end), head_dim_(head_dim), dtype_(dtype) {}

 public:
  int head_dim() const { return head_dim_; }
  DType dtype() const { return dtype_; }

 protected:
  int64_t begin_;
  int64_t end_;
  int head_dim_;
  DType dtype_;
};

// Builds a segment of `method` over input.keys rows [token_begin, token_end). Spreads work over
// `pool` (may be null). INVALID_ARGUMENT for: merged (not a search index), empty or out-of-range
// token ranges, null keys, head_dim <= 0, non-positive options, and for ctkvr missing prompt
// queries (num_prompt_queries <= 0, group <= 0) or non-finite ones, and lists (ctkvr_lists)
// that break CtkvrLists' contract: list_size outside [1, options' list_size], more queries than
// options' centroids, a list not strictly ascending inside the range, or a normaliser that is
// not finite or below the log-sum-exp of its own list's logits (by more than 1e-3).
absl::StatusOr<std::unique_ptr<Segment>> BuildSegment(Method method, const BuildInput& input,
                                                      const IndexOptions& options,
                                                      ThreadPool* pool);
// The same, by method name ("exact", "ctkvr", "cluster").
absl::StatusOr<std::unique_ptr<Segment>> BuildSegment(absl::string_view method,
                                                      const BuildInput& input,
                                                      const IndexOptions& options,
                                                      ThreadPool* pool);

// A segment over input's range [token_begin, token_end) that continues `base` (which ends at
// token_begin): the next part of a chain whose earlier parts are shared, e.g. a sequence's own
// tokens after a prompt segment that every sequence over one document uses. ctkvr keeps base's
// prompt centroids (input's prompt queries are ignored) and builds their lists over the new
// range; other methods build as BuildSegment does. INVALID_ARGUMENT as BuildSegment, for a null
// base, a range that does not start at base's end, and keys or a group unlike base's.
absl::StatusOr<std::unique_ptr<Segment>> BuildSegmentAfter(
    const std::shared_ptr<const Segment>& base, const BuildInput& input,
    const IndexOptions& options, ThreadPool* pool);

// A ctkvr segment's prompt centroids' lists and normalisers in the form CtkvrLists takes them,
// in the order of the prompt queries they were picked from (ascending position); for comparing
// other builders with the indexer's own. INVALID_ARGUMENT for a segment that is not ctkvr.
struct CtkvrListsCopy {
  int list_size = 0;
  int num_centroids = 0;
  std::vector<int32_t> tokens;
  std::vector<float> lse;
};
absl::StatusOr<CtkvrListsCopy> CtkvrListsOf(const Segment& segment);

// An exact segment over no tokens ([0, 0)): a placeholder that makes Search scan the whole
// range exactly (what an index that is still being built answers with).
std::unique_ptr<Segment> NewUnindexedSegment(int head_dim, DType dtype);

// A chain: contiguous parts [p0.begin, p0.end = p1.begin, ...) of one (layer, kv-head), searched
// as one segment (each part contributes its hits; one normaliser over all of them, as Search
// does for separate segments). Parts are immutable and may be shared by several chains — this is
// how a sequence's index grows (a prompt segment plus suffix segments of decode tokens) without
// copying the prompt's segment. method() is the parts' method; Append is FAILED_PRECONDITION
// (grow a chain by making a new one with a replaced or added last part); Clone copies the part
// pointers. INVALID_ARGUMENT for no parts, null parts, gaps/overlaps, or parts whose method,
// head_dim or dtype differ.
absl::StatusOr<std::unique_ptr<Segment>> NewSegmentChain(
    std::vector<std::shared_ptr<const Segment>> parts);
// The parts of a chain, or {segment} for any other segment.
std::vector<std::shared_ptr<const Segment>> SegmentParts(
    const std::shared_ptr<const Segment>& segment);

// Segment format (version 3: version 2 plus ctkvr's novel-query options, added centroids and
// list neighbours; version 2 added the cluster option rescore_factor; an older record is
// DATA_LOSS, and the tier node rebuilds its index), for spilling and persisting indices.
// Little-endian:
//   "KSG3", u8 kind (Method value; 0x80 = chain), i64 token_begin, i64 token_end, i32 head_dim,
//   u8 dtype, then the kind's body: exact none; ctkvr its options, group, prompt and total
//   centroid counts, centroids ever added, query centroids (scaled and unit), normalisers,
//   inverted lists with their logits and neighbours, list masses; cluster its
//   options, clustered end, centroids, variances, members and offsets, k-means counters; chain
//   u32 count then each part as a length-prefixed segment record.
// Every float is stored bit-exactly, so a parsed segment searches exactly like the original.
// The format carries no checksum (the storage layer adds one); ParseSegment validates the
// structure instead — sizes, offsets, token ids inside the segment's range, sorted lists,
// positive options — so that no input, however damaged, makes a later Search or Append read
// out of bounds: DATA_LOSS for anything malformed or not fully consumed.
std::string SerializeSegment(const Segment& segment);
absl::StatusOr<std::unique_ptr<Segment>> ParseSegment(absl::string_view bytes);

// One search: a kv-head's query group against all segments of its sequence.
struct SearchEntry {
  const float* queries = nullptr;  // [group][head_dim] fp32, post-RoPE
  int group = 0;
  const PagedRows* keys = nullptr;  // the sequence's keys of this (layer, kv-head)
  // Segments of the sequence (any order, disjoint ranges); may be empty (then all exact).
  std::vector<const Segment*> segments;
  int64_t token_begin = 0;  // retrieval range [token_begin, token_end) (sinks and window excluded)
  int64_t token_end = 0;
  int k = 0;        // budget: tokens to select; more than the range holds selects the whole range
  float scale = 0;  // 0 means 1/sqrt(head_dim)
  // Lookahead: the queries are the previous step's, and the selection serves the next one. A
  // copying head attends, step after step, to the token after the one it attended last, which
  // the previous query need not rate at all. The `successors` best selected tokens each bring
  // the 2 tokens after them (inside the range); the lowest-scored other picks make room, so
  // the selection stays within k. 0: the plain top-k.
  int successors = 0;
};

// Process-wide ctkvr counters over every segment (monotonic; for metrics and benchmarks):
// searches, and those that found their query novel (scored exactly; see min_similarity).
struct CtkvrCounters {
  int64_t searches = 0;
  int64_t novel = 0;
  // The counts between an `earlier` reading and this one.
  CtkvrCounters Since(const CtkvrCounters& earlier) const {
    return {searches - earlier.searches, novel - earlier.novel};
  }
  double novel_fraction() const {
    return searches > 0 ? static_cast<double>(novel) / static_cast<double>(searches) : 0.0;
  }
};
CtkvrCounters ReadCtkvrCounters();

// Per-call search knobs; 0 keeps the segment's build-time value.
// Wall time of Search's phases: 1. each entry searches its segments (centroid choice, tail and
// gap scans), 2. the deferred scoring over shared row copies, batched across entries, 3. each
// entry's normalisers and selection.
struct SearchTimes {
  int64_t select_nanos = 0;
  int64_t score_nanos = 0;
  int64_t finish_nanos = 0;
};

struct SearchOptions {
  int ctkvr_probe = 0;  // m
  SearchTimes* times = nullptr;  // when not null, Search adds its phases' times
};

// Runs every entry (spread over `pool`, may be null). On OK, (*out)[i] holds the min(k, range
// size) selected token ids of entry i in ascending order. INVALID_ARGUMENT (and *out untouched)
// if any entry has null pointers, group <= 0, k < 0, a range outside its keys, NaN/Inf queries,
// a segment whose range lies outside the keys, overlapping segments, or a segment whose head_dim
// or dtype differs from the keys.
absl::Status Search(absl::Span<const SearchEntry> entries, const SearchOptions& options,
                    ThreadPool* pool, std::vector<std::vector<int32_t>>* out);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_INDEX_H_
