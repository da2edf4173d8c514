// Each CUDA kernel against its CPU reference (cpu_reference.h) on random bf16 inputs. Runs on
// the GPU machine; where cudaGetDeviceCount fails or finds no device, the GPU tests skip
// (GTEST_SKIP, reported as skipped). The argument-check tests need no GPU and run everywhere.
//
// Tolerances (bf16 = 8 significant bits, unit roundoff u = 2^-8):
//   attention: the kernel's bf16 output vs the reference's fp32 output: |o - r| <= u*|r| (the
//     output rounding) + 1e-5 * max|r| (fp32 accumulation in a different order), and the
//     relative L2 error <= 2.5e-3;
//   RMSNorm, RoPE, SwiGLU: at most 1 bf16 ulp apart (fp32 vs double sums, expf vs exp, sincos);
//   slot scatter, embedding, argmax: exact;
//   top-p sampling: the same token, except rows the double-precision reference marks as within
//     5e-6 of the row's mass from a decision boundary (fp32 sums over 32000 values are off by
//     up to ~4e-6), at most a sixth of the rows;
//   ctkvr lists: lse relative error <= 1e-5; each list ascending in [begin, end) and equal to the
//     reference's but for tokens whose reference score is within 1e-5 (relative) of the list's
//     threshold score, at most 1% of the list; identical where the scores tie exactly.
// Every output buffer is poisoned (NaN / 0xff bytes) before a kernel runs, so unwritten
// elements fail.
#include "gpu-worker/backends/cuda/kernels.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gpu-worker/backends/cuda/cpu_reference.h"
#include "gpu-worker/model/config.h"
#include "gpu-worker/model/rope.h"
#include "gtest/gtest.h"

namespace kvrecall::worker::cuda {
namespace {

using ::kvrecall::testing::StatusIs;

bool HasGpu() {
  static const bool has = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return has;
}

#define SKIP_WITHOUT_GPU() \
  if (!HasGpu()) GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount failed or found none)"

// Device copy of a host vector; freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n, 1) * sizeof(T)),
              cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(h.size()) { Upload(h); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Upload(const std::vector<T>& h) {
    EXPECT_EQ(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  void Poison() { EXPECT_EQ(cudaMemset(p_, 0xff, n_ * sizeof(T)), cudaSuccess); }
  std::vector<T> Download() const {
    std::vector<T> h(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  size_t n_;
};

std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = F32ToBf16(dist(rng));
  return v;
}

// Attention output check (see the tolerances above).
void ExpectAttentionClose(const std::vector<uint16_t>& out, const std::vector<float>& ref,
                          const std::string& what) {
  ASSERT_EQ(out.size(), ref.size());
  double max_ref = 0.0, err2 = 0.0, ref2 = 0.0, worst = 0.0;
  for (float r : ref) max_ref = std::max(max_ref, static_cast<double>(std::abs(r)));
  int bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double o = Bf16ToF32(out[i]), r = ref[i];
    const double d = std::abs(o - r);
    err2 += d * d;
    ref2 += r * r;
    const double tol = std::ldexp(1.0, -8) * std::abs(r) + 1e-5 * max_ref;
    if (!(d <= tol)) {
      if (++bad <= 5) ADD_FAILURE() << what << ": element " << i << " got " << o << " want " << r;
    }
    worst = std::max(worst, d / (std::abs(r) + 1e-5 * max_ref));
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << out.size() << " elements off";
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  EXPECT_LE(rel, 2.5e-3) << what;
  std::printf("[ stats    ] %s: rel L2 %.3g, worst rel %.3g\n", what.c_str(), rel, worst);
}

// A K/V cache on host and device: contiguous [batch][max_len][kv][d], or pages of `page_size`
// tokens in shuffled order.
struct TestCache {
  std::vector<uint16_t> k, v;
  std::vector<int32_t> page_table;
  KvCacheView host, dev;
  std::unique_ptr<DeviceBuffer<uint16_t>> dk, dv;
  std::unique_ptr<DeviceBuffer<int32_t>> dpt;

  TestCache(int batch, int max_len, int kv, int d, int page_size, std::mt19937& rng) {
    host.token_stride = static_cast<int64_t>(kv) * d;
    host.head_stride = d;
    size_t rows;
    if (page_size == 0) {
      host.page_stride = static_cast<int64_t>(max_len) * kv * d;
      rows = static_cast<size_t>(batch) * max_len;
    } else {
      const int pages_per_seq = (max_len + page_size - 1) / page_size;
      const int pages = batch * pages_per_seq + 3;  // a few never referenced
      page_table.resize(static_cast<size_t>(batch) * pages_per_seq);
      std::vector<int32_t> perm(pages);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      std::copy_n(perm.begin(), page_table.size(), page_table.begin());
      host.page_size = page_size;
      host.page_table_stride = pages_per_seq;
      host.page_stride = static_cast<int64_t>(page_size) * kv * d;
      rows = static_cast<size_t>(pages) * page_size;
    }
    k = RandomBf16(rows * kv * d, rng);
    v = RandomBf16(rows * kv * d, rng);
    dk = std::make_unique<DeviceBuffer<uint16_t>>(k);
    dv = std::make_unique<DeviceBuffer<uint16_t>>(v);
    dev = host;
    host.k = k.data();
    host.v = v.data();
    dev.k = dk->get();
    dev.v = dv->get();
    if (page_size != 0) {
      dpt = std::make_unique<DeviceBuffer<int32_t>>(page_table);
      host.page_table = page_table.data();
      dev.page_table = dpt->get();
    }
  }
};

struct DenseCase {
  std::string name;
  int q_heads, kv_heads, d;
  std::vector<int> lengths;
  int page_size;  // 0 = contiguous
  int splits;     // 0 = auto
};

void PrintTo(const DenseCase& c, std::ostream* os) { *os << c.name; }

class DecodeAttentionTest : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DecodeAttentionTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const DenseCase& c = GetParam();
  std::mt19937 rng(std::hash<std::string>{}(c.name));
  const int batch = static_cast<int>(c.lengths.size());
  const int max_len = std::max(1, *std::max_element(c.lengths.begin(), c.lengths.end()));
  TestCache cache(batch, max_len, c.kv_heads, c.d, c.page_size, rng);
  const size_t qn = static_cast<size_t>(batch) * c.q_heads * c.d;
  std::vector<uint16_t> q = RandomBf16(qn, rng);
  DeviceBuffer<uint16_t> dq(q), dout(qn);
  DeviceBuffer<int32_t> dlen(c.lengths);

  DecodeAttentionParams p;
  p.batch = batch;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.d;
  p.max_len = max_len;
  p.q = dq.get();
  p.lengths = dlen.get();
  p.cache = cache.dev;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  p.out = dout.get();
  p.num_splits = c.splits;
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, DecodeAttentionWorkspaceBytes(p));
  DeviceBuffer<uint8_t> ws(ws_bytes);
  dout.Poison();
  ASSERT_OK(DecodeAttention(p, ws.get(), ws_bytes, nullptr));
  const std::vector<uint16_t> out = dout.Download();

  DecodeAttentionParams hp = p;
  hp.q = q.data();
  hp.lengths = c.lengths.data();
  hp.cache = cache.host;
  std::vector<float> ref(qn);
  DecodeAttentionReference(hp, ref.data());
  ExpectAttentionClose(out, ref, c.name);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DecodeAttentionTest,
    ::testing::Values(DenseCase{"g1_d128_odd_lengths", 8, 8, 128, {1, 37, 300}, 0, 0},
                      DenseCase{"g4_d128_llama3", 32, 8, 128, {4097, 13}, 0, 0},
                      DenseCase{"g8_d64_paged16", 16, 2, 64, {1000, 5}, 16, 0},
                      DenseCase{"g1_d64_len_below_split", 8, 8, 64, {20}, 0, 4},
                      DenseCase{"g7_d128_empty_and_short", 28, 4, 128, {0, 1, 64, 129}, 0, 3},
                      DenseCase{"g16_d128_two_head_chunks", 32, 2, 128, {500, 77}, 0, 0},
                      DenseCase{"g4_d64_single_split", 16, 4, 64, {2048, 2047}, 0, 1},
                      DenseCase{"g8_d128_paged64_32k", 32, 4, 128, {32768}, 64, 0},
                      DenseCase{"g2_d128_many_splits", 4, 2, 128, {3001, 2999, 1}, 8, 1024}),
    [](const auto& info) { return info.param.name; });

struct SparseCase {
  std::string name;
  int q_heads, kv_heads, d;
  std::vector<int> lengths;
  int sinks, window, budget;
  int page_size;
  bool all_middle;  // slots hold exactly the tokens between sinks and window (== dense)
};

void PrintTo(const SparseCase& c, std::ostream* os) { *os << c.name; }

class SparseAttentionTest : public ::testing::TestWithParam<SparseCase> {};

TEST_P(SparseAttentionTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const SparseCase& c = GetParam();
  std::mt19937 rng(std::hash<std::string>{}(c.name));
  const int batch = static_cast<int>(c.lengths.size());
  const int max_len = std::max(1, *std::max_element(c.lengths.begin(), c.lengths.end()));
  TestCache cache(batch, max_len, c.kv_heads, c.d, c.page_size, rng);
  const size_t qn = static_cast<size_t>(batch) * c.q_heads * c.d;
  std::vector<uint16_t> q = RandomBf16(qn, rng);

  // Slots: each filled slot holds a distinct token of the sequence with that token's K/V row,
  // chosen so that some are sinks / window tokens (which must not count twice); empty slots
  // hold NaN rows (which must never be read).
  const int entries = batch * c.kv_heads;
  const int64_t row_stride = c.d + 8, entry_stride = row_stride * std::max(c.budget, 1) + 16;
  std::vector<uint16_t> sk(entries * entry_stride, 0x7fc0), sv(entries * entry_stride, 0x7fc0);
  std::vector<int32_t> ids(static_cast<size_t>(entries) * std::max(c.budget, 1), -1),
      counts(entries, 0);
  for (int b = 0; b < batch; ++b) {
    const int len = c.lengths[b];
    for (int h = 0; h < c.kv_heads; ++h) {
      const int e = b * c.kv_heads + h;
      std::vector<int> tokens;
      if (c.all_middle) {
        const int ns = std::min(c.sinks, len), w0 = std::max(ns, len - c.window);
        for (int t = ns; t < w0; ++t) tokens.push_back(t);
        std::shuffle(tokens.begin(), tokens.end(), rng);
      } else {
        tokens.resize(len);
        std::iota(tokens.begin(), tokens.end(), 0);
        std::shuffle(tokens.begin(), tokens.end(), rng);
      }
      const int count = std::min<int>(tokens.size(),
                                      c.budget == 0 ? 0 : static_cast<int>(rng() % (c.budget + 1)));
      counts[e] = c.all_middle ? std::min<int>(tokens.size(), c.budget) : count;
      for (int s = 0; s < counts[e]; ++s) {
        // A few filled slots are empty (-1).
        const int t = (!c.all_middle && s % 17 == 5) ? -1 : tokens[s];
        ids[static_cast<size_t>(e) * c.budget + s] = t;
        if (t < 0) continue;
        int64_t page = b, in_page = t;
        if (c.page_size) {
          page = cache.page_table[b * cache.host.page_table_stride + t / c.page_size];
          in_page = t % c.page_size;
        }
        const int64_t off = page * cache.host.page_stride + in_page * cache.host.token_stride +
                            h * cache.host.head_stride;
        std::copy_n(cache.k.data() + off, c.d, sk.data() + e * entry_stride + s * row_stride);
        std::copy_n(cache.v.data() + off, c.d, sv.data() + e * entry_stride + s * row_stride);
      }
    }
  }
  DeviceBuffer<uint16_t> dq(q), dout(qn), dsk(sk), dsv(sv);
  DeviceBuffer<int32_t> dlen(c.lengths), dids(ids), dcounts(counts);
  SparseAttentionParams p;
  p.batch = batch;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.d;
  p.max_len = max_len;
  p.num_sinks = c.sinks;
  p.window = c.window;
  p.q = dq.get();
  p.lengths = dlen.get();
  p.cache = cache.dev;
  p.slots = SlotCacheView{dsk.get(),  dsv.get(),  c.budget,     entry_stride,
                          row_stride, dids.get(), dcounts.get()};
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  p.out = dout.get();
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, SparseAttentionWorkspaceBytes(p));
  DeviceBuffer<uint8_t> ws(ws_bytes);
  dout.Poison();
  ASSERT_OK(SparseAttention(p, ws.get(), ws_bytes, nullptr));
  const std::vector<uint16_t> out = dout.Download();

  SparseAttentionParams hp = p;
  hp.q = q.data();
  hp.lengths = c.lengths.data();
  hp.cache = cache.host;
  hp.slots = SlotCacheView{sk.data(),  sv.data(),  c.budget,     entry_stride,
                           row_stride, ids.data(), counts.data()};
  std::vector<float> ref(qn);
  SparseAttentionReference(hp, ref.data());
  ExpectAttentionClose(out, ref, c.name);

  // Every token attended exactly once: with all middle tokens in the slots the union is the
  // whole sequence, so the dense reference must agree too.
  if (c.all_middle) {
    DecodeAttentionParams dp;
    dp.batch = batch;
    dp.num_q_heads = c.q_heads;
    dp.num_kv_heads = c.kv_heads;
    dp.head_dim = c.d;
    dp.max_len = max_len;
    dp.q = q.data();
    dp.lengths = c.lengths.data();
    dp.cache = cache.host;
    dp.scale = p.scale;
    std::vector<float> dense(qn);
    DecodeAttentionReference(dp, dense.data());
    ExpectAttentionClose(out, dense, c.name + "_vs_dense");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SparseAttentionTest,
    ::testing::Values(
        SparseCase{"g4_d128_overlapping_slots", 32, 8, 128, {3000, 700}, 4, 64, 256, 0, false},
        SparseCase{"g1_d64_short_sequences", 4, 4, 64, {10, 3, 1}, 4, 8, 16, 0, false},
        SparseCase{"g8_d128_paged_no_slots", 16, 2, 128, {900, 33}, 16, 128, 0, 16, false},
        SparseCase{"g4_d64_union_is_dense", 8, 2, 64, {1500, 260}, 4, 64, 1536, 32, true},
        SparseCase{"g8_d128_union_is_dense", 16, 2, 128, {2000}, 8, 100, 2048, 0, true}),
    [](const auto& info) { return info.param.name; });

// Prefill attention output check. The kernel rounds the probabilities to bf16 for P.V (as
// FlashAttention does), which the fp32 reference does not: with a[i] = sum_j p_j |v_j| / sum_j
// p_j (PrefillAttentionReference's abs_out), that rounding moves an element by at most u * a[i],
// so |o - r| <= u * (|r| + a) + 1e-5 * max(a) (output rounding, P rounding, fp32 order), and
// the relative L2 error, two independent roundings of ~1.6e-3 each, <= 5e-3.
void ExpectPrefillClose(const std::vector<uint16_t>& out, const std::vector<float>& ref,
                        const std::vector<float>& abs_ref, const std::string& what) {
  ASSERT_EQ(out.size(), ref.size());
  ASSERT_EQ(abs_ref.size(), ref.size());
  double max_a = 0.0, err2 = 0.0, ref2 = 0.0, worst = 0.0;
  for (float a : abs_ref) max_a = std::max(max_a, static_cast<double>(a));
  int bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double o = Bf16ToF32(out[i]), r = ref[i], a = abs_ref[i];
    const double d = std::abs(o - r);
    err2 += d * d;
    ref2 += r * r;
    const double tol = std::ldexp(1.0, -8) * (std::abs(r) + a) + 1e-5 * max_a;
    if (!(d <= tol)) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": element " << i << " got " << o << " want " << r << " (|v| " << a
                      << ")";
      }
    }
    worst = std::max(worst, d / tol);
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << out.size() << " elements off";
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  EXPECT_LE(rel, 5e-3) << what;
  std::printf("[ stats    ] %s: rel L2 %.3g, worst error / tolerance %.3g\n", what.c_str(), rel,
              worst);
}

struct PrefillCase {
  std::string name;
  int q_heads, kv_heads, d;
  int n, start;    // chunk of n tokens at positions [start, start + n)
  int page_size;   // 0 = contiguous
  int batch, seq;  // sequences in the cache, and the one attended to
  bool strided;    // q and out rows with token strides above the packed width
};

void PrintTo(const PrefillCase& c, std::ostream* os) { *os << c.name; }

class PrefillAttentionTest : public ::testing::TestWithParam<PrefillCase> {};

// Every block size (auto, 64, 128) against the reference. Cache rows the kernel must not read
// (other sequences, positions >= start + n) hold NaN, so reading one fails the comparison.
TEST_P(PrefillAttentionTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const PrefillCase& c = GetParam();
  std::mt19937 rng(std::hash<std::string>{}(c.name));
  const int kv_len = c.start + c.n;
  const int max_len = kv_len + 37;  // rows past the chunk's end exist but must not be read
  TestCache cache(c.batch, max_len, c.kv_heads, c.d, c.page_size, rng);
  constexpr uint16_t kNaN = 0x7fc0;
  for (int b = 0; b < c.batch; ++b) {
    for (int t = b == c.seq ? kv_len : 0; t < max_len; ++t) {
      int64_t page = b, in_page = t;
      if (c.page_size != 0) {
        page = cache.page_table[b * cache.host.page_table_stride + t / c.page_size];
        in_page = t % c.page_size;
      }
      for (int h = 0; h < c.kv_heads; ++h) {
        const int64_t off = page * cache.host.page_stride + in_page * cache.host.token_stride +
                            h * cache.host.head_stride;
        std::fill_n(cache.k.begin() + off, c.d, kNaN);
        std::fill_n(cache.v.begin() + off, c.d, kNaN);
      }
    }
  }
  cache.dk->Upload(cache.k);
  cache.dv->Upload(cache.v);

  const int64_t packed = static_cast<int64_t>(c.q_heads) * c.d;
  const int64_t q_stride = c.strided ? packed + 2 * c.kv_heads * c.d : packed;  // fused q|k|v
  const int64_t out_stride = c.strided ? packed + 8 : packed;
  std::vector<uint16_t> q = RandomBf16(static_cast<size_t>(c.n) * q_stride, rng);
  DeviceBuffer<uint16_t> dq(q), dout(static_cast<size_t>(c.n) * out_stride);

  PrefillAttentionParams p;
  p.num_tokens = c.n;
  p.start = c.start;
  p.num_q_heads = c.q_heads;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.d;
  p.q = dq.get();
  p.q_token_stride = c.strided ? q_stride : 0;
  p.cache = cache.dev;
  p.seq = c.seq;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  p.out = dout.get();
  p.out_token_stride = c.strided ? out_stride : 0;

  PrefillAttentionParams hp = p;
  hp.q = q.data();
  hp.cache = cache.host;
  const size_t on = static_cast<size_t>(c.n) * packed;
  std::vector<float> ref(on), abs_ref(on);
  PrefillAttentionReference(hp, ref.data(), abs_ref.data());

  for (const int block_rows : {0, 64, 128}) {
    const std::string what = absl::StrCat(c.name, "_rows", block_rows);
    p.block_rows = block_rows;
    dout.Poison();
    ASSERT_OK(PrefillAttention(p, nullptr));
    const std::vector<uint16_t> got = dout.Download();
    std::vector<uint16_t> out(on);
    for (int i = 0; i < c.n; ++i) {
      std::copy_n(got.begin() + i * out_stride, packed, out.begin() + i * packed);
      for (int64_t j = packed; j < out_stride; ++j) {
        ASSERT_EQ(got[i * out_stride + j], 0xffff) << what << ": wrote past token " << i;
      }
    }
    ExpectPrefillClose(out, ref, abs_ref, what);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PrefillAttentionTest,
    ::testing::Values(
        PrefillCase{"n1_start0_g1_d128", 8, 8, 128, 1, 0, 0, 1, 0, false},
        PrefillCase{"n1_start777_g4_d64_paged16", 16, 4, 64, 1, 777, 16, 2, 1, false},
        PrefillCase{"n100_start0_g4_d128", 32, 8, 128, 100, 0, 0, 1, 0, false},
        PrefillCase{"n300_start0_g1_d64", 4, 4, 64, 300, 0, 0, 1, 0, false},
        PrefillCase{"chunk_n200_start1000_g4_d128_paged64", 16, 4, 128, 200, 1000, 64, 1, 0, false},
        PrefillCase{"chunk_n129_start63_g4_d64_strided_seq2", 8, 2, 64, 129, 63, 0, 3, 2, true},
        PrefillCase{"n513_start0_g8_d128_paged16", 16, 2, 128, 513, 0, 16, 2, 0, false},
        PrefillCase{"chunk_n64_start4032_g4_d128_seq1", 32, 8, 128, 64, 4032, 0, 2, 1, false},
        PrefillCase{"chunk_n1000_start10_g2_d64_paged1", 4, 2, 64, 1000, 10, 1, 1, 0, false},
        PrefillCase{"llama3_chunk_n512_start2048_strided", 32, 8, 128, 512, 2048, 0, 1, 0, true}),
    [](const auto& info) { return info.param.name; });

// Chunked prefill equals one-shot prefill: the chunks [0, 300) and [300, 700) of a sequence
// give the rows of a single 700-token call.
TEST(PrefillAttentionChunkTest, ChunksMatchOneCall) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  const int hq = 8, hkv = 2, d = 128, n = 700, split = 300;
  TestCache cache(1, n, hkv, d, 32, rng);
  const int64_t row = static_cast<int64_t>(hq) * d;
  std::vector<uint16_t> q = RandomBf16(n * row, rng);
  DeviceBuffer<uint16_t> dq(q), whole(n * row), chunked(n * row);
  PrefillAttentionParams p;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.cache = cache.dev;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.num_tokens = n;
  p.q = dq.get();
  p.out = whole.get();
  ASSERT_OK(PrefillAttention(p, nullptr));
  chunked.Poison();
  p.num_tokens = split;
  p.out = chunked.get();
  ASSERT_OK(PrefillAttention(p, nullptr));
  p.start = split;
  p.num_tokens = n - split;
  p.q = dq.get() + split * row;
  p.out = chunked.get() + split * row;
  ASSERT_OK(PrefillAttention(p, nullptr));
  const std::vector<uint16_t> a = whole.Download(), b = chunked.Download();
  // Bit-identical: a row sees the same key tiles in the same order whichever query tile it is
  // in (fully masked tiles change nothing: alpha = 1, p = 0).
  int off = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i] && ++off <= 5) {
      ADD_FAILURE() << "element " << i << ": " << Bf16ToF32(a[i]) << " vs " << Bf16ToF32(b[i]);
    }
  }
  EXPECT_EQ(off, 0);
}

// A page-locked, device-mapped copy of h (null, with a test failure, if the allocation fails).
using PinnedRows = std::unique_ptr<uint16_t, decltype(&cudaFreeHost)>;
PinnedRows PinnedCopy(const std::vector<uint16_t>& h) {
  uint16_t* p = nullptr;
  EXPECT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&p), h.size() * 2, cudaHostAllocMapped), cudaSuccess);
  if (p != nullptr) std::copy(h.begin(), h.end(), p);
  return PinnedRows(p, &cudaFreeHost);
}

// A SlotScatter run on the device: a batch x kv_heads slot cache of `budget` rows of head_dim d,
// K and V slots initialised at random (ks / vs, the host copies), the kernel's fills and fill
// slots uploaded, num_rejected zeroed; `p` points at all of it (num_fill_slots: all of them).
struct ScatterCase {
  ScatterCase(int batch, int kv, int budget, int d, const std::vector<SlotFill>& dev_fills,
              const std::vector<int32_t>& fill_slots, std::mt19937& rng)
      : ks(RandomBf16(static_cast<size_t>(batch) * kv * budget * d, rng)),
        vs(RandomBf16(ks.size(), rng)),
        dks(ks),
        dvs(vs),
        dfills(dev_fills),
        dslots(fill_slots),
        drej(std::vector<int32_t>{0}) {
    p.head_dim = d;
    p.batch = batch;
    p.num_kv_heads = kv;
    p.budget = budget;
    p.entry_stride = static_cast<int64_t>(budget) * d;
    p.row_stride = d;
    p.num_entries = static_cast<int>(dev_fills.size());
    p.entries = dfills.get();
    p.fill_slots = dslots.get();
    p.num_fill_slots = static_cast<int64_t>(fill_slots.size());
    p.k_slots = dks.get();
    p.v_slots = dvs.get();
    p.num_rejected = drej.get();
  }
  std::vector<uint16_t> ks, vs;
  DeviceBuffer<uint16_t> dks, dvs;
  DeviceBuffer<SlotFill> dfills;
  DeviceBuffer<int32_t> dslots, drej;
  SlotScatterParams p;
};

// Runs SlotScatter with `p` (device buffers: entries, fill_slots, k/v slots initialised to ks /
// vs, num_rejected zeroed) and the reference with `host` (p with host_fills, fill_slots and
// host copies of ks / vs); expects the same slot caches and `want_rejected` rows rejected by both.
void ExpectScatterAsReference(const SlotScatterParams& p, const std::vector<SlotFill>& host_fills,
                              const std::vector<int32_t>& fill_slots, std::vector<uint16_t> ks,
                              std::vector<uint16_t> vs, int want_rejected) {
  ASSERT_OK(SlotScatter(p, nullptr));
  int32_t rejected = 0;
  SlotScatterParams hp = p;
  hp.entries = host_fills.data();
  hp.fill_slots = fill_slots.data();
  hp.k_slots = ks.data();
  hp.v_slots = vs.data();
  hp.num_rejected = &rejected;
  SlotScatterReference(hp);
  EXPECT_EQ(rejected, want_rejected);
  int32_t device_rejected = -1;
  ASSERT_EQ(cudaMemcpy(&device_rejected, p.num_rejected, 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(device_rejected, rejected);
  std::vector<uint16_t> got(ks.size());
  ASSERT_EQ(cudaMemcpy(got.data(), p.k_slots, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got, ks);
  ASSERT_EQ(cudaMemcpy(got.data(), p.v_slots, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got, vs);
}

// Every entry's rows ([n][K | V] bf16) in one of three places the kernel must read: device
// memory, page-locked host memory (over the bus, as the engine reads the tier's recall buffer),
// and pinned memory again for the last entries. Invalid entries and slots are skipped and
// counted, the way the reference does.
TEST(SlotScatterTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  const int batch = 3, kv = 4, budget = 50, d = 128;
  const int valid = batch * kv;
  std::vector<int> counts(valid);
  size_t total = 0;
  for (int& n : counts) total += n = static_cast<int>(rng() % (budget + 1));
  // Host copies (the reference reads these) and the kernel's copies.
  std::vector<uint16_t> rows = RandomBf16(total * 2 * d, rng);
  DeviceBuffer<uint16_t> drows(rows);
  PinnedRows pinned_rows = PinnedCopy(rows);
  ASSERT_NE(pinned_rows, nullptr);
  uint16_t* pinned = pinned_rows.get();
  std::vector<SlotFill> host_fills, dev_fills;
  std::vector<int32_t> fill_slots;
  size_t row = 0;
  for (int e = 0; e < valid; ++e) {
    std::vector<int32_t> slots(budget);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    slots.resize(counts[e]);
    if (e == 5 && !slots.empty()) slots[0] = budget;  // one bad slot: that row only is skipped
    const int32_t first = static_cast<int32_t>(fill_slots.size());
    fill_slots.insert(fill_slots.end(), slots.begin(), slots.end());
    SlotFill f{rows.data() + row * 2 * d, e / kv, e % kv, first, counts[e]};
    host_fills.push_back(f);
    f.rows = (e % 2 == 0 ? drows.get() : pinned) + row * 2 * d;
    dev_fills.push_back(f);
    row += counts[e];
  }
  // Invalid entries: sequence, kv-head, fill range, misaligned rows.
  const int32_t n_slots = static_cast<int32_t>(fill_slots.size());
  const SlotFill bad[] = {{nullptr, batch, 0, 0, 3},
                          {nullptr, 0, -1, 0, 2},
                          {nullptr, 1, 1, n_slots - 1, 2},
                          {nullptr, 2, 2, -1, 1},
                          {nullptr, 0, 0, 0, 0}};  // valid: no rows, so no pointer needed
  for (size_t b = 0; b < std::size(bad); ++b) {
    SlotFill f = bad[b];
    if (f.num_rows > 0) f.rows = rows.data();
    host_fills.push_back(f);
    if (f.num_rows > 0) f.rows = drows.get();
    dev_fills.push_back(f);
  }
  SlotFill misaligned{rows.data() + 1, 0, 1, 0, 1};
  host_fills.push_back(misaligned);
  misaligned.rows = drows.get() + 1;
  dev_fills.push_back(misaligned);

  ScatterCase c(batch, kv, budget, d, dev_fills, fill_slots, rng);
  SlotScatterParams& p = c.p;
  ExpectScatterAsReference(p, host_fills, fill_slots, c.ks, c.vs,
                           (counts[5] > 0 ? 1 : 0) + 3 + 2 + 2 + 1 + 1);

  p.row_stride = d + 4;  // not a multiple of 8
  EXPECT_THAT(SlotScatter(p, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  p.row_stride = d;
  p.num_fill_slots = -1;
  EXPECT_THAT(SlotScatter(p, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Rows gathered by address (SlotFill::row_addresses), as LocalTier gives them: each K and V row
// anywhere in page-locked host memory or device memory, in no order. Null, misaligned and
// out-of-budget rows are skipped and counted, and so is an entry whose address array is
// misaligned; everything else lands as the reference puts it.
TEST(SlotScatterTest, GathersRowsByAddress) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  const int batch = 2, kv = 3, budget = 40, d = 128;
  const size_t pool_rows = 500;  // K and V rows are drawn from here at random
  std::vector<uint16_t> pool = RandomBf16(pool_rows * d, rng);
  DeviceBuffer<uint16_t> dpool(pool);
  PinnedRows pinned_pool = PinnedCopy(pool);
  ASSERT_NE(pinned_pool, nullptr);
  uint16_t* pinned = pinned_pool.get();
  // Host addresses for the reference, device-readable ones for the kernel; both address arrays
  // live in page-locked memory, as CudaEngine keeps them.
  std::vector<const uint16_t*> host_addr;
  std::vector<const uint16_t*> dev_addr_v;
  std::vector<SlotFill> host_fills, dev_fills;
  std::vector<int32_t> fill_slots;
  int expected_rejects = 0;
  for (int e = 0; e < batch * kv; ++e) {
    std::vector<int32_t> slots(budget);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    const int n = e == 1 ? budget : static_cast<int>(rng() % (budget + 1));
    slots.resize(n);
    const int32_t first = static_cast<int32_t>(fill_slots.size());
    const size_t at = host_addr.size();
    for (int j = 0; j < n; ++j) {
      for (int kv_part = 0; kv_part < 2; ++kv_part) {
        const size_t r = rng() % pool_rows;
        host_addr.push_back(pool.data() + r * d);
        dev_addr_v.push_back(((e + j) % 3 == 0 ? dpool.get() : pinned) + r * d);
      }
    }
    if (e == 1) {
      slots[0] = budget;                                 // a bad slot
      host_addr[at + 2] = dev_addr_v[at + 2] = nullptr;  // row 1's K is null
      host_addr[at + 5] = host_addr[at + 5] + 1;         // row 2's V is misaligned
      dev_addr_v[at + 5] = dev_addr_v[at + 5] + 1;
      expected_rejects += 3;
    }
    fill_slots.insert(fill_slots.end(), slots.begin(), slots.end());
    host_fills.push_back({nullptr, e / kv, e % kv, first, n, nullptr});
    dev_fills.push_back({nullptr, e / kv, e % kv, first, n, nullptr});
  }
  const size_t addr_bytes = dev_addr_v.size() * sizeof(uint16_t*) + 8;
  const uint16_t** dev_addr = nullptr;
  ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&dev_addr), addr_bytes, cudaHostAllocMapped),
            cudaSuccess);
  std::unique_ptr<const uint16_t*, void (*)(const uint16_t**)> free_addr(
      dev_addr, [](const uint16_t** p) { cudaFreeHost(p); });
  std::copy(dev_addr_v.begin(), dev_addr_v.end(), dev_addr);
  size_t at = 0;
  for (size_t e = 0; e < host_fills.size(); ++e) {
    host_fills[e].row_addresses = host_addr.data() + at;
    dev_fills[e].row_addresses = dev_addr + at;
    at += 2 * static_cast<size_t>(host_fills[e].num_rows);
  }
  // An entry whose address array is misaligned: all of its rows are skipped.
  SlotFill skewed{nullptr, 0, 0, 0, 2, nullptr};
  skewed.row_addresses = reinterpret_cast<const uint16_t* const*>(
      reinterpret_cast<const uint8_t*>(host_addr.data()) + 4);
  host_fills.push_back(skewed);
  skewed.row_addresses =
      reinterpret_cast<const uint16_t* const*>(reinterpret_cast<const uint8_t*>(dev_addr) + 4);
  dev_fills.push_back(skewed);
  expected_rejects += 2;

  ScatterCase c(batch, kv, budget, d, dev_fills, fill_slots, rng);
  ExpectScatterAsReference(c.p, host_fills, fill_slots, c.ks, c.vs, expected_rejects);
}

// New K/V rows appended into a contiguous cache and into a paged one (page size 1 and 16, the
// page table of a ring), from a fused q|k|v buffer; negative positions write nothing.
TEST(KvAppendTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(9);
  const int batch = 5, kv = 4, d = 128, q_dim = 8 * d, max_len = 64;
  const int64_t width = q_dim + 2 * kv * d;
  std::vector<uint16_t> qkv = RandomBf16(static_cast<size_t>(batch) * width, rng);
  const std::vector<int32_t> positions = {0, 17, 63, -1, 40};
  DeviceBuffer<uint16_t> dqkv(qkv);
  DeviceBuffer<int32_t> dpos(positions);
  for (int page_size : {0, 1, 16}) {
    SCOPED_TRACE(page_size);
    const int pages_per_seq = page_size == 0 ? 1 : max_len / page_size;
    const int pages = batch * pages_per_seq;
    std::vector<int32_t> table(static_cast<size_t>(pages));
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    const int64_t page_elems = static_cast<int64_t>(page_size == 0 ? max_len : page_size) * kv * d;
    std::vector<uint16_t> ck = RandomBf16(static_cast<size_t>(pages) * page_elems, rng), cv = ck;
    DeviceBuffer<uint16_t> dck(ck), dcv(cv);
    DeviceBuffer<int32_t> dtable(table);
    KvAppendParams p;
    p.batch = batch;
    p.num_kv_heads = kv;
    p.head_dim = d;
    p.k = dqkv.get() + q_dim;
    p.v = dqkv.get() + q_dim + kv * d;
    p.src_stride = width;
    p.positions = dpos.get();
    p.cache_k = dck.get();
    p.cache_v = dcv.get();
    p.page_table = page_size == 0 ? nullptr : dtable.get();
    p.page_table_stride = pages_per_seq;
    p.page_size = page_size;
    p.page_stride = page_elems;
    p.token_stride = static_cast<int64_t>(kv) * d;
    p.head_stride = d;
    ASSERT_OK(KvAppend(p, nullptr));
    KvAppendParams hp = p;
    hp.k = qkv.data() + q_dim;
    hp.v = qkv.data() + q_dim + kv * d;
    hp.positions = positions.data();
    hp.cache_k = ck.data();
    hp.cache_v = cv.data();
    hp.page_table = page_size == 0 ? nullptr : table.data();
    KvAppendReference(hp);
    EXPECT_EQ(dck.Download(), ck);
    EXPECT_EQ(dcv.Download(), cv);
  }
}

// Bit-identical to the host reference, any slice of the stream generated on its own.
TEST(FillRandomBf16Test, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1000003;
  DeviceBuffer<uint16_t> d(static_cast<size_t>(n));
  d.Poison();
  ASSERT_OK(FillRandomBf16(d.get(), n, 42, 12345, 0.02f, nullptr));
  std::vector<uint16_t> want(static_cast<size_t>(n));
  FillRandomBf16Reference(want.data(), n, 42, 12345, 0.02f);
  EXPECT_EQ(d.Download(), want);
  std::vector<uint16_t> slice(10);
  FillRandomBf16Reference(slice.data(), 10, 42, 12345 + 500, 0.02f);
  EXPECT_TRUE(std::equal(slice.begin(), slice.end(), want.begin() + 500));
  double sum = 0, lo = 1, hi = -1;
  for (uint16_t x : want) {
    const double f = Bf16ToF32(x);
    sum += f;
    lo = std::min(lo, f);
    hi = std::max(hi, f);
  }
  // Mean 0, range [-0.02, 0.02) before the bf16 rounding, which may reach +-0.02 (1 + 2^-8).
  EXPECT_LT(std::fabs(sum / n), 1e-4);
  EXPECT_GE(lo, -0.02 * (1 + 1.0 / 256));
  EXPECT_LE(hi, 0.02 * (1 + 1.0 / 256));
  EXPECT_GT(hi - lo, 0.039);
}

// |a - b| in bf16 ulps (same sign assumed; different signs count as far apart unless both ~0).
int UlpDiff(uint16_t a, uint16_t b) {
  auto key = [](uint16_t x) {
    return (x & 0x8000) ? -static_cast<int>(x & 0x7fff) : static_cast<int>(x);
  };
  return std::abs(key(a) - key(b));
}

void ExpectWithinUlp(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want, int ulps,
                     const char* what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0, off = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const int u = UlpDiff(got[i], want[i]);
    if (u > 0) ++off;
    if (u > ulps && ++bad <= 5) {
      ADD_FAILURE() << what << ": element " << i << " got " << Bf16ToF32(got[i]) << " want "
                    << Bf16ToF32(want[i]);
    }
  }
  EXPECT_EQ(bad, 0) << what;
  std::printf("[ stats    ] %s: %d of %zu elements 1 ulp off\n", what, off, got.size());
}

TEST(RmsNormTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  for (const int dim : {72, 4096}) {
    const int rows = 7;
    std::vector<uint16_t> x = RandomBf16(rows * dim, rng, 3.0f), w = RandomBf16(dim, rng);
    DeviceBuffer<uint16_t> dx(x), dw(w), dout(x.size());
    dout.Poison();
    ASSERT_OK(RmsNorm(dx.get(), dw.get(), rows, dim, 1e-5f, dout.get(), nullptr));
    std::vector<uint16_t> ref(x.size());
    RmsNormReference(x.data(), w.data(), rows, dim, 1e-5f, ref.data());
    ExpectWithinUlp(dout.Download(), ref, 1, "rmsnorm");
    // In place.
    ASSERT_OK(RmsNorm(dx.get(), dw.get(), rows, dim, 1e-5f, dx.get(), nullptr));
    ExpectWithinUlp(dx.Download(), ref, 1, "rmsnorm in place");
  }
}

TEST(RopeTest, MatchesReferenceWithLlama3Scaling) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  for (const bool llama3 : {false, true}) {
    for (const int d : {64, 128}) {
      RopeScaling sc;
      if (llama3) sc.type = RopeScaling::Type::kLlama3;
      const std::vector<double> inv = RopeInverseFrequencies(d, 500000.0, sc);
      const int tokens = 9, heads = 5;
      const int64_t stride = heads * d + 3 * d;  // a fused qkv row: rotate the first 5 heads
      std::vector<uint16_t> x = RandomBf16(tokens * stride, rng);
      std::vector<int32_t> pos = {0, 1, 2, 100, 8191, 8192, 32767, 98303, 131071};
      DeviceBuffer<uint16_t> dx(x);
      DeviceBuffer<int32_t> dpos(pos);
      DeviceBuffer<double> dinv(inv);
      ASSERT_OK(Rope(dx.get(), tokens, heads, d, stride, dpos.get(), dinv.get(), nullptr));
      std::vector<uint16_t> ref = x;
      RopeReference(ref.data(), tokens, heads, d, stride, pos.data(), inv.data());
      EXPECT_NE(ref, x);
      ExpectWithinUlp(dx.Download(), ref, 1, llama3 ? "rope llama3" : "rope");
    }
  }
}

TEST(SwiGluTest, MatchesReferenceOnFusedBuffer) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  const int rows = 5, dim = 1000;
  std::vector<uint16_t> gu = RandomBf16(rows * 2 * dim, rng, 2.0f);
  DeviceBuffer<uint16_t> dgu(gu), dout(rows * dim);
  dout.Poison();
  ASSERT_OK(SwiGlu(dgu.get(), dgu.get() + dim, rows, dim, 2 * dim, dout.get(), nullptr));
  std::vector<uint16_t> ref(rows * dim);
  SwiGluReference(gu.data(), gu.data() + dim, rows, dim, 2 * dim, ref.data());
  ExpectWithinUlp(dout.Download(), ref, 1, "swiglu");
}

TEST(EmbeddingGatherTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(14);
  const int vocab = 1000, dim = 256;
  std::vector<uint16_t> table = RandomBf16(vocab * dim, rng);
  std::vector<int32_t> ids = {0, 999, 5, 5, -1, 1000, 123};
  DeviceBuffer<uint16_t> dt(table), dout(ids.size() * dim);
  DeviceBuffer<int32_t> dids(ids);
  dout.Poison();
  ASSERT_OK(EmbeddingGather(dt.get(), vocab, dim, dids.get(), ids.size(), dout.get(), nullptr));
  std::vector<uint16_t> ref(ids.size() * dim);
  EmbeddingGatherReference(table.data(), vocab, dim, ids.data(), ids.size(), ref.data());
  EXPECT_EQ(dout.Download(), ref);
}

TEST(ArgmaxTest, MatchesReferenceWithTiesAndNaN) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(15);
  const int rows = 6, vocab = 128256;
  std::normal_distribution<float> dist(0.0f, 4.0f);
  std::vector<float> x(static_cast<size_t>(rows) * vocab);
  for (auto& v : x) v = dist(rng);
  x[1 * vocab + 70000] = 100.0f;  // tie: the lower index wins
  x[1 * vocab + 3] = 100.0f;
  x[2 * vocab + 5] = NAN;
  x[2 * vocab + 128255] = 50.0f;
  std::fill(x.begin() + 3 * vocab, x.begin() + 4 * vocab, -1.0f);  // all equal: index 0
  std::fill(x.begin() + 4 * vocab, x.begin() + 5 * vocab, NAN);    // all NaN: index 0
  DeviceBuffer<float> dx(x);
  DeviceBuffer<int32_t> dout(rows);
  dout.Poison();
  ASSERT_OK(Argmax(dx.get(), rows, vocab, dout.get(), nullptr));
  std::vector<int32_t> ref(rows);
  ArgmaxReference(x.data(), rows, vocab, ref.data());
  EXPECT_EQ(ref[1], 3);
  EXPECT_EQ(ref[2], 128255);
  EXPECT_EQ(dout.Download(), ref);
}

TEST(SampleTopPTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(16);
  const int rows = 96, vocab = 32000;
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(rows) * vocab), temp(rows), top_p(rows), u(rows);
  for (auto& v : x) v = dist(rng);
  const float temps[] = {0.0f, 0.3f, 0.7f, 1.0f, 1.5f};
  const float ps[] = {0.1f, 0.5f, 0.9f, 0.95f, 1.0f, 0.0f};
  for (int r = 0; r < rows; ++r) {
    temp[r] = temps[r % 5];
    top_p[r] = ps[(r / 5) % 6];
    u[r] = uni(rng);
  }
  DeviceBuffer<float> dx(x), dt(temp), dp(top_p), du(u);
  DeviceBuffer<int32_t> dout(rows);
  dout.Poison();
  ASSERT_OK(SampleTopP(dx.get(), rows, vocab, dt.get(), dp.get(), du.get(), dout.get(), nullptr));
  std::vector<int32_t> ref(rows);
  std::unique_ptr<bool[]> amb(new bool[rows]);
  SampleTopPReference(x.data(), rows, vocab, temp.data(), top_p.data(), u.data(), ref.data(),
                      amb.get());
  const std::vector<int32_t> got = dout.Download();
  int ambiguous = 0;
  for (int r = 0; r < rows; ++r) {
    if (amb[r]) {
      ++ambiguous;
      continue;
    }
    EXPECT_EQ(got[r], ref[r]) << "row " << r << " temperature " << temp[r] << " top_p " << top_p[r]
                              << " u " << u[r];
  }
  EXPECT_LE(ambiguous, rows / 6);
  // The sampler is not argmax in disguise: at temperature 1.5, top_p 1 the picks vary.
  std::printf("[ stats    ] top-p: %d of %d rows near a boundary\n", ambiguous, rows);
}

// ---- CTKVR lists ---------------------------------------------------------------------------

struct CtkvrCase {
  std::string name;
  int kv_heads, group, centroids, d;
  int64_t begin, n;
  int list_size;
  // Keys inside fused [T][(q_heads + 2 kv_heads) d] qkv rows (head_stride d, token_stride the
  // whole row) and query rows padded by 16 elements; otherwise [T][kv_heads][d] and packed.
  bool fused = false;
  int distinct_keys = 0;  // > 0: every key row is one of this many, so scores tie exactly
};

void PrintTo(const CtkvrCase& c, std::ostream* os) { *os << c.name; }

// The list check (tolerances in the ctkvr test below): every list strictly ascending inside
// [begin, end); the tokens where it differs from the reference's all have reference scores
// within 1e-5 (relative to |threshold| + 1e-6) of the list's threshold (its lowest reference
// score), at most 1% of list_len of them; none at all where `exact`.
void ExpectListsClose(const CtkvrListsParams& p, const std::vector<int32_t>& got,
                      const std::vector<int32_t>& want, const std::vector<double>& scores,
                      bool exact, const std::string& what) {
  const int64_t n = p.end - p.begin, len = std::min<int64_t>(p.list_size, n);
  const int lists = p.num_kv_heads * p.num_centroids;
  ASSERT_EQ(got.size(), static_cast<size_t>(lists * len));
  int64_t near_total = 0, worst = 0;
  for (int l = 0; l < lists; ++l) {
    const int32_t* g = got.data() + l * len;
    const int32_t* w = want.data() + l * len;
    const double* sc = scores.data() + l * n;
    bool shaped = true;
    for (int64_t i = 0; i < len && shaped; ++i) {
      if (g[i] < p.begin || g[i] >= p.end || (i > 0 && g[i] <= g[i - 1])) {
        ADD_FAILURE() << what << ": list " << l << " entry " << i << " = " << g[i] << " (previous "
                      << (i > 0 ? g[i - 1] : -1) << ") breaks the order or range";
        shaped = false;
      }
    }
    if (!shaped) continue;
    double threshold = INFINITY;
    for (int64_t i = 0; i < len; ++i) threshold = std::min(threshold, sc[w[i] - p.begin]);
    const double tol = 1e-5 * (std::abs(threshold) + 1e-6);
    std::vector<int32_t> diff;
    std::set_symmetric_difference(g, g + len, w, w + len, std::back_inserter(diff));
    for (int32_t t : diff) {
      const double s = sc[t - p.begin];
      if (exact || !(std::abs(s - threshold) <= tol)) {
        ADD_FAILURE() << what << ": list " << l << " differs at position " << t << " (score " << s
                      << ", threshold " << threshold << ", in kernel's list "
                      << std::binary_search(g, g + len, t) << ")";
      }
    }
    const int64_t near = static_cast<int64_t>(diff.size()) / 2;  // swapped pairs
    EXPECT_LE(near * 100, len) << what << ": list " << l << " has " << near << " near-tie swaps";
    near_total += near;
    worst = std::max(worst, near);
  }
  std::printf("[ stats    ] %s: %lld near-tie swaps over %d lists of %lld (worst list %lld)\n",
              what.c_str(), static_cast<long long>(near_total), lists, static_cast<long long>(len),
              static_cast<long long>(worst));
}

void ExpectLseClose(const std::vector<float>& got, const std::vector<float>& want,
                    const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  double worst = 0.0;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]) /
                       std::max(1.0, std::abs(static_cast<double>(want[i])));
    if (!(err <= 1e-5) && ++bad <= 5) {
      ADD_FAILURE() << what << ": lse " << i << " got " << got[i] << " want " << want[i];
    }
    worst = std::max(worst, err);
  }
  EXPECT_EQ(bad, 0) << what;
  std::printf("[ stats    ] %s: lse worst rel error %.3g\n", what.c_str(), worst);
}

// Tolerances: lse relative error <= 1e-5 (relative to max(|lse|, 1); fp32 logits and sums vs
// double); lists as ExpectListsClose, which with exact ties (distinct_keys) means identical:
// such a case first checks that no two distinct reference scores near a threshold are within
// the tolerance, so the lower-position rule alone decides.
class CtkvrListsTest : public ::testing::TestWithParam<CtkvrCase> {};

TEST_P(CtkvrListsTest, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const CtkvrCase& c = GetParam();
  std::mt19937 rng(std::hash<std::string>{}(c.name));
  const int q_heads = c.kv_heads * c.group, kv = c.kv_heads, d = c.d;
  const int64_t end = c.begin + c.n, rows = end + 3;  // rows past the range exist too
  CtkvrListsParams p;
  p.head_stride = d;
  p.token_stride = c.fused ? static_cast<int64_t>(q_heads + 2 * kv) * d : kv * d;
  const int64_t key_offset = c.fused ? static_cast<int64_t>(q_heads) * d : 0;
  std::vector<uint16_t> buf = RandomBf16(rows * p.token_stride, rng);
  if (c.distinct_keys > 0) {
    const std::vector<uint16_t> distinct = RandomBf16(c.distinct_keys * kv * d, rng);
    std::uniform_int_distribution<int> pick(0, c.distinct_keys - 1);
    for (int64_t t = c.begin; t < end; ++t) {
      std::copy_n(distinct.begin() + pick(rng) * kv * d, kv * d,
                  buf.begin() + t * p.token_stride + key_offset);
    }
  }
  // Rows outside [begin, end) are NaN: a kernel that used them would show it.
  for (int64_t t = 0; t < rows; ++t) {
    if (t < c.begin || t >= end) {
      std::fill_n(buf.begin() + t * p.token_stride, p.token_stride, uint16_t{0x7fc0});
    }
  }
  p.query_stride = static_cast<int64_t>(q_heads) * d + (c.fused ? 16 : 0);
  const std::vector<uint16_t> queries = RandomBf16(c.centroids * p.query_stride, rng);
  DeviceBuffer<uint16_t> dkeys(buf), dq(queries);
  p.keys = dkeys.get() + key_offset;
  p.begin = c.begin;
  p.end = end;
  p.queries = dq.get();
  p.num_centroids = c.centroids;
  p.num_q_heads = q_heads;
  p.num_kv_heads = kv;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.list_size = c.list_size;
  const int64_t len = std::min<int64_t>(c.list_size, c.n);
  const size_t n_tokens = static_cast<size_t>(kv * c.centroids * len);
  const size_t n_lse = static_cast<size_t>(kv * c.centroids * c.group);
  DeviceBuffer<int32_t> dtokens(n_tokens);
  DeviceBuffer<float> dlse(n_lse);
  dtokens.Poison();
  dlse.Poison();
  p.tokens = dtokens.get();
  p.lse = dlse.get();
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, CtkvrListsWorkspaceBytes(p));
  DeviceBuffer<uint8_t> ws(ws_bytes);
  ws.Poison();
  ASSERT_OK(CtkvrLists(p, ws.get(), ws_bytes, nullptr));
  const std::vector<int32_t> got = dtokens.Download();
  const std::vector<float> got_lse = dlse.Download();

  CtkvrListsParams hp = p;
  hp.keys = buf.data() + key_offset;
  hp.queries = queries.data();
  std::vector<int32_t> want(n_tokens);
  std::vector<float> want_lse(n_lse);
  hp.tokens = want.data();
  hp.lse = want_lse.data();
  std::vector<double> scores;
  CtkvrListsReference(hp, &scores);

  ExpectLseClose(got_lse, want_lse, c.name);
  if (c.distinct_keys > 0) {
    // The case is well posed: around each threshold, distinct scores are far apart, and some
    // list cuts through a tier of equal scores (so the lower-position rule is exercised).
    int cut_tiers = 0;
    for (int l = 0; l < kv * c.centroids; ++l) {
      const double* sc = scores.data() + l * c.n;
      const int32_t* w = want.data() + l * len;
      double threshold = INFINITY;
      for (int64_t i = 0; i < len; ++i) threshold = std::min(threshold, sc[w[i] - c.begin]);
      const double tol = 1e-5 * (std::abs(threshold) + 1e-6);
      int64_t at_threshold = 0;
      for (int64_t t = 0; t < c.n; ++t) {
        if (sc[t] == threshold) {
          ++at_threshold;
        } else {
          ASSERT_GT(std::abs(sc[t] - threshold), 10 * tol) << "list " << l << ": pick another seed";
        }
      }
      int64_t listed_at_threshold = 0;
      for (int64_t i = 0; i < len; ++i) listed_at_threshold += sc[w[i] - c.begin] == threshold;
      if (listed_at_threshold < at_threshold) ++cut_tiers;
    }
    EXPECT_GT(cut_tiers, 0) << "no list cuts through a tier of ties";
  }
  ExpectListsClose(p, got, want, scores, c.distinct_keys > 0, c.name);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CtkvrListsTest,
    ::testing::Values(CtkvrCase{"d128_g4_n5000", 8, 4, 8, 128, 0, 5000, 512},
                      CtkvrCase{"d64_g1_begin300", 4, 1, 8, 64, 300, 4700, 512},
                      CtkvrCase{"d128_whole_range_n37", 2, 4, 3, 128, 5, 37, 100},
                      CtkvrCase{"d64_g4_list_n_minus_1", 2, 4, 8, 64, 0, 513, 512},
                      CtkvrCase{"fused_rows_begin1000", 8, 4, 8, 128, 1000, 3000, 256, true},
                      // 48 query rows: centroid 10's rows straddle the 32-row chunks.
                      CtkvrCase{"g3_c16_split_centroid", 2, 3, 16, 128, 17, 2000, 300},
                      // group 40: every centroid straddles chunks.
                      CtkvrCase{"g40_mqa", 1, 40, 2, 64, 0, 700, 64, true},
                      CtkvrCase{"exact_ties_d128_g2", 2, 2, 4, 128, 7, 3000, 500, false, 16},
                      CtkvrCase{"exact_ties_d64_g1", 3, 1, 5, 64, 0, 4000, 700, true, 9}),
    [](const ::testing::TestParamInfo<CtkvrCase>& info) { return info.param.name; });

// A long prefill's range (128K positions, Llama-3-8B's 8 kv-heads x 4, 8 centroids): the
// kernel's time, every list well formed and kv-head 0 (lists and lse) against the reference.
TEST(CtkvrListsLongTest, LongRangeTimedHeadZeroMatchesReference) {
  SKIP_WITHOUT_GPU();
  const int kv = 8, group = 4, centroids = 8, d = 128, list_size = 512;
  const int64_t n = 131072, begin = 0;
  CtkvrListsParams p;
  p.token_stride = kv * d;
  p.head_stride = d;
  p.begin = begin;
  p.end = begin + n;
  p.num_centroids = centroids;
  p.num_q_heads = kv * group;
  p.num_kv_heads = kv;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.list_size = list_size;
  p.query_stride = static_cast<int64_t>(p.num_q_heads) * d;
  std::mt19937 rng(17);
  const std::vector<uint16_t> queries = RandomBf16(centroids * p.query_stride, rng);
  DeviceBuffer<uint16_t> dkeys(static_cast<size_t>(n * p.token_stride)), dq(queries);
  ASSERT_OK(FillRandomBf16(dkeys.get(), n * p.token_stride, 5, 0, 1.0f, nullptr));
  const size_t n_tokens = static_cast<size_t>(kv * centroids * list_size);
  DeviceBuffer<int32_t> dtokens(n_tokens);
  DeviceBuffer<float> dlse(static_cast<size_t>(kv * centroids * group));
  dtokens.Poison();
  dlse.Poison();
  p.keys = dkeys.get();
  p.queries = dq.get();
  p.tokens = dtokens.get();
  p.lse = dlse.get();
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, CtkvrListsWorkspaceBytes(p));
  DeviceBuffer<uint8_t> ws(ws_bytes);
  ASSERT_OK(CtkvrLists(p, ws.get(), ws_bytes, nullptr));  // warm-up
  cudaEvent_t start, stop;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
  const int reps = 10;
  ASSERT_EQ(cudaEventRecord(start), cudaSuccess);
  for (int r = 0; r < reps; ++r) ASSERT_OK(CtkvrLists(p, ws.get(), ws_bytes, nullptr));
  ASSERT_EQ(cudaEventRecord(stop), cudaSuccess);
  ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
  float ms = 0.0f;
  ASSERT_EQ(cudaEventElapsedTime(&ms, start, stop), cudaSuccess);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::printf("[ stats    ] ctkvr lists, n %lld, 8 kv-heads x 4, 8 centroids, d 128: %.3f ms\n",
              static_cast<long long>(n), ms / reps);
  const std::vector<int32_t> got = dtokens.Download();
  const std::vector<float> got_lse = dlse.Download();
  for (float l : got_lse) ASSERT_TRUE(std::isfinite(l));
  for (int l = 0; l < kv * centroids; ++l) {
    for (int i = 0; i < list_size; ++i) {
      const int32_t t = got[l * list_size + i];
      ASSERT_TRUE(t >= begin && t < begin + n && (i == 0 || t > got[l * list_size + i - 1]))
          << "list " << l << " entry " << i << " = " << t;
    }
  }
  // kv-head 0 alone: its q-heads come first in every centroid's row.
  const std::vector<uint16_t> keys = dkeys.Download();
  CtkvrListsParams hp = p;
  hp.num_kv_heads = 1;
  hp.num_q_heads = group;
  hp.keys = keys.data();
  hp.queries = queries.data();
  std::vector<int32_t> want(static_cast<size_t>(centroids * list_size));
  std::vector<float> want_lse(static_cast<size_t>(centroids * group));
  hp.tokens = want.data();
  hp.lse = want_lse.data();
  std::vector<double> scores;
  CtkvrListsReference(hp, &scores);
  ExpectLseClose(std::vector<float>(got_lse.begin(), got_lse.begin() + want_lse.size()), want_lse,
                 "ctkvr long, kv-head 0");
  ExpectListsClose(hp, std::vector<int32_t>(got.begin(), got.begin() + want.size()), want, scores,
                   false, "ctkvr long, kv-head 0");
}

// ---- Argument checks: INVALID_ARGUMENT before any launch (no GPU needed) ------------------

// Fake, 16-byte aligned device addresses: never dereferenced because the checks fail first.
template <typename T>
T* Fake(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

// A contiguous cache view of `tokens` positions, 8 kv-heads of 128, at fake addresses.
KvCacheView FakeCache(int64_t tokens) {
  KvCacheView c;
  c.k = Fake<const uint16_t>(0x30000);
  c.v = Fake<const uint16_t>(0x40000);
  c.page_stride = tokens * 8 * 128;
  c.token_stride = 8 * 128;
  c.head_stride = 128;
  return c;
}

DecodeAttentionParams ValidDense() {
  DecodeAttentionParams p;
  p.batch = 2;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.max_len = 100;
  p.q = Fake<const uint16_t>(0x10000);
  p.lengths = Fake<const int32_t>(0x20000);
  p.cache = FakeCache(100);
  p.scale = 0.1f;
  p.out = Fake<uint16_t>(0x50000);
  return p;
}

TEST(ArgumentCheckTest, DecodeAttentionRejectsBadShapes) {
  std::vector<DecodeAttentionParams> bad;
  auto add = [&](auto mutate) {
    DecodeAttentionParams p = ValidDense();
    mutate(p);
    bad.push_back(p);
  };
  add([](auto& p) { p.head_dim = 96; });
  add([](auto& p) { p.num_q_heads = 30; });
  add([](auto& p) { p.num_kv_heads = 0; });
  add([](auto& p) { p.batch = 0; });
  add([](auto& p) { p.max_len = 0; });
  add([](auto& p) { p.num_splits = -1; });
  add([](auto& p) { p.q = Fake<const uint16_t>(0x10002); });
  add([](auto& p) { p.cache.token_stride = 1001; });
  add([](auto& p) { p.out = nullptr; });
  add([](auto& p) {
    p.cache.page_table = Fake<const int32_t>(0x60000);
    p.cache.page_size = 12;
    p.cache.page_table_stride = 10;
  });
  add([](auto& p) {
    p.cache.page_table = Fake<const int32_t>(0x60000);
    p.cache.page_size = 16;
    p.cache.page_table_stride = 6;  // 100 tokens need 7 pages
  });
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_THAT(DecodeAttention(bad[i], nullptr, 0, nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "case " << i;
    EXPECT_THAT(DecodeAttentionWorkspaceBytes(bad[i]), StatusIs(absl::StatusCode::kInvalidArgument))
        << "case " << i;
  }
}

TEST(ArgumentCheckTest, SparseAttentionAndScatterRejectBadShapes) {
  SparseAttentionParams p;
  const DecodeAttentionParams d = ValidDense();
  p.batch = d.batch;
  p.num_q_heads = d.num_q_heads;
  p.num_kv_heads = d.num_kv_heads;
  p.head_dim = d.head_dim;
  p.max_len = d.max_len;
  p.q = d.q;
  p.lengths = d.lengths;
  p.cache = d.cache;
  p.out = d.out;
  p.num_sinks = -1;
  EXPECT_THAT(SparseAttention(p, nullptr, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  p.num_sinks = 4;
  p.slots.budget = 16;  // null slot pointers
  EXPECT_THAT(SparseAttention(p, nullptr, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));

  SlotScatterParams s;
  s.num_entries = 1;
  s.head_dim = 100;
  s.batch = s.num_kv_heads = s.budget = 1;
  EXPECT_THAT(SlotScatter(s, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

PrefillAttentionParams ValidPrefill() {
  PrefillAttentionParams p;
  p.num_tokens = 100;
  p.start = 50;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.q = Fake<const uint16_t>(0x10000);
  p.cache = FakeCache(150);
  p.scale = 0.1f;
  p.out = Fake<uint16_t>(0x50000);
  return p;
}

TEST(ArgumentCheckTest, PrefillAttentionRejectsBadShapes) {
  std::vector<PrefillAttentionParams> bad;
  auto add = [&](auto mutate) {
    PrefillAttentionParams p = ValidPrefill();
    mutate(p);
    bad.push_back(p);
  };
  add([](auto& p) { p.num_tokens = -1; });
  add([](auto& p) { p.start = -5; });
  add([](auto& p) { p.start = INT32_MAX - 10; });  // start + n overflows a position
  add([](auto& p) { p.head_dim = 96; });
  add([](auto& p) { p.num_q_heads = 30; });
  add([](auto& p) { p.num_kv_heads = 0; });
  add([](auto& p) { p.seq = -1; });
  add([](auto& p) { p.block_rows = 32; });
  add([](auto& p) { p.q_token_stride = 32 * 128 - 8; });    // rows overlap
  add([](auto& p) { p.out_token_stride = 32 * 128 + 4; });  // not a multiple of 8
  add([](auto& p) { p.q = nullptr; });
  add([](auto& p) { p.out = Fake<uint16_t>(0x50008); });
  add([](auto& p) { p.cache.v = nullptr; });
  add([](auto& p) { p.cache.k = Fake<const uint16_t>(0x30002); });
  add([](auto& p) { p.cache.token_stride = 1001; });
  add([](auto& p) { p.cache.head_stride = 64; });
  add([](auto& p) {
    p.cache.page_table = Fake<const int32_t>(0x60000);
    p.cache.page_size = 12;
    p.cache.page_table_stride = 20;
  });
  add([](auto& p) {
    p.cache.page_table = Fake<const int32_t>(0x60000);
    p.cache.page_size = 16;
    p.cache.page_table_stride = 9;  // positions [0, 150) need 10 pages
  });
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_THAT(PrefillAttention(bad[i], nullptr), StatusIs(absl::StatusCode::kInvalidArgument))
        << "case " << i;
  }
  // An empty chunk is fine and launches nothing, whatever the pointers.
  PrefillAttentionParams empty = ValidPrefill();
  empty.num_tokens = 0;
  empty.q = nullptr;
  empty.out = nullptr;
  EXPECT_OK(PrefillAttention(empty, nullptr));
}

TEST(ArgumentCheckTest, PerTokenOpsRejectBadShapes) {
  const auto x = Fake<uint16_t>(0x10000);
  EXPECT_THAT(RmsNorm(x, x, 4, 100, 1e-5f, x, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(RmsNorm(x, x, 4, 128, 0.0f, x, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Rope(x, 4, 8, 127, 8 * 127, Fake<int32_t>(0x100), Fake<double>(0x200), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Rope(x, 4, 8, 128, 100, Fake<int32_t>(0x100), Fake<double>(0x200), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SwiGlu(x, x, 4, 100, 50, x, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(EmbeddingGather(x, 0, 128, Fake<int32_t>(0x100), 1, x, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Argmax(Fake<float>(0x100), -1, 10, Fake<int32_t>(0x200), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SampleTopP(Fake<float>(0x100), 1, 0, nullptr, nullptr, nullptr, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(FillRandomBf16(x, -1, 1, 0, 1.0f, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KvAppendParams a;
  a.batch = 2;
  a.num_kv_heads = 2;
  a.head_dim = 12;  // not a multiple of 8
  a.k = a.v = a.cache_k = a.cache_v = x;
  a.positions = Fake<int32_t>(0x100);
  a.src_stride = 64;
  a.token_stride = 64;
  a.head_stride = 16;
  EXPECT_THAT(KvAppend(a, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  a.head_dim = 16;
  a.page_table = Fake<int32_t>(0x200);
  a.page_size = 3;  // not a power of two
  EXPECT_THAT(KvAppend(a, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

CtkvrListsParams ValidCtkvr() {
  CtkvrListsParams p;
  p.keys = Fake<const uint16_t>(0x10000);
  p.token_stride = 8 * 128;
  p.head_stride = 128;
  p.begin = 100;
  p.end = 1100;
  p.queries = Fake<const uint16_t>(0x20000);
  p.query_stride = 32 * 128;
  p.num_centroids = 8;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  p.head_dim = 128;
  p.scale = 0.088f;
  p.list_size = 64;
  p.tokens = Fake<int32_t>(0x30000);
  p.lse = Fake<float>(0x40000);
  return p;
}

TEST(ArgumentCheckTest, CtkvrListsRejectsBadShapes) {
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, CtkvrListsWorkspaceBytes(ValidCtkvr()));
  ASSERT_GT(ws_bytes, 0u);
  void* const ws = Fake<void>(0x100000);
  struct Bad {
    CtkvrListsParams p;
    std::string word;  // the message names it
    bool shape;        // CtkvrListsWorkspaceBytes (range, heads, centroids only) rejects it too
  };
  std::vector<Bad> bad;
  auto add = [&](const std::string& word, bool shape, auto mutate) {
    CtkvrListsParams p = ValidCtkvr();
    mutate(p);
    bad.push_back({p, word, shape});
  };
  add("keys", false, [](auto& p) { p.keys = nullptr; });
  add("queries", false, [](auto& p) { p.queries = nullptr; });
  add("tokens", false, [](auto& p) { p.tokens = nullptr; });
  add("lse", false, [](auto& p) { p.lse = nullptr; });
  add("head_dim", false, [](auto& p) { p.head_dim = 96; });
  add("list_size", false, [](auto& p) { p.list_size = 0; });
  add("begin", true, [](auto& p) { p.begin = p.end; });
  add("begin", true, [](auto& p) { p.begin = -1; });
  add("end", true, [](auto& p) { p.end = int64_t{INT32_MAX} + 1; });
  add("num_centroids", true, [](auto& p) { p.num_centroids = 0; });
  add("num_q_heads", true, [](auto& p) { p.num_q_heads = 30; });
  add("num_kv_heads", true, [](auto& p) { p.num_kv_heads = 0; });
  add("scale", false, [](auto& p) { p.scale = 0.0f; });
  add("scale", false, [](auto& p) { p.scale = NAN; });
  add("aligned", false, [](auto& p) { p.keys = Fake<const uint16_t>(0x10002); });
  add("aligned", false, [](auto& p) { p.queries = Fake<const uint16_t>(0x20008); });
  add("aligned", false, [](auto& p) { p.tokens = Fake<int32_t>(0x30002); });
  add("token_stride", false, [](auto& p) { p.token_stride = 1001; });
  add("token_stride", false, [](auto& p) { p.token_stride = 0; });
  add("head_stride", false, [](auto& p) { p.head_stride = 64; });  // < head_dim
  add("head_stride", false, [](auto& p) { p.head_stride = 132; });
  add("query_stride", false, [](auto& p) { p.query_stride = 32 * 128 - 8; });  // rows overlap
  add("query_stride", false, [](auto& p) { p.query_stride = 32 * 128 + 4; });
  add("num_centroids", true, [](auto& p) {  // 65535 x 65536 lists exceed the grid
    p.num_kv_heads = 65535;
    p.num_q_heads = 65535;
    p.num_centroids = 65536;
    p.query_stride = int64_t{65535} * 128;
  });
  for (size_t i = 0; i < bad.size(); ++i) {
    const absl::Status s = CtkvrLists(bad[i].p, ws, ws_bytes, nullptr);
    EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument)) << "case " << i;
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr(bad[i].word)) << "case " << i;
    if (bad[i].shape) {
      EXPECT_THAT(CtkvrListsWorkspaceBytes(bad[i].p), StatusIs(absl::StatusCode::kInvalidArgument))
          << "case " << i;
    }
  }
  const CtkvrListsParams p = ValidCtkvr();
  EXPECT_THAT(CtkvrLists(p, nullptr, ws_bytes, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CtkvrLists(p, ws, ws_bytes - 1, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CtkvrLists(p, Fake<void>(0x100008), ws_bytes, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // More positions need more workspace; list_size does not change it.
  CtkvrListsParams longer = ValidCtkvr();
  longer.end = 100000;
  ASSERT_OK_AND_ASSIGN(const size_t longer_bytes, CtkvrListsWorkspaceBytes(longer));
  EXPECT_GT(longer_bytes, ws_bytes);
  longer.list_size = 1 << 20;
  ASSERT_OK_AND_ASSIGN(const size_t same_bytes, CtkvrListsWorkspaceBytes(longer));
  EXPECT_EQ(same_bytes, longer_bytes);
}

// On the GPU: a rejected call leaves the output untouched (nothing was launched) and a too
// small workspace is rejected before launch.
TEST(ArgumentCheckTest, RejectedCallLaunchesNothing) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<uint16_t> q(4 * 128), out(4 * 128), kv(1024 * 128);
  DeviceBuffer<int32_t> len(std::vector<int32_t>{1024});
  DecodeAttentionParams p;
  p.batch = 1;
  p.num_q_heads = 4;
  p.num_kv_heads = 1;
  p.head_dim = 128;
  p.max_len = 1024;
  p.q = q.get();
  p.lengths = len.get();
  p.cache = KvCacheView{kv.get(), kv.get(), nullptr, 0, 0, 1024 * 128, 128, 128};
  p.scale = 0.1f;
  p.out = out.get();
  p.num_splits = 4;
  ASSERT_OK_AND_ASSIGN(const size_t ws_bytes, DecodeAttentionWorkspaceBytes(p));
  ASSERT_GT(ws_bytes, 0u);
  out.Poison();
  EXPECT_THAT(DecodeAttention(p, nullptr, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  p.head_dim = 80;
  EXPECT_THAT(DecodeAttention(p, nullptr, ws_bytes, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  for (uint16_t v : out.Download()) ASSERT_EQ(v, 0xffff);

  PrefillAttentionParams pp;
  pp.num_tokens = 4;
  pp.start = 1020;
  pp.num_q_heads = 1;
  pp.num_kv_heads = 1;
  pp.head_dim = 128;
  pp.q = q.get();
  pp.cache = p.cache;
  pp.scale = 0.1f;
  pp.out = out.get();
  pp.block_rows = 96;
  EXPECT_THAT(PrefillAttention(pp, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  pp.block_rows = 0;
  pp.out_token_stride = 100;
  EXPECT_THAT(PrefillAttention(pp, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  for (uint16_t v : out.Download()) ASSERT_EQ(v, 0xffff);
}

}  // namespace
}  // namespace kvrecall::worker::cuda
