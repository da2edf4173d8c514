// Internals shared by the index implementations: the per-entry search context, scored units
// ("hits") that segments produce, and the merge that turns hits of all segments into one
// selection. Not part of the public API.
#ifndef KVRECALL_INDEXER_INTERNAL_SEARCH_H_
#define KVRECALL_INDEXER_INTERNAL_SEARCH_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "indexer/index.h"
#include "indexer/internal/serial.h"
#include "indexer/kernels.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer::internal {

struct DeferredScore;

struct SegmentSearch {
  const float* scaled_queries = nullptr;  // [group][head_dim], already multiplied by the scale
  const float* unit_queries = nullptr;    // [group][head_dim], each head L2-normalised (0 if zero)
  // bf16 keys: the queries, unscaled, rounded to bf16 (kernels::PackQueriesBf16), for PackedDots;
  // [group][kernels::Bf16Pairs(head_dim)]. `scale` is what scaled_queries are multiplied by.
  const uint32_t* bf16_query_pairs = nullptr;
  float scale = 1;
  int group = 0;
  const PagedRows* keys = nullptr;
  int64_t range_begin = 0;  // retrieval range; hits must lie inside it
  int64_t range_end = 0;
  int64_t k = 0;
  int ctkvr_probe = 0;  // 0 = build default
  kernels::Isa isa = kernels::Isa::kScalar;
  // Where ScorePackedRows leaves its scoring for Search, which scores all deferred rows of one
  // copy together, for every entry of its batch (the rows are read from memory once).
  std::vector<DeferredScore>* deferred = nullptr;
};

// The forms of one entry's queries that a SegmentSearch points to, computed once per search.
// Set fills them from q ([group][keys.head_dim] fp32) and points s at them (scaled_queries,
// unit_queries, bf16_query_pairs for bf16 keys, scale, group, keys); buffers are reused.
struct QueryForms {
  std::vector<float> scaled, unit;   // [group][head_dim]
  std::vector<uint32_t> bf16_pairs;  // bf16 keys: [group][kernels::Bf16Pairs(head_dim)]
  void Set(const float* q, int group, const PagedRows& keys, float scale, SegmentSearch* s);
};

// Rows of a segment's packed copy that one entry's search scores later (SegmentSearch::deferred):
// its Hits number `hits` in the entry's HitsList has its tokens (external, in the copy), units
// and logits' size set; Search fills the logits from the rows [first, first + count) of
// `packed`, then the normalisers plus lse_add, and selects before it drops `keep`.
struct DeferredScore {
  std::shared_ptr<const void> keep;  // owns `packed` and the Hits' tokens
  const uint8_t* packed = nullptr;
  int64_t first = 0;
  int64_t count = 0;
  size_t hits = 0;
  std::vector<double> lse_add;  // [group]
};

// Scored units of one segment (or gap). A unit is one token or a group of tokens (a cluster)
// taken or dropped as a whole, ranked by max_h (logit_h - lse_total_h).
// An allocator whose value-initialisation is default-initialisation: a vector's resize leaves
// new elements unwritten, for buffers whose every producer writes all of what it resizes.
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

struct Hits {
  // All tokens of all units, unit by unit: `tokens`, or, when `external` is set, the
  // `external_size` ids it points to (a segment's own storage, alive during the search).
  std::vector<int32_t> tokens;
  const int32_t* external = nullptr;
  int64_t external_size = 0;
  const int32_t* token_data() const { return external != nullptr ? external : tokens.data(); }
  int64_t token_count() const {
    return external != nullptr ? external_size : static_cast<int64_t>(tokens.size());
  }
  std::vector<int32_t> unit_end;  // empty: one token per unit; else unit u = [end[u-1], end[u])
  // [group][units] scaled logits (a cluster: of its centroid). Every producer resizes it and
  // writes all of it, so a resize does not zero-fill (that was ~4 % of a decode step's samples:
  // tens of KiB per search, written again at once by the scoring).
  std::vector<float, UninitAllocator<float>> logits;
  int64_t units = 0;
  std::vector<double> lse;  // [group] log Σ exp(logit) over the tokens these hits stand for
};

// Hits of one entry's search. Elements are reused across calls (Reset keeps their buffers), so
// a thread-local HitsList makes the hot path allocation-free. Add may move earlier elements:
// finish with a Hits before adding the next.
class HitsList {
 public:
  Hits* Add() {
    if (n_ == items_.size()) items_.emplace_back();
    Hits* h = &items_[n_++];
    h->tokens.clear();
    h->external = nullptr;
    h->external_size = 0;
    h->unit_end.clear();
    // logits keeps its old size and buffer (see Hits::logits).
    h->units = 0;
    h->lse.clear();
    return h;
  }
  void PopBack() { --n_; }
  void Reset() { n_ = 0; }
  size_t size() const { return n_; }
  Hits* at(size_t i) { return &items_[i]; }
  absl::Span<const Hits> view() const { return {items_.data(), n_}; }

 private:
  std::vector<Hits> items_;
  size_t n_ = 0;
};

// Scaled logits of the packed rows [first, first + n) (kernels::PackRows of s.keys' dtype):
// out[h * ld + i], h < s.group. bf16 keys: PackedQueryDotsBf16 of s.bf16_query_pairs times
// s.scale; otherwise PackedQueryDots of s.scaled_queries.
void PackedDots(const SegmentSearch& s, const uint8_t* packed, int64_t first, int64_t n, float* out,
                int64_t ld);
// Scores tokens [begin, end) of s.keys exactly (one unit per token).
void ExactHits(const SegmentSearch& s, int64_t begin, int64_t end, Hits* out);
// Scores the given tokens (ascending, inside the range) exactly; lse over them only.
void ScoreTokens(const SegmentSearch& s, const std::vector<int32_t>& tokens, Hits* out);
// Adds to `out` the hits of tokens[first, first + n) (ascending, inside the range) whose key
// rows are packed (kernels::PackRows) as rows [first, first + n) of `packed`, e.g. a segment's
// copy of them, each head's normaliser plus lse_add[h] (group values). `keep` owns tokens and
// packed. The logits and normalisers come later, in Search (s.deferred; DeferredScore).
// ScoreTokens packs its gathered rows and scores them the same way: both give the same bits.
void ScorePackedRows(const SegmentSearch& s, std::shared_ptr<const void> keep,
                     const int32_t* tokens, const uint8_t* packed, int64_t first, int64_t n,
                     const double* lse_add, HitsList* out);
// out->lse: each head's normaliser over out's logits ([group][units]).
void FinishLse(const SegmentSearch& s, Hits* out);
// log Σ_i exp(x[i]) (vectorised); -inf for n == 0.
double LogSumExp(const float* x, int64_t n, kernels::Isa isa);

// Merges hits of all segments of an entry: one normaliser per head over all of them, units
// ranked by max_h (logit - lse_h) (ties: lower first token), taken whole until k tokens (the last
// one truncated, lowest ids first). *out: ascending ids; with `scores`, in no particular order and
// (*scores)[j] the rank value of (*out)[j] (its unit's), for the caller to rank (AddSuccessors).
void SelectFromHits(absl::Span<const Hits> hits, int group, int64_t k, std::vector<int32_t>* out,
                    std::vector<float>* scores = nullptr);

// SearchEntry::successors: the `successors` best of the selection `ids` (any order, `scores`
// parallel; at most a (1 + kSuccessorSpan)-th of max(k, ids.size()) of them) each bring the
// kSuccessorSpan tokens after them that lie in [range_begin, range_end); room is made by
// dropping the lowest-scored other picks, so the selection stays at most max(k, ids.size()).
// Ascending on return.
inline constexpr int kSuccessorSpan = 2;
void AddSuccessors(const std::vector<float>& scores, int successors, int64_t range_begin,
                   int64_t range_end, int64_t k, std::vector<int32_t>* ids);

// SelectFromHits then AddSuccessors (same arguments): the same ids, ascending. When every unit
// is one token (ctkvr, exact) it selects twice from the ranking instead of ranking the picks.
void SelectWithSuccessors(absl::Span<const Hits> hits, int group, int64_t k, int successors,
                          int64_t range_begin, int64_t range_end, std::vector<int32_t>* out);

// Row pointers for tokens [begin, end) / for the listed tokens.
void RowPointers(const PagedRows& keys, int64_t begin, int64_t end,
                 std::vector<const uint8_t*>* out);

std::unique_ptr<Segment> NewExactSegment(const BuildInput& input);
std::unique_ptr<Segment> NewExactSegment(int64_t begin, int64_t end, int head_dim, DType dtype);

// Parsers of a method's body (the header is already read and checked: begin <= end, head_dim > 0,
// dtype known). nullptr when the body is malformed (the caller answers DATA_LOSS); they read the
// body only, the caller checks that nothing is left.
std::unique_ptr<Segment> ParseCtkvrSegment(ByteReader* r, int64_t begin, int64_t end,
                                           int head_dim, DType dtype);
std::unique_ptr<Segment> ParseClusterSegment(ByteReader* r, int64_t begin, int64_t end,
                                             int head_dim, DType dtype);
absl::StatusOr<std::unique_ptr<Segment>> BuildCtkvrSegment(const BuildInput& input,
                                                           const CtkvrOptions& options,
                                                           ThreadPool* pool);
// A ctkvr segment over input's range with `base`'s prompt centroids (index.h BuildSegmentAfter);
// base must be a ctkvr segment (not a chain) ending where input begins, of input's group.
absl::StatusOr<std::unique_ptr<Segment>> BuildCtkvrSegmentAfter(const Segment& base,
                                                                const BuildInput& input,
                                                                const CtkvrOptions& options,
                                                                ThreadPool* pool);
absl::StatusOr<std::unique_ptr<Segment>> BuildClusterSegment(const BuildInput& input,
                                                             const ClusterOptions& options,
                                                             ThreadPool* pool);

// Spherical k-means (cosine assignment, centroid = mean of raw vectors, empty clusters keep
// their previous centroid). x: [n][d] fp32. Initial centroids: k distinct random rows (seeded).
// Runs at most `iterations` assignment + update rounds and stops after the first round in which
// at most floor(tolerance × n) rows changed cluster (tolerance 0: only when none did). Outputs
// centroids [k][d] (the means of the final assignment) and assign[n]; returns the rounds run.
// k is clamped to [1, n]. Deterministic per seed, independent of the pool (assignments are per
// row, sums are in row order).
int SphericalKMeans(const float* x, int64_t n, int d, int k, int iterations, double tolerance,
                    uint64_t seed, ThreadPool* pool, std::vector<float>* centroids,
                    std::vector<int32_t>* assign);

// A cluster segment's clusters and build statistics, for diagnostics in benchmarks.
struct ClusterInfo {
  // Cluster c holds tokens[offsets[c], offsets[c + 1]) (clustered tokens only; pending appended
  // ones are in no cluster).
  std::vector<int32_t> offsets;
  std::vector<int32_t> tokens;
  int kmeans_runs = 0;            // k-means runs (build chunks + append batches)
  int64_t kmeans_iterations = 0;  // iterations over all runs
};
// False (*info untouched) if `segment` is not a cluster segment.
bool GetClusterInfo(const Segment& segment, ClusterInfo* info);

// Runs fn(i) for every i in [0, n): on `pool` (ThreadPool::ParallelFor) if not null, else here.
void ForEach(ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn);
// Runs fn(begin, end) over [0, n) in chunks of `chunk`, on `pool` if not null.
void ForChunks(ThreadPool* pool, int64_t n, int64_t chunk,
               const std::function<void(int64_t, int64_t)>& fn);

}  // namespace kvrecall::indexer::internal

#endif  // KVRECALL_INDEXER_INTERNAL_SEARCH_H_
