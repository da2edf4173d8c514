// CTKVR segment: query centroids with inverted top-ρ key lists (see index.h for the contract).
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "indexer/index.h"
#include "indexer/internal/search.h"
#include "indexer/kernels.h"

namespace kvrecall::indexer::internal {
namespace {

constexpr int64_t kTileTokens = 512;

// Process-wide search counters, sharded so that the search threads of a node do not contend
// on one cache line; each thread adds to its own shard, readers sum them.
struct alignas(64) CounterShard {
  std::atomic<int64_t> searches{0};
  std::atomic<int64_t> novel{0};
};
constexpr size_t kCounterShards = 64;
CounterShard g_counters[kCounterShards];
std::atomic<size_t> g_next_shard{0};

CounterShard& MyCounters() {
  thread_local CounterShard& shard =
      g_counters[g_next_shard.fetch_add(1, std::memory_order_relaxed) % kCounterShards];
  return shard;
}

// A per-thread scratch buffer of at least n floats, kept for later builds and backed by
// transparent huge pages where the kernel allows: first-touch page faults are otherwise a large
// share of a build (on VMs most of it). Contents are unspecified.
float* ScratchFloats(size_t n) {
  struct Buffer {
    float* p = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t want = (n * sizeof(float) + kHuge - 1) / kHuge * kHuge;
  if (want > buf.bytes) {
    std::free(buf.p);
    buf.p = static_cast<float*>(std::aligned_alloc(kHuge, want));
    buf.bytes = buf.p != nullptr ? want : 0;
    if (buf.p == nullptr) throw std::bad_alloc();
    madvise(buf.p, want, MADV_HUGEPAGE);  // advisory; failure only costs speed
  }
  return buf.p;
}

// Bounds that parsed records must respect (far beyond any real index): list lengths, and the
// count of added centroids, which picks the ring slot to replace and must never overflow.
constexpr int kMaxListSize = 1 << 24;
constexpr int64_t kMaxAddedTotal = int64_t{1} << 62;

template <typename T>
bool AllFinite(const std::vector<T>& v) {
  for (T x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// Every |x| <= bound (NaN fails). Parsed centroids must stay far from overflow: a later Append
// or search multiplies them with keys, and a logit of inf makes the normalisers NaN.
bool AllWithin(const std::vector<float>& v, float bound) {
  for (float x : v)
    if (!(std::fabs(x) <= bound)) return false;
  return true;
}
// Real scaled queries are below 1e3 (|q| / sqrt(head_dim)); unit ones below 1 (a little slack
// for rounding).
constexpr float kMaxScaledCentroid = 1e6f;
constexpr float kMaxUnitCentroid = 1.001f;

bool OptionsValid(const CtkvrOptions& o) {
  return o.centroids > 0 && o.list_size > 0 && o.list_size <= kMaxListSize && o.probe > 0 &&
         o.min_similarity >= 0 &&
         o.min_similarity <= 1 && o.max_added >= 0 && o.max_added <= 4096 &&
         o.neighbour_tokens >= 0 && o.neighbour_tokens <= 4096 && o.neighbour_radius >= 0 &&
         o.neighbour_radius <= 4096;
}

// A centroid's own state: st_.scaled, st_.unit, st_.lse and st_.list_mass.
size_t CentroidBytes(size_t group, size_t head_dim) { return group * head_dim * 8 + group * 16; }

size_t MaxNeighbours(const CtkvrOptions& o) {
  return static_cast<size_t>(o.neighbour_tokens) *
         (2 * static_cast<size_t>(o.neighbour_radius) + 1);
}

// A centroid at its largest in a segment of `tokens` tokens (any when SIZE_MAX): its state, a
// full list with logits, every neighbour.
size_t MaxCentroidBytes(const CtkvrOptions& o, size_t group, size_t head_dim,
                        size_t tokens = SIZE_MAX) {
  return CentroidBytes(group, head_dim) +
         std::min(static_cast<size_t>(o.list_size), tokens) * (4 + 4 * group) +
         MaxNeighbours(o) * 4;
}

// A prompt centroid's copy of its candidates' key rows at its largest (copy_list_rows); it
// never holds more rows than its segment's `tokens`.
size_t MaxListRowsBytes(const CtkvrOptions& o, DType dtype, int head_dim,
                        size_t tokens = SIZE_MAX) {
  if (!o.copy_list_rows) return 0;
  const size_t rows = std::min(static_cast<size_t>(o.list_size) + MaxNeighbours(o), tokens);
  return rows * 4 + kernels::PackedRowsBytes(dtype, static_cast<int64_t>(rows), head_dim);
}

// The key rows of one centroid's candidates: its list ∪ its neighbours, ascending, and their
// rows packed (kernels::PackRows: row j, of the token tokens[j], is packed row j).
struct ListRows {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> rows;
};

// out = the units [from, to) of single-token hits `in`, with each head's normaliser over them.
void SliceHits(const Hits& in, int64_t from, int64_t to, kernels::Isa isa, Hits* out) {
  const int64_t n = to - from, total = in.units;
  const size_t g = in.lse.size();
  out->tokens.assign(in.tokens.begin() + from, in.tokens.begin() + to);
  out->unit_end.clear();
  out->units = n;
  out->logits.resize(g * static_cast<size_t>(n));
  out->lse.resize(g);
  for (size_t h = 0; h < g; ++h) {
    const float* src = in.logits.data() + h * static_cast<size_t>(total) + from;
    std::copy(src, src + n, out->logits.begin() + h * static_cast<size_t>(n));
    out->lse[h] = LogSumExp(src, n, isa);
  }
}

class CtkvrSegment final : public Segment {
 public:
  CtkvrSegment(const BuildInput& in, const CtkvrOptions& o)
      : Segment(in.token_begin, in.token_end, in.keys->head_dim, in.keys->dtype),
        opt_(o),
        group_(in.group) {}
  CtkvrSegment(int64_t begin, int64_t end, int head_dim, DType dtype)
      : Segment(begin, end, head_dim, dtype), group_(0) {}
  // Searches may add centroids to `o` meanwhile: its state is copied under its lock.
  CtkvrSegment(const CtkvrSegment& o) : Segment(o), opt_(o.opt_), group_(o.group_) {
    absl::ReaderMutexLock lock(&o.mu_);
    st_ = o.st_;
    ReserveAdded();
    absl::MutexLock copies_lock(&o.copies_mu_);
    copies_ = o.copies_;  // immutable: shared until this one's lists change
  }
  CtkvrSegment& operator=(const CtkvrSegment&) = delete;

  std::unique_ptr<Segment> Clone() const override {
    return std::make_unique<CtkvrSegment>(*this);
  }

  void SerializeInternal(ByteWriter* w) const override {
    absl::ReaderMutexLock lock(&mu_);
    w->I32(opt_.centroids);
    w->I32(opt_.list_size);
    w->I32(opt_.probe);
    w->F64(opt_.min_similarity);
    w->I32(opt_.max_added);
    w->I32(opt_.neighbour_tokens);
    w->I32(opt_.neighbour_radius);
    w->I32(group_);
    w->I32(st_.num_prompt);
    w->I32(st_.count());
    w->I64(st_.added_total);
    w->Array(st_.scaled);
    w->Array(st_.unit);
    w->Array(st_.lse);
    w->U64(st_.lists.size());
    for (size_t i = 0; i < st_.lists.size(); ++i) {
      w->Array(st_.lists[i]);
      w->Array(st_.list_logits[i]);
      w->Array(st_.neighbours[i]);
    }
    w->Array(st_.list_mass);
  }

  // Reads the body written by SerializeInternal; false when it is inconsistent.
  bool Parse(ByteReader* r) {
    absl::MutexLock lock(&mu_);
    opt_.centroids = r->I32();
    opt_.list_size = r->I32();
    opt_.probe = r->I32();
    const double min_similarity = r->F64();
    opt_.max_added = r->I32();
    opt_.neighbour_tokens = r->I32();
    opt_.neighbour_radius = r->I32();
    group_ = r->I32();
    st_.num_prompt = r->I32();
    const int num_centroids = r->I32();
    st_.added_total = r->I64();
    if (!r->ok() || !(min_similarity >= 0 && min_similarity <= 1) ||
        !OptionsValid(opt_) || group_ <= 0 || group_ > (1 << 16) || st_.num_prompt <= 0 ||
        st_.num_prompt > opt_.centroids || num_centroids < st_.num_prompt ||
        num_centroids - st_.num_prompt > opt_.max_added || opt_.list_size > kMaxListSize ||
        st_.added_total < num_centroids - st_.num_prompt || st_.added_total > kMaxAddedTotal) {
      return false;
    }
    opt_.min_similarity = static_cast<float>(min_similarity);
    const size_t c = static_cast<size_t>(num_centroids), g = static_cast<size_t>(group_);
    st_.scaled = r->Array<float>();
    st_.unit = r->Array<float>();
    st_.lse = r->Array<double>();
    const uint64_t nlists = r->U64();
    if (!r->ok() || st_.scaled.size() != c * g * static_cast<size_t>(head_dim_) ||
        st_.unit.size() != st_.scaled.size() || st_.lse.size() != c * g || nlists != c ||
        !AllWithin(st_.scaled, kMaxScaledCentroid) || !AllWithin(st_.unit, kMaxUnitCentroid) ||
        !AllFinite(st_.lse)) {
      return false;
    }
    st_.lists.resize(c);
    st_.list_logits.resize(c);
    st_.neighbours.resize(c);
    const size_t max_neighbours = MaxNeighbours(opt_);
    for (size_t i = 0; i < c; ++i) {
      st_.lists[i] = r->Array<int32_t>();
      st_.list_logits[i] = r->Array<float>();
      st_.neighbours[i] = r->Array<int32_t>();
      if (!r->ok() || st_.lists[i].size() > static_cast<size_t>(opt_.list_size) ||
          st_.list_logits[i].size() != st_.lists[i].size() * g ||
          st_.neighbours[i].size() > max_neighbours || !AscendingInSegment(st_.lists[i]) ||
          !AscendingInSegment(st_.neighbours[i]) || !AllFinite(st_.list_logits[i])) {
        return false;
      }
    }
    st_.list_mass = r->Array<double>();
    if (!r->ok() || st_.list_mass.size() != c * g || !AllFinite(st_.list_mass)) return false;
    ReserveAdded();
    return true;
  }

  Method method() const override { return Method::kCtkvr; }

  // Picks the centroids and builds their lists over [begin_, end_), or takes in.ctkvr_lists
  // (checked by BuildCtkvrSegment but for their normalisers, which need the lists' logits).
  absl::Status Build(const BuildInput& in, ThreadPool* pool) {
    absl::MutexLock lock(&mu_);  // not yet shared; keeps the one rule for the state
    SetCentroids(in);
    if (in.ctkvr_lists != nullptr) return TakeLists(*in.ctkvr_lists, *in.keys, pool);
    BuildLists(*in.keys, pool);
    return absl::OkStatus();
  }

  // The prompt centroids' lists and normalisers, in prompt-query order (CtkvrListsOf).
  CtkvrListsCopy CopyLists() const {
    absl::ReaderMutexLock lock(&mu_);
    CtkvrListsCopy out;
    out.list_size = opt_.list_size;
    out.num_centroids = st_.num_prompt;
    for (int qi = 0; qi < st_.num_prompt; ++qi) {
      const int ci = st_.num_prompt - 1 - qi;  // SetCentroids: the last query first
      out.tokens.insert(out.tokens.end(), st_.lists[ci].begin(), st_.lists[ci].end());
      for (int h = 0; h < group_; ++h)
        out.lse.push_back(static_cast<float>(st_.lse[static_cast<size_t>(ci) * group_ + h]));
    }
    return out;
  }

  // Builds over this segment's range with `base`'s prompt centroids (its added ones stay with
  // it): the part after `base` of a chain whose earlier part is shared.
  void BuildAfter(const CtkvrSegment& base, const PagedRows& keys, ThreadPool* pool) {
    absl::MutexLock lock(&mu_);
    {
      absl::ReaderMutexLock base_lock(&base.mu_);
      const size_t n = static_cast<size_t>(base.st_.num_prompt) * group_ * head_dim_;
      st_.num_prompt = base.st_.num_prompt;
      st_.scaled.assign(base.st_.scaled.begin(), base.st_.scaled.begin() + n);
      st_.unit.assign(base.st_.unit.begin(), base.st_.unit.begin() + n);
    }
    BuildLists(keys, pool);
  }

  const CtkvrOptions& options() const { return opt_; }
  int group() const { return group_; }

 private:
  // The prompt centroids: opt_.centroids of the input's queries, evenly spaced, scaled and unit.
  void SetCentroids(const BuildInput& in) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int d = head_dim_, g = group_;
    const int q = in.num_prompt_queries;
    const std::vector<int> picks = CtkvrCentroidQueries(q, opt_.centroids);
    const int c = static_cast<int>(picks.size());
    st_.num_prompt = c;
    st_.scaled.resize(static_cast<size_t>(c) * g * d);
    st_.unit.resize(st_.scaled.size());
    const float scale =
        in.scale > 0 ? in.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    for (int i = 0; i < c; ++i) {
      const int pos = picks[c - 1 - i];  // the last prompt query first
      for (int h = 0; h < g; ++h) {
        const float* src = in.prompt_queries + (static_cast<size_t>(pos) * g + h) * d;
        float* sd = st_.scaled.data() + (static_cast<size_t>(i) * g + h) * d;
        float* ud = st_.unit.data() + (static_cast<size_t>(i) * g + h) * d;
        double norm = 0;
        for (int j = 0; j < d; ++j) norm += static_cast<double>(src[j]) * src[j];
        const float inv = norm > 0 ? static_cast<float>(1.0 / std::sqrt(norm)) : 0.0f;
        for (int j = 0; j < d; ++j) {
          sd[j] = src[j] * scale;
          ud[j] = src[j] * inv;
        }
      }
    }
  }

  // Every prompt centroid's normalisers, list, neighbours and row copies over [begin_, end_).
  void BuildLists(const PagedRows& rows, ThreadPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int d = head_dim_, g = group_, c = st_.num_prompt;
    const int64_t n = end_ - begin_;
    const int nq = c * g;
    // [c*g][n] logits, in a per-thread scratch buffer reused across builds (see ScratchFloats).
    float* const all_logits =
        ScratchFloats(static_cast<size_t>(nq) * n);  // used by pool threads too
    // Many queries × many keys: fp32 key tiles through the packed dot-matrix kernel.
    ForChunks(pool, n, kTileTokens, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> keys, dots;
      keys.resize(static_cast<size_t>(e - b) * d);
      dots.resize(static_cast<size_t>(e - b) * nq);
      for (int64_t t = b; t < e; ++t)
        kernels::ToF32(dtype_, rows.row(begin_ + t), d, keys.data() + (t - b) * d);
      kernels::DotsF32(keys.data(), e - b, st_.scaled.data(), nq, d, dots.data(), nq);
      for (int64_t t = b; t < e; ++t)
        for (int r = 0; r < nq; ++r)
          all_logits[static_cast<size_t>(r) * n + t] = dots[(t - b) * nq + r];
    });
    st_.lse.assign(static_cast<size_t>(nq), 0.0);
    st_.lists.assign(static_cast<size_t>(c), {});
    st_.list_logits.assign(static_cast<size_t>(c), {});
    st_.neighbours.assign(static_cast<size_t>(c), {});
    ReserveAdded();
    st_.list_mass.assign(static_cast<size_t>(nq), 1.0);
    auto build_one = [&](int64_t ci) {
      const float* l = all_logits + ci * g * n;
      for (int h = 0; h < g; ++h) st_.lse[ci * g + h] = LogSumExp(l + h * n, n, kernels::BestIsa());
      thread_local std::vector<float> v;
      v.resize(static_cast<size_t>(n));
      Rank(ci, l, n, n, v.data());
      thread_local std::vector<int32_t> top;
      kernels::TopK(v.data(), n, opt_.list_size, &top);
      auto& list = st_.lists[ci];
      auto& ll = st_.list_logits[ci];
      list.resize(top.size());
      ll.resize(top.size() * g);
      for (size_t j = 0; j < top.size(); ++j) {
        list[j] = static_cast<int32_t>(begin_ + top[j]);
        for (int h = 0; h < g; ++h) ll[j * g + h] = l[h * n + top[j]];
      }
      st_.neighbours[ci] = Neighbours(v.data(), n, begin_);
      UpdateMass(ci);
    };
    ForEach(pool, c, build_one);
    MakeCopies(rows, pool);
  }

  // BuildLists' state from lists made elsewhere: the lists and normalisers as given, the lists'
  // logits from the keys (the same kernel as BuildLists, so the same bits), their neighbours
  // and masses. INVALID_ARGUMENT (state unspecified: the segment is dropped) when a normaliser
  // lies below its own list's log-sum-exp.
  absl::Status TakeLists(const CtkvrLists& given, const PagedRows& rows, ThreadPool* pool)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int d = head_dim_, g = group_, c = st_.num_prompt;
    const int64_t len = std::min<int64_t>(given.list_size, end_ - begin_);
    st_.lse.assign(static_cast<size_t>(c) * g, 0.0);
    st_.lists.assign(static_cast<size_t>(c), {});
    st_.list_logits.assign(static_cast<size_t>(c), {});
    st_.neighbours.assign(static_cast<size_t>(c), {});
    ReserveAdded();
    st_.list_mass.assign(static_cast<size_t>(c) * g, 1.0);
    std::vector<absl::Status> status(static_cast<size_t>(c));
    auto take_one = [&](int64_t ci) {
      const int64_t qi = c - 1 - ci;  // SetCentroids: the last query first
      const int32_t* src = given.tokens + qi * len;
      auto& list = st_.lists[ci];
      list.assign(src, src + len);
      thread_local std::vector<float> keys, by_head, v;
      keys.resize(static_cast<size_t>(len) * d);
      for (int64_t j = 0; j < len; ++j)
        kernels::ToF32(dtype_, rows.row(list[j]), d, keys.data() + j * d);
      auto& ll = st_.list_logits[ci];
      ll.resize(static_cast<size_t>(len) * g);
      kernels::DotsF32(keys.data(), len, st_.scaled.data() + ci * g * d, g, d, ll.data(), g);
      by_head.resize(static_cast<size_t>(g) * len);
      for (int64_t j = 0; j < len; ++j)
        for (int h = 0; h < g; ++h) by_head[h * len + j] = ll[j * g + h];
      for (int h = 0; h < g; ++h) {
        const double lse = given.lse[qi * g + h];
        const double own = LogSumExp(by_head.data() + h * len, len, kernels::BestIsa());
        if (!(lse >= own - 1e-3)) {
          status[ci] = absl::InvalidArgumentError(
              absl::StrCat("ctkvr lists: query ", qi, " head ", h, " normaliser ", lse,
                           " is below its own list's log-sum-exp ", own));
          return;
        }
        st_.lse[ci * g + h] = lse;
      }
      v.resize(static_cast<size_t>(len));
      Rank(ci, by_head.data(), len, len, v.data());
      st_.neighbours[ci] = Neighbours(v.data(), len, list.data());
      UpdateMass(ci);
    };
    ForEach(pool, c, take_one);
    for (const absl::Status& st : status)
      if (!st.ok()) return st;
    MakeCopies(rows, pool);
    return absl::OkStatus();
  }

 public:
  absl::Status Append(const PagedRows& keys, int64_t new_end, ThreadPool* pool) override {
    if (keys.head_dim != head_dim_ || keys.dtype != dtype_ || new_end < end_ ||
        new_end > keys.num_tokens) {
      return absl::InvalidArgumentError("append: shape mismatch or end outside the keys");
    }
    const int64_t n = new_end - end_;
    if (n == 0) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    const int g = group_, nq = st_.count() * g;
    std::vector<float> logits(static_cast<size_t>(nq) * n);
    std::vector<const uint8_t*> rows;
    RowPointers(keys, end_, new_end, &rows);
    kernels::QueryKeyDots(dtype_, rows.data(), n, head_dim_, st_.scaled.data(), nq, logits.data(), n);
    auto one = [&](int64_t ci) {
      const float* l = logits.data() + ci * g * n;
      for (int h = 0; h < g; ++h) {
        const double a = st_.lse[ci * g + h], b = LogSumExp(l + h * n, n, kernels::BestIsa());
        const double mx = std::max(a, b);
        st_.lse[ci * g + h] = mx + std::log(std::exp(a - mx) + std::exp(b - mx));
      }
      // Re-rank the old list under the new normalisers together with the new tokens.
      auto& list = st_.lists[ci];
      auto& ll = st_.list_logits[ci];
      const int64_t old = static_cast<int64_t>(list.size());
      std::vector<float> v(static_cast<size_t>(old + n));
      std::vector<float> merged_logits(static_cast<size_t>(g) * (old + n));
      for (int64_t j = 0; j < old; ++j)
        for (int h = 0; h < g; ++h) merged_logits[h * (old + n) + j] = ll[j * g + h];
      for (int64_t j = 0; j < n; ++j)
        for (int h = 0; h < g; ++h) merged_logits[h * (old + n) + old + j] = l[h * n + j];
      Rank(ci, merged_logits.data(), old + n, old + n, v.data());
      std::vector<int32_t> top;
      kernels::TopK(v.data(), old + n, opt_.list_size, &top);
      std::vector<int32_t> new_list(top.size());
      std::vector<float> new_ll(top.size() * g);
      for (size_t j = 0; j < top.size(); ++j) {
        const int64_t src = top[j];
        new_list[j] = src < old ? list[src] : static_cast<int32_t>(end_ + (src - old));
        for (int h = 0; h < g; ++h) new_ll[j * g + h] = merged_logits[h * (old + n) + src];
      }
      list = std::move(new_list);
      ll = std::move(new_ll);
      UpdateMass(ci);
    };
    ForEach(pool, st_.count(), one);
    end_ = new_end;
    MakeCopies(keys, pool);  // the lists changed
    return absl::OkStatus();
  }

  // What the index holds plus room for the centroids novel queries may still add, so that the
  // node's accounting at install time stays an upper bound while searches add them.
  size_t MemoryBytes() const override {
    absl::ReaderMutexLock lock(&mu_);
    const size_t g = static_cast<size_t>(group_), d = static_cast<size_t>(head_dim_);
    size_t b = static_cast<size_t>(st_.num_prompt) * CentroidBytes(g, d);
    for (int i = 0; i < st_.num_prompt; ++i)
      b += (st_.lists[i].size() + st_.list_logits[i].size() + st_.neighbours[i].size()) * 4;
    // The prompt centroids' row copies as if all made, and every added slot at its largest (a
    // list of list_size, all neighbours), used or not.
    // Lists and copies hold tokens of the segment, so a short one (a sequence's own part after
    // a shared prompt segment) reserves little; Append re-charges as it grows.
    const size_t n = static_cast<size_t>(end_ - begin_);
    b += static_cast<size_t>(st_.num_prompt) * MaxListRowsBytes(opt_, dtype_, head_dim_, n);
    return b + static_cast<size_t>(opt_.max_added) * MaxCentroidBytes(opt_, g, d, n);
  }

  absl::Status SearchInternal(const SegmentSearch& s, HitsList* out) const override {
    if (s.group != group_) {
      return absl::InvalidArgumentError(
          absl::StrCat("query group ", s.group, " differs from the ctkvr segment's ", group_));
    }
    MyCounters().searches.fetch_add(1, std::memory_order_relaxed);
    const int g = group_, d = head_dim_;
    const int64_t rb = std::max(begin_, s.range_begin), re = std::min(end_, s.range_end);
    const int64_t need = std::min<int64_t>(s.k, re - rb);
    std::vector<int32_t> cand, merged;
    std::vector<double> best_mass(static_cast<size_t>(g));
    bool novel = false;
    std::shared_ptr<const ListRows> copy;  // of the one centroid probed, when it has one
    int64_t copy_first = 0, copy_count = 0;  // its tokens in the range
    {
      absl::ReaderMutexLock lock(&mu_);
      const int m = std::min(s.ctkvr_probe > 0 ? s.ctkvr_probe : opt_.probe, st_.count());
      std::vector<float> sim(static_cast<size_t>(st_.count()));
      for (int c = 0; c < st_.count(); ++c) {
        float acc = 0;
        for (int h = 0; h < g; ++h)
          acc += kernels::Dot(s.unit_queries + h * d,
                              st_.unit.data() + (static_cast<size_t>(c) * g + h) * d, d, s.isa);
        sim[c] = acc;
      }
      // Centroids by similarity; the best m are probed. When their lists (restricted to the
      // range) hold fewer tokens than the budget can take, further centroids are probed in
      // order, and if every list together still falls short the range is scored exactly:
      // Search's contract is min(k, range) tokens, whatever list_size was built with.
      std::vector<int32_t> order(static_cast<size_t>(st_.count()));
      for (int c = 0; c < st_.count(); ++c) order[c] = c;
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return sim[a] > sim[b] || (sim[a] == sim[b] && a < b);
      });
      novel = opt_.min_similarity > 0 && sim[order[0]] / g < opt_.min_similarity;
      // Union of the lists and their neighbours (each sorted ascending), restricted to the range.
      auto add = [&](const std::vector<int32_t>& sorted) {
        const auto lo = std::lower_bound(sorted.begin(), sorted.end(), rb);
        const auto hi = std::lower_bound(lo, sorted.end(), re);
        merged.clear();
        std::set_union(cand.begin(), cand.end(), lo, hi, std::back_inserter(merged));
        cand.swap(merged);
      };
      // One prompt centroid probed: its copy's tokens are its list and neighbours, ascending,
      // i.e. the union below; when enough of them are in the range it is used without forming
      // that union. (On a parsed segment CopyOf makes the copy even when it then falls short.)
      if (!novel && m == 1 && opt_.copy_list_rows && order[0] < st_.num_prompt) {
        copy = CopyOf(order[0], *s.keys);
        const auto lo = std::lower_bound(copy->tokens.begin(), copy->tokens.end(), rb);
        copy_first = lo - copy->tokens.begin();
        copy_count = std::lower_bound(lo, copy->tokens.end(), re) - lo;
        if (copy_count == 0 || copy_count < need) copy = nullptr;
      }
      int probed = 0;
      for (; copy == nullptr && !novel && probed < st_.count() &&
             (probed < m || static_cast<int64_t>(cand.size()) < need);
           ++probed) {
        add(st_.lists[order[probed]]);
        add(st_.neighbours[order[probed]]);
      }
      for (int h = 0; h < g; ++h)
        best_mass[h] = st_.list_mass[static_cast<size_t>(order[0]) * g + h];
    }
    if (novel) {
      MyCounters().novel.fetch_add(1, std::memory_order_relaxed);
      Hits* hits = out->Add();
      if (opt_.max_added == 0 || (rb == begin_ && re == end_)) {
        ExactHits(s, rb, re, hits);
        if (opt_.max_added > 0 && hits->units > 0) AddCentroid(s, *hits);
        return absl::OkStatus();
      }
      // The range leaves part of the segment out (the recent window overlaps it early in
      // decode): the new centroid's list and normalisers cover the whole segment, like the
      // prompt centroids'. One exact pass over the segment serves both; the range's hits are
      // its slice.
      thread_local Hits whole;
      ExactHits(s, begin_, end_, &whole);
      SliceHits(whole, rb - begin_, re - begin_, s.isa, hits);
      if (whole.units > 0) AddCentroid(s, whole);
      return absl::OkStatus();
    }
    if (copy == nullptr && static_cast<int64_t>(cand.size()) < need) {
      ExactHits(s, rb, re, out->Add());
      return absl::OkStatus();
    }
    if (copy == nullptr && cand.empty()) return absl::OkStatus();
    // Each head's normaliser over the whole segment, estimated from the candidates and the share
    // of the best centroid's mass that its list holds.
    thread_local std::vector<double> lse_add;
    lse_add.resize(static_cast<size_t>(g));
    for (int h = 0; h < g; ++h)
      lse_add[h] = -std::log(std::max(best_mass[h], 1e-6)) * FractionInRange(rb, re);
    if (copy != nullptr) {
      // The one probed centroid's list and neighbours restricted to the range (what the probe
      // loop would have put in `cand`), their rows streamed.
      const ListRows* c = copy.get();
      ScorePackedRows(s, std::move(copy), c->tokens.data(), c->rows.data(), copy_first, copy_count,
                      lse_add.data(), out);
    } else {
      Hits& hits = *out->Add();
      ScoreTokens(s, cand, &hits);
      for (int h = 0; h < g; ++h) hits.lse[h] += lse_add[h];
    }
    return absl::OkStatus();
  }

 private:
  // v[t] = max_h (l[h * ld + t] - lse_h(ci)) for t < n.
  void Rank(int64_t ci, const float* l, int64_t n, int64_t ld, float* v) const {
    RankWith(st_.lse.data() + ci * group_, l, n, ld, v);
  }
  void RankWith(const double* lse, const float* l, int64_t n, int64_t ld, float* v) const {
    const int g = group_;
    const float s0 = static_cast<float>(lse[0]);
    for (int64_t t = 0; t < n; ++t) v[t] = l[t] - s0;
    for (int h = 1; h < g; ++h) {
      const float sh = static_cast<float>(lse[h]);
      const float* lh = l + h * ld;
      for (int64_t t = 0; t < n; ++t) v[t] = std::max(v[t], lh[t] - sh);
    }
  }

  // Tokens within ±neighbour_radius of the neighbour_tokens best of v[0, n) (v[j] belongs to
  // token first + j), inside the segment, ascending and distinct.
  std::vector<int32_t> Neighbours(const float* v, int64_t n, int64_t first) const {
    return NeighboursOf(v, n, [first](int32_t j) { return first + j; });
  }
  // The same where v[j] belongs to token tokens[j].
  std::vector<int32_t> Neighbours(const float* v, int64_t n, const int32_t* tokens) const {
    return NeighboursOf(v, n, [tokens](int32_t j) { return int64_t{tokens[j]}; });
  }
  template <typename TokenOf>
  std::vector<int32_t> NeighboursOf(const float* v, int64_t n, TokenOf token_of) const {
    const int64_t e = std::min<int64_t>(opt_.neighbour_tokens, n);
    std::vector<int32_t> out;
    if (e <= 0) return out;
    std::vector<int32_t> best;
    kernels::TopK(v, n, e, &best);
    const int64_t r = opt_.neighbour_radius;
    for (int32_t j : best) {
      const int64_t at = token_of(j);
      for (int64_t t = std::max(begin_, at - r); t <= std::min(end_ - 1, at + r); ++t)
        out.push_back(static_cast<int32_t>(t));
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }

  // Adds a novel query group as a centroid, from its exact hits over the segment (contiguous,
  // ascending): its list is its own top-ρ, its normalisers the segment's. Beyond max_added the
  // oldest added centroid is replaced.
  void AddCentroid(const SegmentSearch& s, const Hits& hits) const {
    const int g = group_, d = head_dim_;
    const int64_t n = hits.units;
    const int32_t first = hits.token_data()[0];
    std::vector<float> v(static_cast<size_t>(n));
    RankWith(hits.lse.data(), hits.logits.data(), n, n, v.data());
    std::vector<int32_t> top;
    kernels::TopK(v.data(), n, opt_.list_size, &top);
    std::vector<int32_t> list(top.size());
    std::vector<float> ll(top.size() * g);
    for (size_t j = 0; j < top.size(); ++j) {
      list[j] = first + top[j];
      for (int h = 0; h < g; ++h) ll[j * g + h] = hits.logits[static_cast<size_t>(h) * n + top[j]];
    }
    std::vector<int32_t> near = Neighbours(v.data(), n, first);
    absl::MutexLock lock(&mu_);
    const int added = st_.count() - st_.num_prompt;
    int ci;
    if (added < opt_.max_added) {
      ci = st_.count();
      st_.scaled.resize(static_cast<size_t>(ci + 1) * g * d);
      st_.unit.resize(st_.scaled.size());
      st_.lse.resize(static_cast<size_t>(ci + 1) * g);
      st_.list_mass.resize(st_.lse.size());
      st_.lists.emplace_back();
      st_.list_logits.emplace_back();
      st_.neighbours.emplace_back();
    } else {
      ci = st_.num_prompt + static_cast<int>(st_.added_total % opt_.max_added);
    }
    // The count only picks the ring slot (mod max_added) and bounds the added ones from above;
    // at the cap it wraps to a value with the same residue, so the segment still parses.
    if (++st_.added_total > kMaxAddedTotal) {
      st_.added_total = opt_.max_added + st_.added_total % opt_.max_added;
    }
    std::copy(s.scaled_queries, s.scaled_queries + g * d, st_.scaled.begin() + static_cast<size_t>(ci) * g * d);
    std::copy(s.unit_queries, s.unit_queries + g * d, st_.unit.begin() + static_cast<size_t>(ci) * g * d);
    for (int h = 0; h < g; ++h) st_.lse[static_cast<size_t>(ci) * g + h] = hits.lse[h];
    st_.lists[ci] = std::move(list);
    st_.list_logits[ci] = std::move(ll);
    st_.neighbours[ci] = std::move(near);
    UpdateMass(ci);
  }

  // Room for every centroid that may be added, so adding never reallocates the per-centroid
  // arrays (MemoryBytes counts that room).
  void ReserveAdded() {
    const size_t c = static_cast<size_t>(st_.num_prompt) + static_cast<size_t>(opt_.max_added);
    const size_t g = static_cast<size_t>(group_), d = static_cast<size_t>(head_dim_);
    st_.scaled.reserve(c * g * d);
    st_.unit.reserve(c * g * d);
    st_.lse.reserve(c * g);
    st_.list_mass.reserve(c * g);
    st_.lists.reserve(c);
    st_.list_logits.reserve(c);
    st_.neighbours.reserve(c);
  }

  // Prompt centroid ci's row copy, made now if it has none. REQUIRES: mu_ held (shared is
  // enough: racing searches may both make one, the first installed wins).
  // Build and Append make the copies; a parsed segment makes each on the first search that
  // needs it.
  std::shared_ptr<const ListRows> CopyOf(int ci, const PagedRows& keys) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    {
      absl::MutexLock lock(&copies_mu_);
      if (static_cast<size_t>(ci) < copies_.size() && copies_[ci] != nullptr) return copies_[ci];
    }
    std::shared_ptr<const ListRows> made = MakeCopy(ci, keys);
    absl::MutexLock lock(&copies_mu_);
    if (copies_.size() < static_cast<size_t>(st_.num_prompt)) copies_.resize(st_.num_prompt);
    if (copies_[ci] == nullptr) copies_[ci] = std::move(made);
    return copies_[ci];
  }

  std::shared_ptr<const ListRows> MakeCopy(int64_t ci, const PagedRows& keys) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto made = std::make_shared<ListRows>();
    std::set_union(st_.lists[ci].begin(), st_.lists[ci].end(), st_.neighbours[ci].begin(),
                   st_.neighbours[ci].end(), std::back_inserter(made->tokens));
    const int64_t n = static_cast<int64_t>(made->tokens.size());
    std::vector<const uint8_t*> rows(made->tokens.size());
    for (size_t j = 0; j < rows.size(); ++j) rows[j] = keys.row(made->tokens[j]);
    made->rows.resize(kernels::PackedRowsBytes(dtype_, n, head_dim_));
    kernels::PackRows(dtype_, rows.data(), n, head_dim_, made->rows.data());
    return made;
  }

  // Every prompt centroid's copy, made now from `keys` (their lists changed or are new).
  void MakeCopies(const PagedRows& keys, ThreadPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::shared_ptr<const ListRows>> made;
    if (opt_.copy_list_rows) {
      made.resize(static_cast<size_t>(st_.num_prompt));
      ForEach(pool, st_.num_prompt, [&](int64_t ci) { made[ci] = MakeCopy(ci, keys); });
    }
    absl::MutexLock lock(&copies_mu_);
    copies_ = std::move(made);
  }

  bool AscendingInSegment(const std::vector<int32_t>& ids) const {
    for (size_t j = 0; j < ids.size(); ++j) {
      if (ids[j] < begin_ || ids[j] >= end_ || (j > 0 && ids[j] <= ids[j - 1])) return false;
    }
    return true;
  }

  // Share of each head's softmax mass (over the segment) that centroid ci's list holds.
  void UpdateMass(int64_t ci) const {
    const int g = group_;
    const auto& ll = st_.list_logits[ci];
    const size_t n = st_.lists[ci].size();
    for (int h = 0; h < g; ++h) {
      double z = 0;
      for (size_t j = 0; j < n; ++j)
        z += std::exp(static_cast<double>(ll[j * g + h]) - st_.lse[ci * g + h]);
      st_.list_mass[ci * g + h] = std::min(1.0, z);
    }
  }

  // The list-mass correction applies fully when the range covers the segment; scaled down
  // linearly when only part of it is searched.
  double FractionInRange(int64_t rb, int64_t re) const {
    return static_cast<double>(re - rb) / static_cast<double>(end_ - begin_);
  }

  CtkvrOptions opt_;
  int group_;
  // The centroid state: prompt centroids [0, num_prompt), then those novel queries added
  // (searches add them through a const segment, so they are `mutable`). Searches read under a
  // shared lock; adding, Append, Build, Parse and copies take it exclusively or shared.
  mutable absl::Mutex mu_;
  struct Centroids {
    int num_prompt = 0;
    int64_t added_total = 0;     // centroids ever added (picks the one to replace)
    std::vector<float> scaled;   // [c][g][d] centroid queries × scale
    std::vector<float> unit;     // [c][g][d] normalised centroid queries
    std::vector<double> lse;     // [c][g] log Σ exp(logit) over the segment
    // [c] token ids, ascending: TopK returns ascending indices, and Append ranks the old list
    // followed by the new (later) tokens.
    std::vector<std::vector<int32_t>> lists;
    std::vector<std::vector<float>> list_logits;  // [c] [len][g] logits of the list's tokens
    std::vector<std::vector<int32_t>> neighbours;  // [c] ascending token ids (see options)
    std::vector<double> list_mass;                 // [c][g]
    int count() const { return static_cast<int>(lists.size()); }  // c
  };
  mutable Centroids st_;
  // Row copies of the prompt centroids (copy_list_rows), [num_prompt] once any is made; null
  // until made. Lock order: mu_, then copies_mu_.
  mutable absl::Mutex copies_mu_ ABSL_ACQUIRED_AFTER(mu_);
  mutable std::vector<std::shared_ptr<const ListRows>> copies_ ABSL_GUARDED_BY(copies_mu_);
};

// CtkvrLists' contract, but for the normalisers' lower bound (TakeLists checks it).
absl::Status CheckLists(const BuildInput& in, const CtkvrOptions& options) {
  const CtkvrLists& l = *in.ctkvr_lists;
  if (l.list_size < 1 || l.list_size > options.list_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ctkvr lists of ", l.list_size, " tokens; this index takes 1 to ", options.list_size));
  }
  if (in.num_prompt_queries > options.centroids) {
    return absl::InvalidArgumentError(absl::StrCat("ctkvr lists for ", in.num_prompt_queries,
                                                   " queries; this index takes at most ",
                                                   options.centroids, " centroids"));
  }
  if (l.tokens == nullptr || l.lse == nullptr) {
    return absl::InvalidArgumentError("ctkvr lists without tokens or normalisers");
  }
  const int64_t len = std::min<int64_t>(l.list_size, in.token_end - in.token_begin);
  for (int64_t qi = 0; qi < in.num_prompt_queries; ++qi) {
    const int32_t* t = l.tokens + qi * len;
    for (int64_t j = 0; j < len; ++j) {
      if (t[j] < in.token_begin || t[j] >= in.token_end || (j > 0 && t[j] <= t[j - 1])) {
        return absl::InvalidArgumentError(absl::StrCat("ctkvr list of query ", qi, ": token ", t[j],
                                                       " at ", j, " is outside [", in.token_begin,
                                                       ", ", in.token_end, ") or not ascending"));
      }
    }
    for (int h = 0; h < in.group; ++h) {
      if (!std::isfinite(l.lse[qi * in.group + h])) {
        return absl::InvalidArgumentError("ctkvr list normalisers contain NaN or Inf");
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Segment> ParseCtkvrSegment(ByteReader* r, int64_t begin, int64_t end,
                                           int head_dim, DType dtype) {
  if (end <= begin) return nullptr;
  auto seg = std::make_unique<CtkvrSegment>(begin, end, head_dim, dtype);
  if (!seg->Parse(r)) return nullptr;
  return seg;
}

absl::StatusOr<std::unique_ptr<Segment>> BuildCtkvrSegment(const BuildInput& input,
                                                           const CtkvrOptions& options,
                                                           ThreadPool* pool) {
  if (!OptionsValid(options)) {
    return absl::InvalidArgumentError(
        "ctkvr: centroids, list_size and probe must be > 0, min_similarity in [0, 1], "
        "max_added, neighbour_tokens and neighbour_radius in [0, 4096]");
  }
  if (input.prompt_queries == nullptr || input.num_prompt_queries <= 0 || input.group <= 0) {
    return absl::InvalidArgumentError(
        "ctkvr needs prompt queries ([num_prompt_queries][group][head_dim])");
  }
  const int64_t nq =
      static_cast<int64_t>(input.num_prompt_queries) * input.group * input.keys->head_dim;
  for (int64_t i = 0; i < nq; ++i) {
    if (!std::isfinite(input.prompt_queries[i])) {
      return absl::InvalidArgumentError("ctkvr prompt queries contain NaN or Inf");
    }
  }
  CtkvrOptions o = options;
  if (input.ctkvr_lists != nullptr) {
    RETURN_IF_ERROR(CheckLists(input, options));
    o.list_size = input.ctkvr_lists->list_size;
  }
  auto seg = std::make_unique<CtkvrSegment>(input, o);
  RETURN_IF_ERROR(seg->Build(input, pool));
  return std::unique_ptr<Segment>(std::move(seg));
}

absl::StatusOr<std::unique_ptr<Segment>> BuildCtkvrSegmentAfter(const Segment& base,
                                                                const BuildInput& input,
                                                                const CtkvrOptions& options,
                                                                ThreadPool* pool) {
  const auto* prev = dynamic_cast<const CtkvrSegment*>(&base);
  if (prev == nullptr) {
    return absl::InvalidArgumentError("a ctkvr continuation needs a ctkvr segment to follow");
  }
  if (!OptionsValid(options)) {
    return absl::InvalidArgumentError("ctkvr: invalid options for a continuation");
  }
  if (input.group != prev->group() || input.token_begin != base.token_end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a ctkvr continuation must start at its base's end (", base.token_end(), ", not ",
        input.token_begin, ") with its group (", prev->group(), ", not ", input.group, ")"));
  }
  auto seg = std::make_unique<CtkvrSegment>(input, options);
  seg->BuildAfter(*prev, *input.keys, pool);
  return std::unique_ptr<Segment>(std::move(seg));
}

}  // namespace kvrecall::indexer::internal

namespace kvrecall::indexer {

std::vector<int> CtkvrCentroidQueries(int num_queries, int centroids) {
  const int c = std::max(0, std::min(centroids, num_queries));
  std::vector<int> picks(static_cast<size_t>(c));
  for (int i = 0; i < c; ++i) {  // i-th from the last: evenly spaced, the last query included
    const int back =
        c == 1 ? 0 : static_cast<int>((static_cast<int64_t>(i) * (num_queries - 1)) / (c - 1));
    picks[c - 1 - i] = num_queries - 1 - back;
  }
  return picks;
}

absl::StatusOr<CtkvrListsCopy> CtkvrListsOf(const Segment& segment) {
  const auto* s = dynamic_cast<const internal::CtkvrSegment*>(&segment);
  if (s == nullptr) return absl::InvalidArgumentError("not a ctkvr segment");
  return s->CopyLists();
}

int64_t CtkvrSegmentMaxBytes(const CtkvrOptions& options, int group, int head_dim, DType kv_dtype) {
  return (int64_t{options.centroids} + options.max_added) *
             static_cast<int64_t>(internal::MaxCentroidBytes(options, static_cast<size_t>(group),
                                                             static_cast<size_t>(head_dim))) +
         int64_t{options.centroids} *
             static_cast<int64_t>(internal::MaxListRowsBytes(options, kv_dtype, head_dim));
}

absl::Status ApplyMinSimilarityFlag(double value, CtkvrOptions* options) {
  if (!(value <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ctkvr_min_similarity must be at most 1 (a cosine), not ", value));
  }
  if (value >= 0) options->min_similarity = static_cast<float>(value);
  return absl::OkStatus();
}

CtkvrCounters ReadCtkvrCounters() {
  CtkvrCounters c;
  for (const internal::CounterShard& shard : internal::g_counters) {
    c.searches += shard.searches.load(std::memory_order_relaxed);
    c.novel += shard.novel.load(std::memory_order_relaxed);
  }
  return c;
}

}  // namespace kvrecall::indexer
