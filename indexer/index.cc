#include "indexer/index.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer {

absl::string_view MethodName(Method m) {
  switch (m) {
    case Method::kExact:
      return "exact";
    case Method::kCtkvr:
      return "ctkvr";
    case Method::kCluster:
      return "cluster";
    case Method::kMerged:
      return "merged";
  }
  return "?";
}

absl::StatusOr<Method> ParseMethod(absl::string_view name) {
  for (Method m : {Method::kExact, Method::kCtkvr, Method::kCluster, Method::kMerged}) {
    if (name == MethodName(m)) return m;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown index method '", name, "' (exact, ctkvr, cluster, merged)"));
}

namespace internal {

void ForEach(ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn) {
  if (pool != nullptr) {
    pool->ParallelFor(n, fn);
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

void ForChunks(ThreadPool* pool, int64_t n, int64_t chunk,
               const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto one = [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); };
  if (pool != nullptr && chunks > 1) {
    pool->ParallelFor(chunks, one);
  } else {
    for (int64_t c = 0; c < chunks; ++c) one(c);
  }
}

void RowPointers(const PagedRows& keys, int64_t begin, int64_t end,
                 std::vector<const uint8_t*>* out) {
  out->resize(static_cast<size_t>(end - begin));
  for (int64_t t = begin; t < end; ++t) (*out)[t - begin] = keys.row(t);
}

double LogSumExp(const float* x, int64_t n, kernels::Isa isa) {
  if (n <= 0) return -std::numeric_limits<double>::infinity();
  const float mx = kernels::MaxValue(x, n, isa);
  return static_cast<double>(mx) + std::log(kernels::SumExp(x, n, mx, isa));
}

void FinishLse(const SegmentSearch& s, Hits* out) {
  const int64_t n = out->units;
  out->lse.resize(static_cast<size_t>(s.group));
  for (int h = 0; h < s.group; ++h) out->lse[h] = LogSumExp(out->logits.data() + h * n, n, s.isa);
}

namespace {

// out's units are `rows` (one token each), scored with their normalisers. `packed`: the rows
// are packed a few tiles at a time and scored as a segment's copies are (PackedDots), so the
// result equals scoring a copy of them; else by the row-wise kernel (fp32 and fp16 only; bf16
// keys always take the packed path, so that an exact scan and an index whose candidates hold
// every token give the same logits).
void FinishHits(const SegmentSearch& s, const std::vector<const uint8_t*>& rows, bool packed,
                Hits* out) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const int d = s.keys->head_dim;
  out->units = n;
  out->unit_end.clear();
  out->logits.resize(static_cast<size_t>(n) * s.group);
  if (packed || s.keys->dtype == DType::kBF16) {
    constexpr int64_t kChunk = 8 * kernels::kPackRows;
    thread_local std::vector<uint8_t> tiles;
    tiles.resize(kernels::PackedRowsBytes(s.keys->dtype, kChunk, d));
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min(kChunk, n - i);
      kernels::PackRows(s.keys->dtype, rows.data() + i, m, d, tiles.data());
      PackedDots(s, tiles.data(), 0, m, out->logits.data() + i, n);
    }
  } else {
    kernels::QueryKeyDots(s.keys->dtype, rows.data(), n, d, s.scaled_queries, s.group,
                          out->logits.data(), n, s.isa);
  }
  FinishLse(s, out);
}

}  // namespace

void QueryForms::Set(const float* q, int group, const PagedRows& keys, float scale,
                     SegmentSearch* s) {
  const int d = keys.head_dim;
  scaled.resize(static_cast<size_t>(group) * d);
  unit.resize(scaled.size());
  for (int h = 0; h < group; ++h) {
    const float* qh = q + static_cast<size_t>(h) * d;
    // Four chains: one sum of d products waits out the add's latency at every term.
    double part[4] = {0, 0, 0, 0};
    int i = 0;
    for (; i + 4 <= d; i += 4) {
      for (int k = 0; k < 4; ++k) part[k] += static_cast<double>(qh[i + k]) * qh[i + k];
    }
    for (; i < d; ++i) part[0] += static_cast<double>(qh[i]) * qh[i];
    const double norm = (part[0] + part[1]) + (part[2] + part[3]);
    const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
    for (int j = 0; j < d; ++j) {
      scaled[static_cast<size_t>(h) * d + j] = qh[j] * scale;
      unit[static_cast<size_t>(h) * d + j] = qh[j] * inv;
    }
  }
  s->scaled_queries = scaled.data();
  s->unit_queries = unit.data();
  s->bf16_query_pairs = nullptr;
  if (keys.dtype == DType::kBF16) {
    bf16_pairs.resize(static_cast<size_t>(group) * kernels::Bf16Pairs(d));
    kernels::PackQueriesBf16(q, group, d, bf16_pairs.data());
    s->bf16_query_pairs = bf16_pairs.data();
  }
  s->scale = scale;
  s->group = group;
  s->keys = &keys;
}

void PackedDots(const SegmentSearch& s, const uint8_t* packed, int64_t first, int64_t n, float* out,
                int64_t ld) {
  const int d = s.keys->head_dim;
  if (s.keys->dtype == DType::kBF16) {
    kernels::PackedQueryDotsBf16(packed, first, n, d, s.bf16_query_pairs, s.group, s.scale, out, ld,
                                 s.isa);
  } else {
    kernels::PackedQueryDots(s.keys->dtype, packed, first, n, d, s.scaled_queries, s.group, out, ld,
                             s.isa);
  }
}

void ExactHits(const SegmentSearch& s, int64_t begin, int64_t end, Hits* out) {
  out->tokens.resize(static_cast<size_t>(end - begin));
  for (int64_t t = begin; t < end; ++t) out->tokens[t - begin] = static_cast<int32_t>(t);
  thread_local std::vector<const uint8_t*> rows;
  RowPointers(*s.keys, begin, end, &rows);
  FinishHits(s, rows, /*packed=*/false, out);
}

void ScoreTokens(const SegmentSearch& s, const std::vector<int32_t>& tokens, Hits* out) {
  thread_local std::vector<const uint8_t*> rows;
  rows.resize(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) rows[i] = s.keys->row(tokens[i]);
  out->tokens.assign(tokens.begin(), tokens.end());
  // Packed like a segment's row copy, so that scoring a copy selects what this gather does.
  FinishHits(s, rows, /*packed=*/true, out);
}

void ScorePackedRows(const SegmentSearch& s, std::shared_ptr<const void> keep,
                     const int32_t* tokens, const uint8_t* packed, int64_t first, int64_t n,
                     const double* lse_add, HitsList* out) {
  Hits* hits = out->Add();
  hits->external = tokens + first;  // alive while `keep` is, i.e. until Search has selected
  hits->external_size = n;
  hits->units = n;
  hits->logits.resize(static_cast<size_t>(n) * s.group);
  DeferredScore d;
  d.keep = std::move(keep);
  d.packed = packed;
  d.first = first;
  d.count = n;
  d.hits = out->size() - 1;
  d.lse_add.assign(lse_add, lse_add + s.group);
  s.deferred->push_back(std::move(d));
}

namespace {

// Hits of one entry ranked: the non-empty ones in token order, and v[u] = max_h (logit_h - lse_h)
// over all units in that order, with one normaliser per head over all hits.
struct RankedHits {
  std::vector<const Hits*> hits;
  bool single = true;  // every unit is one token
  int64_t total_units = 0, total_tokens = 0;
  std::vector<float>* v = nullptr;  // thread-local scratch, total_units values
};

void RankHits(absl::Span<const Hits> hits_in, int group, RankedHits* r) {
  const kernels::Isa isa = kernels::BestIsa();
  r->hits.clear();
  for (const Hits& h : hits_in)
    if (h.units > 0) r->hits.push_back(&h);
  std::vector<const Hits*>& hits = r->hits;
  std::sort(hits.begin(), hits.end(),
            [](const Hits* a, const Hits* b) { return a->token_data()[0] < b->token_data()[0]; });
  thread_local std::vector<float> shift;
  shift.assign(static_cast<size_t>(group), -std::numeric_limits<float>::infinity());
  for (int h = 0; h < group; ++h) {
    double mx = -std::numeric_limits<double>::infinity();
    for (const Hits* x : hits) mx = std::max(mx, x->lse[h]);
    if (!std::isfinite(mx)) continue;
    double z = 0;
    for (const Hits* x : hits) z += std::exp(x->lse[h] - mx);
    shift[h] = static_cast<float>(mx + std::log(z));
  }
  r->single = true;
  r->total_units = r->total_tokens = 0;
  for (const Hits* x : hits) {
    r->single = r->single && x->unit_end.empty();
    r->total_units += x->units;
    r->total_tokens += x->token_count();
  }
  thread_local std::vector<float> v;
  v.resize(static_cast<size_t>(r->total_units));
  r->v = &v;
  float* dst = v.data();
  for (const Hits* x : hits) {
    kernels::MaxShifted(x->logits.data(), x->units, group, shift.data(), x->units, dst, isa);
    dst += x->units;
  }
}

// The token of each position of a single (one token per unit) ranking: ascending.
const int32_t* PositionTokens(const RankedHits& r) {
  if (r.hits.size() == 1) return r.hits[0]->token_data();
  thread_local std::vector<int32_t> tokens;
  tokens.clear();
  for (const Hits* x : r.hits)
    tokens.insert(tokens.end(), x->token_data(), x->token_data() + x->units);
  return tokens.data();
}

// SelectFromHits' selection from the ranking.
void SelectRanked(const RankedHits& ranked, int64_t k, std::vector<int32_t>* out,
                  std::vector<float>* scores) {
  out->clear();
  if (scores != nullptr) scores->clear();
  if (k <= 0 || ranked.total_tokens == 0) return;
  const std::vector<const Hits*>& hits = ranked.hits;
  const std::vector<float>& v = *ranked.v;
  const int64_t total_units = ranked.total_units;
  if (ranked.single) {
    thread_local std::vector<int32_t> idx;
    kernels::TopK(v.data(), total_units, k, &idx);
    const int32_t* tok = PositionTokens(ranked);  // ascending, like idx
    out->reserve(idx.size());
    for (int32_t i : idx) {
      out->push_back(tok[i]);
      if (scores != nullptr) scores->push_back(v[i]);
    }
    return;
  }
  size_t at = 0;
  struct Unit {
    float v;
    int32_t first;
    const int32_t* begin;
    const int32_t* end;
  };
  thread_local std::vector<Unit> units;
  units.clear();
  units.reserve(static_cast<size_t>(total_units));
  for (const Hits* x : hits) {
    const int32_t* tok = x->token_data();
    for (int64_t u = 0; u < x->units; ++u) {
      const int32_t b =
          x->unit_end.empty() ? static_cast<int32_t>(u) : (u == 0 ? 0 : x->unit_end[u - 1]);
      const int32_t e = x->unit_end.empty() ? static_cast<int32_t>(u + 1) : x->unit_end[u];
      if (e > b) units.push_back(Unit{v[at + u], tok[b], tok + b, tok + e});
    }
    at += static_cast<size_t>(x->units);
  }
  // Best units first (ties: lower first token), popped from a heap only until the budget is full.
  auto worse = [](const Unit& a, const Unit& b) {
    return a.v < b.v || (a.v == b.v && a.first > b.first);
  };
  std::make_heap(units.begin(), units.end(), worse);
  auto end = units.end();
  while (end != units.begin() && static_cast<int64_t>(out->size()) < k) {
    std::pop_heap(units.begin(), end, worse);
    --end;
    for (const int32_t* t = end->begin; t != end->end && static_cast<int64_t>(out->size()) < k; ++t) {
      out->push_back(*t);
      if (scores != nullptr) scores->push_back(end->v);
    }
  }
  // With scores the caller ranks the picks itself (AddSuccessors): they stay as popped.
  if (scores == nullptr) std::sort(out->begin(), out->end());
}

}  // namespace

void SelectFromHits(absl::Span<const Hits> hits, int group, int64_t k, std::vector<int32_t>* out,
                    std::vector<float>* scores) {
  thread_local RankedHits ranked;
  RankHits(hits, group, &ranked);
  SelectRanked(ranked, k, out, scores);
}

namespace {

// *kept = the tokens token_of(p) for p in `picks` and the kSuccessorSpan tokens after each that
// lie in [range_begin, range_end), ascending and distinct.
template <typename Picks, typename TokenOf>
void WithSuccessors(const Picks& picks, TokenOf token_of, int64_t range_begin, int64_t range_end,
                    std::vector<int32_t>* kept) {
  kept->clear();
  for (const auto p : picks) {
    const int64_t t0 = token_of(p);
    kept->push_back(static_cast<int32_t>(t0));
    for (int64_t t = std::max(t0 + 1, range_begin); t <= t0 + kSuccessorSpan && t < range_end; ++t)
      kept->push_back(static_cast<int32_t>(t));
  }
  std::sort(kept->begin(), kept->end());
  kept->erase(std::unique(kept->begin(), kept->end()), kept->end());
}

}  // namespace

void AddSuccessors(const std::vector<float>& scores_in, int successors, int64_t range_begin,
                   int64_t range_end, int64_t k, std::vector<int32_t>* ids) {
  const size_t n = ids->size();
  if (successors <= 0 || n == 0) {
    std::sort(ids->begin(), ids->end());
    return;
  }
  // The picks ascending by id, with their scores (SelectFromHits' single path already gives
  // them so; its unit path gives them as popped).
  const float* score = scores_in.data();
  thread_local std::vector<float> sorted_scores;
  if (!std::is_sorted(ids->begin(), ids->end())) {
    thread_local std::vector<std::pair<int32_t, float>> pairs;
    pairs.resize(n);
    for (size_t j = 0; j < n; ++j) pairs[j] = {(*ids)[j], scores_in[j]};
    std::sort(pairs.begin(), pairs.end());
    sorted_scores.resize(n);
    for (size_t j = 0; j < n; ++j) std::tie((*ids)[j], sorted_scores[j]) = pairs[j];
    score = sorted_scores.data();
  }
  const int32_t* id = ids->data();
  // Rank: score descending, then id ascending - a strict total order, as ids are distinct.
  auto better = [&](uint32_t a, uint32_t b) {
    return score[a] > score[b] || (score[a] == score[b] && id[a] < id[b]);
  };
  // At most max(k, n) tokens in all; the best picks and their successors take at most all of it.
  const size_t cap = std::max(static_cast<size_t>(std::max<int64_t>(k, 0)), n);
  const size_t best =
      std::min({n, static_cast<size_t>(successors), cap / (1 + kSuccessorSpan)});
  // The `count` positions that rank highest (`keep_better`) or lowest, by one pass with a heap
  // whose top is the weakest kept.
  thread_local std::vector<uint32_t> heap;
  auto extreme = [&](size_t count, bool keep_better, auto&& eligible) {
    heap.clear();
    if (count == 0) return;
    auto weaker = [&](uint32_t a, uint32_t b) { return keep_better ? better(a, b) : better(b, a); };
    for (uint32_t j = 0; j < n; ++j) {
      if (!eligible(j)) continue;
      if (heap.size() < count) {
        heap.push_back(j);
        std::push_heap(heap.begin(), heap.end(), weaker);
      } else if (weaker(j, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), weaker);
        heap.back() = j;
        std::push_heap(heap.begin(), heap.end(), weaker);
      }
    }
  };
  // Kept first: the best picks and their successors (ascending).
  extreme(best, /*keep_better=*/true, [](uint32_t) { return true; });
  thread_local std::vector<int32_t> kept;
  WithSuccessors(
      heap, [&](uint32_t j) { return id[j]; }, range_begin, range_end, &kept);
  // The other picks stay while there is room: the lowest-ranked `drop` of them go.
  thread_local std::vector<char> in_kept;
  in_kept.assign(n, 0);
  size_t others = n;
  for (size_t j = 0, r = 0; j < n && r < kept.size(); ++j) {
    while (r < kept.size() && kept[r] < id[j]) ++r;
    if (r < kept.size() && kept[r] == id[j]) {
      in_kept[j] = 1;
      --others;
    }
  }
  const size_t room = cap - std::min(cap, kept.size());
  const size_t drop = others > room ? others - room : 0;
  extreme(drop, /*keep_better=*/false, [&](uint32_t j) { return !in_kept[j]; });
  for (uint32_t j : heap) in_kept[j] = 2;  // dropped
  // Merged ascending: the kept tokens and the other picks that stay.
  thread_local std::vector<int32_t> out;
  out.clear();
  size_t r = 0;
  for (size_t j = 0; j < n; ++j) {
    if (in_kept[j] != 0) continue;  // kept: merged from `kept`; dropped: gone
    while (r < kept.size() && kept[r] < id[j]) out.push_back(kept[r++]);
    out.push_back(id[j]);
  }
  out.insert(out.end(), kept.begin() + static_cast<int64_t>(r), kept.end());
  ids->assign(out.begin(), out.end());
}

void SelectWithSuccessors(absl::Span<const Hits> hits_in, int group, int64_t k, int successors,
                          int64_t range_begin, int64_t range_end, std::vector<int32_t>* out) {
  thread_local RankedHits ranked;
  RankHits(hits_in, group, &ranked);
  if (!ranked.single || successors <= 0 || k <= 0 || ranked.total_tokens == 0) {
    thread_local std::vector<float> scores;
    SelectRanked(ranked, k, out, &scores);
    AddSuccessors(scores, successors, range_begin, range_end, k, out);
    return;
  }
  // AddSuccessors over the top k, in two selections: the picks P are the top min(k, n) of the n
  // tokens; the kept K are the `best` top tokens with their successors; the rest of the result
  // is the top min(k - |K|, |P \ K|) of P \ K, which is the top min(k - |K|, n - |C ∩ K|) of the
  // candidates C outside K (each of those has fewer than k - |K| + |K| better ones, so it is in
  // P). Ties fall as in AddSuccessors: both rank by (value desc, token asc), and positions are in
  // token order.
  const int64_t n = ranked.total_units;
  const std::vector<float>& v = *ranked.v;
  const int32_t* tok = PositionTokens(ranked);
  const int64_t picks = std::min(k, n);
  const int64_t best = std::min<int64_t>({picks, successors, k / (1 + kSuccessorSpan)});
  thread_local std::vector<int32_t> top, kept;
  kernels::TopK(v.data(), n, best, &top);
  WithSuccessors(
      top, [&](int32_t p) { return tok[p]; }, range_begin, range_end, &kept);
  // The second selection is over the candidates outside K, copied out between K's positions
  // (a marker value could tie with a real one, e.g. -inf). K is a few dozen tokens, the
  // candidates thousands: K's positions are found by search, the rest copied in runs.
  thread_local std::vector<int64_t> k_pos;  // ascending
  k_pos.clear();
  for (const int32_t* lo = tok; int32_t t : kept) {
    lo = std::lower_bound(lo, tok + n, t);
    if (lo == tok + n) break;
    if (*lo == t) k_pos.push_back(lo - tok);
  }
  thread_local std::vector<float> rest_v;
  rest_v.resize(static_cast<size_t>(n) - k_pos.size());
  float* dst = rest_v.data();
  int64_t from = 0;
  for (int64_t p : k_pos) {
    dst = std::copy(v.data() + from, v.data() + p, dst);
    from = p + 1;
  }
  std::copy(v.data() + from, v.data() + n, dst);
  const int64_t room = k - std::min<int64_t>(k, static_cast<int64_t>(kept.size()));
  const int64_t rest = static_cast<int64_t>(rest_v.size());
  kernels::TopK(rest_v.data(), rest, std::min(room, rest), &top);
  // Back to positions (`top` ascending): rest index i is position i + the K positions before it.
  for (size_t q = 0; int32_t & p : top) {
    while (q < k_pos.size() && k_pos[q] <= p + static_cast<int64_t>(q)) ++q;
    p += static_cast<int32_t>(q);
  }
  // Merged ascending (disjoint: `top` holds no token of K).
  out->resize(kept.size() + top.size());
  int32_t* o = out->data();
  size_t r = 0;
  for (int32_t p : top) {
    const int32_t t = tok[p];
    while (r < kept.size() && kept[r] < t) *o++ = kept[r++];
    *o++ = t;
  }
  std::copy(kept.begin() + static_cast<int64_t>(r), kept.end(), o);
}

namespace {

class ExactSegment final : public Segment {
 public:
  explicit ExactSegment(const BuildInput& in)
      : Segment(in.token_begin, in.token_end, in.keys->head_dim, in.keys->dtype) {}
  ExactSegment(int64_t begin, int64_t end, int head_dim, DType dtype)
      : Segment(begin, end, head_dim, dtype) {}
  Method method() const override { return Method::kExact; }
  std::unique_ptr<Segment> Clone() const override { return std::make_unique<ExactSegment>(*this); }
  void SerializeInternal(ByteWriter*) const override {}
  absl::Status Append(const PagedRows& keys, int64_t new_end, ThreadPool* pool) override {
    if (keys.head_dim != head_dim_ || keys.dtype != dtype_ || new_end < end_ ||
        new_end > keys.num_tokens) {
      return absl::InvalidArgumentError("append: shape mismatch or end outside the keys");
    }
    end_ = new_end;
    return absl::OkStatus();
  }
  size_t MemoryBytes() const override { return 0; }
  absl::Status SearchInternal(const SegmentSearch& s, HitsList* out) const override {
    const int64_t b = std::max(begin_, s.range_begin), e = std::min(end_, s.range_end);
    if (b >= e) return absl::OkStatus();
    ExactHits(s, b, e, out->Add());
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Segment> NewExactSegment(const BuildInput& input) {
  return std::make_unique<ExactSegment>(input);
}

std::unique_ptr<Segment> NewExactSegment(int64_t begin, int64_t end, int head_dim, DType dtype) {
  return std::make_unique<ExactSegment>(begin, end, head_dim, dtype);
}

namespace {

constexpr uint8_t kChainKind = 0x80;
constexpr char kSegmentMagic[4] = {'K', 'S', 'G', '3'};  // 3: ctkvr added centroids, neighbours

class ChainSegment final : public Segment {
 public:
  explicit ChainSegment(std::vector<std::shared_ptr<const Segment>> parts)
      : Segment(parts.front()->token_begin(), parts.back()->token_end(), parts.front()->head_dim(),
                parts.front()->dtype()),
        method_(parts.front()->method()),
        parts_(std::move(parts)) {}
  Method method() const override { return method_; }
  absl::Status Append(const PagedRows&, int64_t, ThreadPool*) override {
    return absl::FailedPreconditionError(
        "a segment chain does not grow in place: make a new chain with a new last part");
  }
  size_t MemoryBytes() const override {
    size_t n = 0;
    for (const auto& p : parts_) n += p->MemoryBytes();
    return n;
  }
  std::unique_ptr<Segment> Clone() const override { return std::make_unique<ChainSegment>(*this); }
  void SerializeInternal(ByteWriter* w) const override {
    w->U32(static_cast<uint32_t>(parts_.size()));
    for (const auto& p : parts_) w->Bytes(SerializeSegment(*p));
  }
  absl::Status SearchInternal(const SegmentSearch& s, HitsList* out) const override {
    for (const auto& p : parts_) {
      if (std::max(p->token_begin(), s.range_begin) >= std::min(p->token_end(), s.range_end)) {
        continue;
      }
      RETURN_IF_ERROR(p->SearchInternal(s, out));
    }
    return absl::OkStatus();
  }
  const std::vector<std::shared_ptr<const Segment>>& parts() const { return parts_; }

 private:
  Method method_;
  std::vector<std::shared_ptr<const Segment>> parts_;
};

}  // namespace

}  // namespace internal

namespace {

absl::Status ValidateKeys(const PagedRows* keys) {
  if (keys == nullptr) return absl::InvalidArgumentError("null keys");
  if (keys->head_dim <= 0) return absl::InvalidArgumentError("head_dim must be > 0");
  if (keys->num_tokens < 0) return absl::InvalidArgumentError("negative num_tokens");
  if (keys->num_tokens > 0) {
    if (keys->page_tokens <= 0) return absl::InvalidArgumentError("page_tokens must be > 0");
    if (keys->row_stride < static_cast<size_t>(keys->head_dim) * DTypeSize(keys->dtype)) {
      return absl::InvalidArgumentError("row_stride smaller than a row");
    }
    const int64_t pages = (keys->num_tokens + keys->page_tokens - 1) / keys->page_tokens;
    if (keys->num_pages() < pages) {
      return absl::InvalidArgumentError(absl::StrCat(keys->num_tokens, " tokens need ", pages,
                                                     " pages, got ", keys->num_pages()));
    }
  }
  if (keys->num_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("more than 2^31-1 tokens");
  }
  return absl::OkStatus();
}

absl::Status ValidateEntry(const SearchEntry& e, std::vector<const Segment*>* sorted) {
  RETURN_IF_ERROR(ValidateKeys(e.keys));
  if (e.queries == nullptr) return absl::InvalidArgumentError("null queries");
  if (e.group <= 0) return absl::InvalidArgumentError("group must be > 0");
  if (e.k < 0) return absl::InvalidArgumentError("k must be >= 0");
  if (e.successors < 0) return absl::InvalidArgumentError("successors must be >= 0");
  if (!(e.scale >= 0) || !std::isfinite(e.scale))
    return absl::InvalidArgumentError("scale must be finite and >= 0");
  if (e.token_begin < 0 || e.token_begin > e.token_end || e.token_end > e.keys->num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token range [", e.token_begin, ", ",
                                                   e.token_end, ") outside [0, ",
                                                   e.keys->num_tokens, ")"));
  }
  const int64_t nq = static_cast<int64_t>(e.group) * e.keys->head_dim;
  for (int64_t i = 0; i < nq; ++i) {
    if (!std::isfinite(e.queries[i]))
      return absl::InvalidArgumentError("queries contain NaN or Inf");
  }
  *sorted = e.segments;
  for (const Segment* s : *sorted) {
    if (s == nullptr) return absl::InvalidArgumentError("null segment");
    if (s->head_dim() != e.keys->head_dim || s->dtype() != e.keys->dtype) {
      return absl::InvalidArgumentError("segment head_dim/dtype differ from the keys");
    }
    if (s->token_end() > e.keys->num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("segment [", s->token_begin(), ", ",
                                                     s->token_end(), ") outside the ",
                                                     e.keys->num_tokens, " keys"));
    }
  }
  std::sort(sorted->begin(), sorted->end(),
            [](const Segment* a, const Segment* b) { return a->token_begin() < b->token_begin(); });
  for (size_t i = 1; i < sorted->size(); ++i) {
    if ((*sorted)[i]->token_begin() < (*sorted)[i - 1]->token_end()) {
      return absl::InvalidArgumentError("segments overlap");
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// One entry's search across Search's phases.
struct EntrySearch {
  internal::QueryForms forms;
  internal::SegmentSearch s;
  internal::HitsList hits;
  std::vector<internal::DeferredScore> deferred;
  absl::Status status;
  bool take_all = false;  // exact, and the range fits the budget: no scoring
};

// Rows a scoring job of Search's second phase reads before the next entry's queries take them:
// a few tiles, so that they stay in the L1 cache across the entries that deferred them.
constexpr int64_t kSubRows = 4 * kernels::kPackRows;
// A scoring job (a unit of parallel work): up to this many rows for up to this many entries.
constexpr int64_t kJobRows = 32 * kernels::kPackRows;
constexpr size_t kJobEntries = 16;

struct DeferredRef {  // entry `entry`'s deferred scoring number `item`
  const uint8_t* packed;
  uint32_t entry, item;
};

// Entries of a scoring job stacked kStack at a time (consecutive refs, all over one copy) so that
// one AMX instruction scores a tile for all their queries (kernels::StackedQueryDotsBf16).
constexpr size_t kStack = kernels::kStackedGroups;
class StackedScoring {
 public:
  // Stacks the queries of refs [begin, end): stack k holds refs begin + kStack * k onward.
  void Prepare(std::vector<EntrySearch>& st, const DeferredRef* refs, size_t begin, size_t end) {
    st_ = &st;
    refs_ = refs + begin;
    n_ = end - begin;
    const EntrySearch& first = st[refs_[0].entry];
    const internal::SegmentSearch& s = first.s;
    head_dim_ = s.keys->head_dim;
    enabled_ =
        s.keys->dtype == DType::kBF16 && s.group == 4 && kernels::CanStackQueries(s.isa, head_dim_);
    for (size_t i = 1; enabled_ && i < n_; ++i) {
      const internal::SegmentSearch& o = st[refs_[i].entry].s;
      enabled_ = o.group == 4 && o.keys->dtype == DType::kBF16 && o.keys->head_dim == head_dim_ &&
                 o.isa == s.isa;
    }
    if (!enabled_) return;
    const size_t pairs = static_cast<size_t>(kernels::Bf16Pairs(head_dim_));
    const size_t stacks = (n_ + kStack - 1) / kStack;
    queries_.assign(stacks * kernels::kStackedQueries * pairs, 0);  // absent entries: zero rows
    for (size_t i = 0; i < n_; ++i) {
      const internal::SegmentSearch& o = st[refs_[i].entry].s;
      std::memcpy(queries_.data() + i * 4 * pairs, o.bf16_query_pairs, 4 * pairs * 4);
    }
  }
  bool enabled() const { return enabled_; }
  // Logits of tiles [t0, t1) for the refs of the stack at `first` whose range meets [r0, r1):
  // every such range holds the tiles whole.
  void Score(size_t first, int64_t t0, int64_t t1, int64_t r0, int64_t r1) {
    const size_t pairs = static_cast<size_t>(kernels::Bf16Pairs(head_dim_));
    kernels::StackedGroupOut outs[kernels::kStackedGroups];
    const uint8_t* packed = nullptr;
    for (size_t i = first; i < std::min(n_, first + kStack); ++i) {
      EntrySearch& es = (*st_)[refs_[i].entry];
      const internal::DeferredScore& d = es.deferred[refs_[i].item];
      packed = d.packed;
      if (std::max(r0, d.first) >= std::min(r1, d.first + d.count)) continue;
      outs[i - first] = {es.hits.at(d.hits)->logits.data() + (t0 * kernels::kPackRows - d.first),
                         d.count, es.s.scale};
    }
    kernels::StackedQueryDotsBf16(packed, t0, t1 - t0, head_dim_,
                                  queries_.data() + first * 4 * pairs, outs);
  }

 private:
  std::vector<EntrySearch>* st_ = nullptr;
  const DeferredRef* refs_ = nullptr;
  size_t n_ = 0;
  int head_dim_ = 0;
  bool enabled_ = false;
  std::vector<uint32_t> queries_;  // [stacks][kStackedQueries][pairs]
};

// Scores every deferred row range of the batch: all ranges over one copy together, the copy
// read tile by tile and each tile scored for every entry whose range holds it.
void ScoreDeferred(std::vector<EntrySearch>& st, size_t n, ThreadPool* pool) {
  using Ref = DeferredRef;
  std::vector<Ref> refs;
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < st[i].deferred.size(); ++k)
      refs.push_back(
          {st[i].deferred[k].packed, static_cast<uint32_t>(i), static_cast<uint32_t>(k)});
  if (refs.empty()) return;
  // Grouped by copy; within a copy in entry order, as collected.
  std::stable_sort(refs.begin(), refs.end(), [](const Ref& a, const Ref& b) {
    return std::less<const uint8_t*>()(a.packed, b.packed);
  });
  struct Job {
    size_t ref_begin, ref_end;
    int64_t row_begin, row_end;
  };
  std::vector<Job> jobs;
  for (size_t b = 0; b < refs.size();) {
    size_t e = b;
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (; e < refs.size() && refs[e].packed == refs[b].packed; ++e) {
      const internal::DeferredScore& d = st[refs[e].entry].deferred[refs[e].item];
      lo = std::min(lo, d.first);
      hi = std::max(hi, d.first + d.count);
    }
    for (int64_t r = lo; r < hi;) {
      const int64_t next = std::min(hi, (r / kJobRows + 1) * kJobRows);
      for (size_t x = b; x < e; x += kJobEntries) jobs.push_back({x, std::min(e, x + kJobEntries), r, next});
      r = next;
    }
    b = e;
  }
  // Scores rows [lo, hi) of ref x's range.
  auto score = [&](size_t x, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    EntrySearch& es = st[refs[x].entry];
    const internal::DeferredScore& d = es.deferred[refs[x].item];
    internal::Hits* h = es.hits.at(d.hits);
    internal::PackedDots(es.s, d.packed, lo, hi - lo, h->logits.data() + (lo - d.first), d.count);
  };
  auto run = [&](int64_t j) {
    const Job& job = jobs[j];
    thread_local StackedScoring stacked;  // its buffer reused across jobs
    stacked.Prepare(st, refs.data(), job.ref_begin, job.ref_end);
    for (int64_t r0 = job.row_begin; r0 < job.row_end;) {
      const int64_t r1 = std::min(job.row_end, (r0 / kSubRows + 1) * kSubRows);
      for (size_t x0 = job.ref_begin; x0 < job.ref_end; x0 += kStack) {
        const size_t x1 = std::min(job.ref_end, x0 + kStack);
        // Tiles whole inside every range of the stack that meets [r0, r1); the rest one by one.
        int64_t t0 = 0, t1 = 0;
        if (stacked.enabled()) {
          t0 = (r0 + kernels::kPackRows - 1) / kernels::kPackRows;
          t1 = r1 / kernels::kPackRows;
          int active = 0;
          for (size_t x = x0; x < x1; ++x) {
            const internal::DeferredScore& d = st[refs[x].entry].deferred[refs[x].item];
            if (std::max(r0, d.first) >= std::min(r1, d.first + d.count)) continue;
            ++active;
            t0 = std::max(t0, (d.first + kernels::kPackRows - 1) / kernels::kPackRows);
            t1 = std::min(t1, (d.first + d.count) / kernels::kPackRows);
          }
          if (active < 2) t1 = t0;  // one entry alone: its own 4-query call
        }
        if (t0 < t1) stacked.Score(x0 - job.ref_begin, t0, t1, r0, r1);
        for (size_t x = x0; x < x1; ++x) {
          const internal::DeferredScore& d = st[refs[x].entry].deferred[refs[x].item];
          const int64_t lo = std::max(r0, d.first), hi = std::min(r1, d.first + d.count);
          if (t0 < t1) {
            score(x, lo, std::min(hi, t0 * kernels::kPackRows));
            score(x, std::max(lo, t1 * kernels::kPackRows), hi);
          } else {
            score(x, lo, hi);
          }
        }
      }
      r0 = r1;
    }
  };
  internal::ForEach(pool, static_cast<int64_t>(jobs.size()), run);
}

}  // namespace

absl::Status Search(absl::Span<const SearchEntry> entries, const SearchOptions& options,
                    ThreadPool* pool, std::vector<std::vector<int32_t>>* out) {
  std::vector<std::vector<const Segment*>> sorted(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    if (absl::Status st = ValidateEntry(entries[i], &sorted[i]); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("entry ", i, ": ", st.message()));
    }
  }
  if (options.ctkvr_probe < 0) return absl::InvalidArgumentError("ctkvr_probe must be >= 0");
  std::vector<std::vector<int32_t>> result(entries.size());
  auto whole = [&](size_t i) {
    return sorted[i].empty() && entries[i].token_end - entries[i].token_begin <= entries[i].k;
  };
  auto take_whole = [&](size_t i) {
    result[i].resize(static_cast<size_t>(entries[i].token_end - entries[i].token_begin));
    std::iota(result[i].begin(), result[i].end(), static_cast<int32_t>(entries[i].token_begin));
  };
  // A call whose every entry is taken whole (see below) needs neither scoring nor the pool.
  bool all_whole = true;
  for (size_t i = 0; i < entries.size() && all_whole; ++i) all_whole = whole(i);
  if (all_whole) {
    for (size_t i = 0; i < entries.size(); ++i) take_whole(i);
    *out = std::move(result);
    return absl::OkStatus();
  }
  const kernels::Isa isa = kernels::BestIsa();
  // Per-entry state, reused across this thread's calls (pool threads reach it through `st`).
  thread_local std::vector<EntrySearch> states;
  if (states.size() < entries.size()) states.resize(entries.size());
  std::vector<EntrySearch>& st = states;
  const int64_t n = static_cast<int64_t>(entries.size());
  absl::Time t = absl::Now();
  auto lap = [&](int64_t SearchTimes::*field) {
    if (options.times == nullptr) return;
    const absl::Time now = absl::Now();
    options.times->*field += absl::ToInt64Nanoseconds(now - t);
    t = now;
  };
  // 1. Each entry searches its segments; scoring over row copies is deferred to 2.
  internal::ForEach(pool, n, [&](int64_t i) {
    const SearchEntry& e = entries[i];
    EntrySearch& es = st[i];
    es.status = absl::OkStatus();
    es.hits.Reset();
    es.deferred.clear();
    // An exact entry whose whole range fits the budget takes it whole: every candidate is in
    // any top-k then (and every successor too), so nothing needs scoring.
    es.take_all = whole(static_cast<size_t>(i));
    if (es.take_all) return;
    const int d = e.keys->head_dim;
    const float scale =
        e.scale > 0 ? e.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    internal::SegmentSearch& s = es.s;
    s = internal::SegmentSearch();
    es.forms.Set(e.queries, e.group, *e.keys, scale, &s);
    s.range_begin = e.token_begin;
    s.range_end = e.token_end;
    s.k = e.k;
    s.ctkvr_probe = options.ctkvr_probe;
    s.isa = isa;
    s.deferred = &es.deferred;
    int64_t cursor = e.token_begin;
    for (const Segment* seg : sorted[i]) {
      const int64_t b = std::max(seg->token_begin(), e.token_begin),
                    en = std::min(seg->token_end(), e.token_end);
      if (b >= en) continue;
      if (cursor < b) internal::ExactHits(s, cursor, b, es.hits.Add());
      if (absl::Status status = seg->SearchInternal(s, &es.hits); !status.ok()) {
        es.status = status;
        return;
      }
      cursor = std::max(cursor, en);
    }
    if (cursor < e.token_end) internal::ExactHits(s, cursor, e.token_end, es.hits.Add());
  });
  lap(&SearchTimes::select_nanos);
  // 2. The deferred scoring, copy by copy.
  ScoreDeferred(st, entries.size(), pool);
  lap(&SearchTimes::score_nanos);
  // 3. Each entry's normalisers and selection; then the copies its hits point into are released.
  internal::ForEach(pool, n, [&](int64_t i) {
    const SearchEntry& e = entries[i];
    EntrySearch& es = st[i];
    if (es.take_all) {
      take_whole(static_cast<size_t>(i));
    } else if (es.status.ok()) {
      for (const internal::DeferredScore& ds : es.deferred) {
        internal::Hits* h = es.hits.at(ds.hits);
        internal::FinishLse(es.s, h);
        for (int g = 0; g < e.group; ++g) h->lse[g] += ds.lse_add[g];
      }
      if (e.successors > 0) {
        internal::SelectWithSuccessors(es.hits.view(), e.group, e.k, e.successors, e.token_begin,
                                       e.token_end, &result[i]);
      } else {
        internal::SelectFromHits(es.hits.view(), e.group, e.k, &result[i]);
      }
    }
    es.deferred.clear();
  });
  lap(&SearchTimes::finish_nanos);
  for (int64_t i = 0; i < n; ++i) RETURN_IF_ERROR(st[i].status);
  *out = std::move(result);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Segment>> BuildSegment(Method method, const BuildInput& input,
                                                      const IndexOptions& options,
                                                      ThreadPool* pool) {
  RETURN_IF_ERROR(ValidateKeys(input.keys));
  if (input.token_begin < 0 || input.token_begin >= input.token_end ||
      input.token_end > input.keys->num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("segment range [", input.token_begin, ", ",
                                                   input.token_end, ") empty or outside [0, ",
                                                   input.keys->num_tokens, ")"));
  }
  if (!(input.scale >= 0) || !std::isfinite(input.scale)) {
    return absl::InvalidArgumentError("scale must be finite and >= 0");
  }
  switch (method) {
    case Method::kExact:
      return internal::NewExactSegment(input);
    case Method::kCtkvr:
      return internal::BuildCtkvrSegment(input, options.ctkvr, pool);
    case Method::kCluster:
      return internal::BuildClusterSegment(input, options.cluster, pool);
    case Method::kMerged:
      return absl::InvalidArgumentError(
          "merged is a compressed representation, not a search index: use indexer/merged.h");
  }
  return absl::InvalidArgumentError("unknown method");
}

absl::StatusOr<std::unique_ptr<Segment>> BuildSegmentAfter(
    const std::shared_ptr<const Segment>& base, const BuildInput& input,
    const IndexOptions& options, ThreadPool* pool) {
  if (base == nullptr) return absl::InvalidArgumentError("no segment to continue");
  if (base->method() != Method::kCtkvr) return BuildSegment(base->method(), input, options, pool);
  RETURN_IF_ERROR(ValidateKeys(input.keys));
  if (input.token_end <= input.token_begin || input.token_end > input.keys->num_tokens ||
      input.keys->head_dim != base->head_dim() || input.keys->dtype != base->dtype()) {
    return absl::InvalidArgumentError(
        absl::StrCat("continuation range [", input.token_begin, ", ", input.token_end,
                     ") empty or outside the keys, or keys unlike its base's"));
  }
  // The last part ends where the chain does; it checks that input starts there.
  return internal::BuildCtkvrSegmentAfter(*SegmentParts(base).back(), input, options.ctkvr, pool);
}

std::unique_ptr<Segment> NewUnindexedSegment(int head_dim, DType dtype) {
  return internal::NewExactSegment(0, 0, head_dim, dtype);
}

absl::StatusOr<std::unique_ptr<Segment>> NewSegmentChain(
    std::vector<std::shared_ptr<const Segment>> parts) {
  if (parts.empty()) return absl::InvalidArgumentError("a chain needs at least one part");
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == nullptr) return absl::InvalidArgumentError("null chain part");
    if (parts[i]->method() != parts[0]->method() || parts[i]->head_dim() != parts[0]->head_dim() ||
        parts[i]->dtype() != parts[0]->dtype()) {
      return absl::InvalidArgumentError("chain parts differ in method, head_dim or dtype");
    }
    if (i > 0 && parts[i]->token_begin() != parts[i - 1]->token_end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chain part ", i, " starts at ", parts[i]->token_begin(), ", not at the previous end ",
          parts[i - 1]->token_end()));
    }
  }
  return std::unique_ptr<Segment>(std::make_unique<internal::ChainSegment>(std::move(parts)));
}

std::vector<std::shared_ptr<const Segment>> SegmentParts(
    const std::shared_ptr<const Segment>& segment) {
  if (const auto* c = dynamic_cast<const internal::ChainSegment*>(segment.get())) {
    return c->parts();
  }
  return {segment};
}

std::string SerializeSegment(const Segment& segment) {
  internal::ByteWriter w;
  for (char c : internal::kSegmentMagic) w.U8(static_cast<uint8_t>(c));
  const bool chain = dynamic_cast<const internal::ChainSegment*>(&segment) != nullptr;
  w.U8(chain ? internal::kChainKind : static_cast<uint8_t>(segment.method()));
  w.I64(segment.token_begin());
  w.I64(segment.token_end());
  w.I32(segment.head_dim());
  w.U8(static_cast<uint8_t>(segment.dtype()));
  segment.SerializeInternal(&w);
  return std::move(w.out());
}

namespace {

absl::StatusOr<std::unique_ptr<Segment>> ParseSegmentAt(absl::string_view bytes, int depth) {
  auto bad = [](absl::string_view why) {
    return absl::DataLossError(absl::StrCat("index segment record is malformed: ", why));
  };
  internal::ByteReader r(bytes);
  char magic[4];
  for (char& c : magic) c = static_cast<char>(r.U8());
  const uint8_t kind = r.U8();
  const int64_t begin = r.I64(), end = r.I64();
  const int32_t head_dim = r.I32();
  const uint8_t dtype = r.U8();
  if (!r.ok()) return bad("truncated header");
  if (std::memcmp(magic, internal::kSegmentMagic, 4) != 0) return bad("bad magic (not a version-3 segment)");
  if (begin < 0 || end < begin || end > std::numeric_limits<int32_t>::max() || head_dim <= 0 ||
      head_dim > (1 << 16) || dtype > static_cast<uint8_t>(DType::kF16)) {
    return bad("bad range, head_dim or dtype");
  }
  const DType dt = static_cast<DType>(dtype);
  std::unique_ptr<Segment> seg;
  if (kind == internal::kChainKind) {
    if (depth > 0) return bad("nested chain");
    const uint32_t n = r.U32();
    if (!r.ok() || n == 0 || n > r.remaining()) return bad("bad chain part count");
    std::vector<std::shared_ptr<const Segment>> parts;
    for (uint32_t i = 0; i < n; ++i) {
      const absl::string_view part = r.Bytes();
      if (!r.ok()) return bad("truncated chain part");
      ASSIGN_OR_RETURN(std::unique_ptr<Segment> p, ParseSegmentAt(part, depth + 1));
      parts.push_back(std::move(p));
    }
    absl::StatusOr<std::unique_ptr<Segment>> chain = NewSegmentChain(std::move(parts));
    if (!chain.ok()) return bad(chain.status().message());
    if ((*chain)->token_begin() != begin || (*chain)->token_end() != end ||
        (*chain)->head_dim() != head_dim || (*chain)->dtype() != dt) {
      return bad("chain header differs from its parts");
    }
    seg = std::move(*chain);
  } else if (kind == static_cast<uint8_t>(Method::kExact)) {
    seg = internal::NewExactSegment(begin, end, head_dim, dt);
  } else if (kind == static_cast<uint8_t>(Method::kCtkvr)) {
    seg = internal::ParseCtkvrSegment(&r, begin, end, head_dim, dt);
  } else if (kind == static_cast<uint8_t>(Method::kCluster)) {
    seg = internal::ParseClusterSegment(&r, begin, end, head_dim, dt);
  } else {
    return bad(absl::StrCat("unknown kind ", kind));
  }
  if (seg == nullptr || !r.ok()) return bad("inconsistent body");
  if (r.remaining() != 0) return bad("trailing bytes");
  return seg;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Segment>> ParseSegment(absl::string_view bytes) {
  return ParseSegmentAt(bytes, 0);
}

absl::StatusOr<std::unique_ptr<Segment>> BuildSegment(absl::string_view method,
                                                      const BuildInput& input,
                                                      const IndexOptions& options,
                                                      ThreadPool* pool) {
  ASSIGN_OR_RETURN(Method m, ParseMethod(method));
  return BuildSegment(m, input, options, pool);
}

}  // namespace kvrecall::indexer
