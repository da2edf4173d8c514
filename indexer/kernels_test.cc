#include "indexer/kernels.h"

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::indexer::kernels {
namespace {

std::vector<uint8_t> RandomRows(DType t, int n, int d, std::mt19937* rng, std::vector<float>* ref) {
  std::normal_distribution<float> nd;
  std::vector<float> f(static_cast<size_t>(n) * d);
  for (float& x : f) x = nd(*rng) * 3;
  std::vector<uint8_t> bytes(f.size() * DTypeSize(t));
  FromF32(t, f.data(), f.size(), bytes.data());
  ref->resize(f.size());
  ToF32(t, bytes.data(), f.size(), ref->data());  // common/ scalar reference conversion
  return bytes;
}

TEST(KernelsTest, ReportsScalarAlwaysAndBestIsSupported) {
  EXPECT_TRUE(IsaSupported(Isa::kScalar));
  EXPECT_TRUE(IsaSupported(BestIsa()));
  EXPECT_EQ(SupportedIsas().front(), Isa::kScalar);
}

TEST(KernelsTest, ToF32MatchesScalarOnEveryIsaAndDtype) {
  std::mt19937 rng(1);
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int n : {1, 7, 16, 33, 300}) {
      std::vector<float> ref;
      std::vector<uint8_t> bytes = RandomRows(t, 1, n, &rng, &ref);
      for (Isa isa : SupportedIsas()) {
        std::vector<float> got(static_cast<size_t>(n), -1.0f);
        ToF32(t, bytes.data(), n, got.data(), isa);
        EXPECT_EQ(got, ref) << IsaName(isa) << " " << DTypeName(t) << " n=" << n;
      }
    }
  }
}

TEST(KernelsTest, DotAndQueryKeyDotsMatchDoubleReference) {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int d : {1, 5, 16, 31, 64, 128, 130}) {
      const int n = 37;
      std::vector<float> ref;
      std::vector<uint8_t> bytes = RandomRows(t, n, d, &rng, &ref);
      std::vector<const uint8_t*> rows(n);
      for (int i = 0; i < n; ++i)
        rows[i] = bytes.data() + static_cast<size_t>(i) * d * DTypeSize(t);
      for (int nq : {1, 3, 4, 9}) {
        std::vector<float> q(static_cast<size_t>(nq) * d);
        for (float& x : q) x = nd(rng);
        for (Isa isa : SupportedIsas()) {
          std::vector<float> out(static_cast<size_t>(nq) * (n + 3), 0.0f);
          QueryKeyDots(t, rows.data(), n, d, q.data(), nq, out.data(), n + 3, isa);
          for (int h = 0; h < nq; ++h) {
            for (int i = 0; i < n; ++i) {
              double want = 0, mag = 0;
              for (int j = 0; j < d; ++j) {
                want += static_cast<double>(q[h * d + j]) * ref[static_cast<size_t>(i) * d + j];
                mag += std::abs(static_cast<double>(q[h * d + j]) *
                                ref[static_cast<size_t>(i) * d + j]);
              }
              ASSERT_NEAR(out[h * (n + 3) + i], want, 1e-5 * mag + 1e-6)
                  << IsaName(isa) << " " << DTypeName(t) << " d=" << d << " nq=" << nq;
            }
          }
          const float dot = Dot(q.data(), ref.data(), d, isa);
          double want = 0, mag = 0;
          for (int j = 0; j < d; ++j) {
            want += static_cast<double>(q[j]) * ref[j];
            mag += std::abs(static_cast<double>(q[j]) * ref[j]);
          }
          EXPECT_NEAR(dot, want, 1e-5 * mag + 1e-6);
        }
      }
    }
  }
}

TEST(KernelsTest, PackedQueryDotsGiveTheSameBitsOnEveryIsaAndMatchDoubleReference) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd;
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int d : {1, 5, 64, 128}) {
      const int n = 70;  // 4 full tiles and a partial one
      std::vector<float> ref;
      std::vector<uint8_t> bytes = RandomRows(t, n, d, &rng, &ref);
      std::vector<const uint8_t*> rows(n);
      for (int i = 0; i < n; ++i)
        rows[i] = bytes.data() + static_cast<size_t>(i) * d * DTypeSize(t);
      std::vector<uint8_t> packed(PackedRowsBytes(t, n, d), 0xAB);
      const int padded = t == DType::kBF16 ? 2 * Bf16Pairs(d) : d;  // bf16 packs pairs
      ASSERT_EQ(packed.size(), static_cast<size_t>(5 * kPackRows) * padded * DTypeSize(t));
      PackRows(t, rows.data(), n, d, packed.data());
      for (int nq : {1, 4, 6, 9}) {
        std::vector<float> q(static_cast<size_t>(nq) * d);
        for (float& x : q) x = nd(rng);
        // bf16 rows: the queries are rounded to bf16 (exact products), and scaled at the end.
        const float scale = t == DType::kBF16 ? 0.0883883f : 1.0f;
        std::vector<uint32_t> pairs(static_cast<size_t>(nq) * Bf16Pairs(d));
        PackQueriesBf16(q.data(), nq, d, pairs.data());
        std::vector<float> qr = q;
        if (t == DType::kBF16) {
          for (float& x : qr) x = Bf16ToF32(F32ToBf16(x));
        }
        // Row ranges: all, inside one tile, across tiles from mid-tile, the padded tail.
        for (auto [first, count] :
             std::vector<std::pair<int, int>>{{0, n}, {3, 9}, {13, 40}, {64, 6}, {17, 1}}) {
          const int64_t ld = count + 2;
          std::vector<float> scalar;
          for (Isa isa : SupportedIsas()) {
            std::vector<float> out(static_cast<size_t>(nq) * ld, 7.0f);
            if (t == DType::kBF16) {
              PackedQueryDotsBf16(packed.data(), first, count, d, pairs.data(), nq, scale,
                                  out.data(), ld, isa);
            } else {
              PackedQueryDots(t, packed.data(), first, count, d, q.data(), nq, out.data(), ld, isa);
            }
            for (int h = 0; h < nq; ++h) {
              for (int i = 0; i < count; ++i) {
                double want = 0, mag = 0;
                for (int j = 0; j < d; ++j) {
                  const double p = static_cast<double>(qr[h * d + j]) * scale *
                                   ref[static_cast<size_t>(first + i) * d + j];
                  want += p;
                  mag += std::abs(p);
                }
                ASSERT_NEAR(out[h * ld + i], want, 1e-5 * mag + 1e-6)
                    << IsaName(isa) << " " << DTypeName(t) << " d=" << d << " nq=" << nq;
                // vdpbf16ps' chain: per pair, odd element then even (TDPBF16PS's differs).
                if (t == DType::kBF16 && isa != Isa::kAmxBf16) {
                  float a = 0;
                  const float* k = ref.data() + static_cast<size_t>(first + i) * d;
                  const float* qh = qr.data() + static_cast<size_t>(h) * d;
                  for (int j = 0; j < d; j += 2) {
                    if (j + 1 < d) a = std::fma(qh[j + 1], k[j + 1], a);
                    a = std::fma(qh[j], k[j], a);
                  }
                  ASSERT_EQ(out[h * ld + i], a * scale) << IsaName(isa) << " d=" << d;
                }
              }
              EXPECT_EQ(out[h * ld + count], 7.0f) << "wrote past n";
            }
            if (isa == Isa::kScalar) {
              scalar = out;
            } else if (isa != Isa::kAmxBf16) {
              EXPECT_EQ(out, scalar) << IsaName(isa) << " " << DTypeName(t) << " d=" << d
                                     << " nq=" << nq << " rows [" << first << ", +" << count << ")";
            }
          }
        }
      }
    }
  }
}

TEST(KernelsTest, StackedQueriesGiveEachGroupTheBitsOfItsOwnAmxCall) {
  if (!IsaSupported(Isa::kAmxBf16)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  EXPECT_FALSE(CanStackQueries(Isa::kAvx512, 128));
  EXPECT_FALSE(CanStackQueries(Isa::kAmxBf16, 48));
  std::mt19937 rng(6);
  std::normal_distribution<float> nd;
  for (int d : {32, 128}) {
    ASSERT_TRUE(CanStackQueries(Isa::kAmxBf16, d));
    const int n = 7 * kPackRows;
    std::vector<float> ref;
    std::vector<uint8_t> bytes = RandomRows(DType::kBF16, n, d, &rng, &ref);
    std::vector<const uint8_t*> rows(n);
    for (int i = 0; i < n; ++i) rows[i] = bytes.data() + static_cast<size_t>(i) * d * 2;
    std::vector<uint8_t> packed(PackedRowsBytes(DType::kBF16, n, d));
    PackRows(DType::kBF16, rows.data(), n, d, packed.data());
    std::vector<float> q(static_cast<size_t>(kStackedQueries) * d);
    for (float& x : q) x = nd(rng);
    std::vector<uint32_t> pairs(static_cast<size_t>(kStackedQueries) * Bf16Pairs(d));
    PackQueriesBf16(q.data(), kStackedQueries, d, pairs.data());
    // From tile 1: 1 to 6 tiles, so every body (one to four tiles at a time) runs, the
    // one-group calls between them switching the tile configuration back and forth.
    for (int64_t tiles = 1; tiles <= 6; ++tiles) {
      // Each group its own buffer, stride and scale; group 2 is padding and gets nothing.
      const int64_t tile = 1, count = tiles * kPackRows;
      std::vector<float> out[kStackedGroups];
      StackedGroupOut outs[kStackedGroups];
      for (int g = 0; g < kStackedGroups; ++g) {
        const int64_t ld = count + 3 + g;
        out[g].assign(static_cast<size_t>(4) * ld, 7.0f);
        if (g != 2) outs[g] = {out[g].data(), ld, 0.0883883f * static_cast<float>(g + 1)};
      }
      StackedQueryDotsBf16(packed.data(), tile, tiles, d, pairs.data(), outs);
      for (int g = 0; g < kStackedGroups; ++g) {
        if (g == 2) {
          EXPECT_EQ(out[g], std::vector<float>(out[g].size(), 7.0f)) << "wrote a padding group";
          continue;
        }
        const int64_t ld = outs[g].ld;
        std::vector<float> alone(static_cast<size_t>(4) * count);
        PackedQueryDotsBf16(packed.data(), tile * kPackRows, count, d,
                            pairs.data() + static_cast<size_t>(g) * 4 * Bf16Pairs(d), 4,
                            outs[g].scale, alone.data(), count, Isa::kAmxBf16);
        for (int h = 0; h < 4; ++h) {
          for (int64_t i = 0; i < count; ++i)
            ASSERT_EQ(out[g][h * ld + i], alone[h * count + i])
                << "d=" << d << " tiles=" << tiles << " g=" << g;
          EXPECT_EQ(out[g][h * ld + count], 7.0f) << "wrote past the tiles";
        }
      }
    }
  }
}

TEST(KernelsTest, DotsF32MatchesReference) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (int d : {3, 16, 128}) {
    const int m = 13, n = 21;
    std::vector<float> a(static_cast<size_t>(m) * d), b(static_cast<size_t>(n) * d);
    for (float& x : a) x = nd(rng);
    for (float& x : b) x = nd(rng);
    for (Isa isa : SupportedIsas()) {
      std::vector<float> c(static_cast<size_t>(m) * (n + 1), 7.0f);
      DotsF32(a.data(), m, b.data(), n, d, c.data(), n + 1, isa);
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) {
          double want = 0;
          for (int k = 0; k < d; ++k) want += static_cast<double>(a[i * d + k]) * b[j * d + k];
          ASSERT_NEAR(c[i * (n + 1) + j], want, 1e-4 * (1 + std::abs(want))) << IsaName(isa);
        }
        EXPECT_EQ(c[i * (n + 1) + n], 7.0f) << "wrote past n";
      }
    }
  }
}

TEST(KernelsTest, SumExpMatchesStdExp) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-100, 0);
  for (int n : {0, 1, 15, 17, 1000, 5000}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = u(rng);
    if (n > 0) x[0] = 0;
    double want = 0;
    for (float v : x) want += std::exp(static_cast<double>(v));
    for (Isa isa : SupportedIsas()) {
      EXPECT_NEAR(SumExp(x.data(), n, 0.0f, isa), want, 2e-6 * want + 1e-30)
          << IsaName(isa) << " n=" << n;
    }
  }
}

// MaxValue and MaxShifted against plain loops, at sizes around the vector widths, every Isa.
TEST(KernelsTest, MaximaMatchPlainLoops) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0, 3);
  for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 2184}) {
    for (int rows : {1, 2, 4, 5}) {
      const int64_t ld = n + 3;
      std::vector<float> x(static_cast<size_t>(ld * rows));
      for (float& e : x) e = nd(rng);
      std::vector<float> shift(static_cast<size_t>(rows));
      for (float& e : shift) e = nd(rng);
      std::vector<float> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        want[i] = x[i] - shift[0];
        for (int r = 1; r < rows; ++r) want[i] = std::max(want[i], x[r * ld + i] - shift[r]);
      }
      const float want_max = *std::max_element(x.begin(), x.begin() + n);
      for (Isa isa : SupportedIsas()) {
        std::vector<float> got(static_cast<size_t>(n) + 1, -7.0f);
        MaxShifted(x.data(), ld, rows, shift.data(), n, got.data(), isa);
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(got[i], want[i])
              << IsaName(isa) << " n=" << n << " rows=" << rows << " i=" << i;
        EXPECT_EQ(got[n], -7.0f) << "wrote past n";
        EXPECT_EQ(MaxValue(x.data(), n, isa), want_max) << IsaName(isa) << " n=" << n;
      }
    }
  }
}

std::vector<int32_t> BruteTopK(const std::vector<float>& v, int64_t k) {
  std::vector<int32_t> idx(v.size());
  for (size_t i = 0; i < v.size(); ++i) idx[i] = static_cast<int32_t>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  idx.resize(static_cast<size_t>(std::clamp<int64_t>(k, 0, static_cast<int64_t>(v.size()))));
  std::sort(idx.begin(), idx.end());
  return idx;
}

TEST(KernelsTest, TopKMatchesBruteForceWithTiesAndClamping) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(0, 20);
  std::normal_distribution<float> nd;
  for (int64_t n : {0, 1, 10, 37, 100, 2184, 5000, 50000}) {
    for (int64_t k : {0, 1, 7, 64, 1024, 100000}) {
      for (bool ties : {false, true}) {
        std::vector<float> v(static_cast<size_t>(n));
        for (float& x : v) x = ties ? static_cast<float>(small(rng)) : nd(rng);
        const std::vector<int32_t> want = BruteTopK(v, k);
        for (Isa isa : SupportedIsas()) {
          std::vector<int32_t> got;
          TopK(v.data(), n, k, &got, isa);
          ASSERT_EQ(got, want) << IsaName(isa) << " n=" << n << " k=" << k << " ties=" << ties;
        }
      }
    }
  }
  // Increasing values (worst case for a heap / a sampled threshold).
  std::vector<float> inc(20000);
  for (size_t i = 0; i < inc.size(); ++i) inc[i] = static_cast<float>(i);
  // Signed zeros tie (the lower index wins), negative values order below them; infinities and
  // the extremes of the float range order at the ends.
  std::vector<float> zeros = {-0.0f, 0.0f, -1.0f, -0.0f, 0.0f, -2.0f, 1.0f, -0.0f};
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> extremes = {inf,    -inf, std::numeric_limits<float>::max(),    -1e-40f,
                                 1e-40f, -inf, std::numeric_limits<float>::lowest(), 0.0f,
                                 inf,    -0.0f};
  for (Isa isa : SupportedIsas()) {
    std::vector<int32_t> got;
    TopK(inc.data(), 20000, 1000, &got, isa);
    EXPECT_EQ(got, BruteTopK(inc, 1000)) << IsaName(isa);
    for (int64_t k = 0; k <= 8; ++k) {
      TopK(zeros.data(), 8, k, &got, isa);
      EXPECT_EQ(got, BruteTopK(zeros, k)) << IsaName(isa) << " k=" << k;
      // The same under another rounding mode (-0 + 0 is -0 when rounding down).
      std::fesetround(FE_DOWNWARD);
      TopK(zeros.data(), 8, k, &got, isa);
      std::fesetround(FE_TONEAREST);
      EXPECT_EQ(got, BruteTopK(zeros, k)) << IsaName(isa) << " k=" << k << " rounding down";
    }
    for (int64_t k = 0; k <= 10; ++k) {
      TopK(extremes.data(), 10, k, &got, isa);
      EXPECT_EQ(got, BruteTopK(extremes, k)) << IsaName(isa) << " k=" << k;
    }
  }
}

// Rows land byte for byte at their strides, nothing between them is written, on every ISA, for
// aligned destinations (streaming stores) and for the unaligned ones that fall back to memcpy.
TEST(KernelsTest, CopyRowsStreamingCopiesEveryRowAndNothingElse) {
  std::mt19937 rng(5);
  std::vector<uint8_t> source(64 * 1024);
  for (uint8_t& b : source) b = static_cast<uint8_t>(rng());
  for (const size_t row_bytes : {size_t{64}, size_t{256}, size_t{96}}) {
    for (const size_t shift : {size_t{0}, size_t{8}}) {  // of the destination from 64-B alignment
      const int64_t n = 37;
      const size_t stride = 2 * row_bytes;  // a gap of one row between rows
      std::vector<const uint8_t*> rows(n);
      for (int64_t j = 0; j < n; ++j)
        rows[j] = source.data() + (rng() % (source.size() - row_bytes));
      for (Isa isa : SupportedIsas()) {
        std::vector<uint8_t> buffer(n * stride + 128, 0xA5);
        uint8_t* base = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
        uint8_t* dst = base + shift;
        CopyRowsStreaming(rows.data(), n, row_bytes, dst, stride, isa);
        for (int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(std::memcmp(dst + j * stride, rows[j], row_bytes), 0)
              << "row " << j << " of " << row_bytes << " bytes, shift " << shift << ", "
              << IsaName(isa);
          for (size_t b = row_bytes; b < stride; ++b) ASSERT_EQ(dst[j * stride + b], 0xA5);
        }
        for (uint8_t* p = buffer.data(); p < dst; ++p) ASSERT_EQ(*p, 0xA5);
      }
    }
  }
}

// The answer checks' kernels against the scalar reference at lengths around the vector widths:
// an order broken at any one position, negative values, and uint16s at any byte alignment.
TEST(KernelsTest, AnswerChecksAgreeWithTheReference) {
  std::mt19937 rng(11);
  for (int64_t n : {0, 1, 2, 7, 8, 9, 15, 16, 17, 33, 1024, 1031}) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    int32_t t = -5;
    for (int32_t& x : v) x = t += 1 + static_cast<int32_t>(rng() % 4);
    std::vector<uint8_t> bytes(2 * static_cast<size_t>(n) + 1);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    for (Isa isa : SupportedIsas()) {
      EXPECT_TRUE(StrictlyAscending(v.data(), n, isa)) << n << " " << IsaName(isa);
      EXPECT_EQ(MaxUnsigned(v.data(), n, isa), MaxUnsigned(v.data(), n, Isa::kScalar))
          << IsaName(isa);
      for (size_t shift : {size_t{0}, size_t{1}}) {
        std::vector<int32_t> got(static_cast<size_t>(n), -1), want(static_cast<size_t>(n), -2);
        WidenU16(bytes.data() + shift, n, got.data(), isa);
        WidenU16(bytes.data() + shift, n, want.data(), Isa::kScalar);
        EXPECT_EQ(got, want) << n << " " << IsaName(isa);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(want[i], bytes[shift + 2 * i] | (bytes[shift + 2 * i + 1] << 8));
        }
        // And back: any int32s (their low 16 bits), to any byte alignment.
        std::vector<int32_t> wide(static_cast<size_t>(n));
        for (int32_t& x : wide) x = static_cast<int32_t>(rng());
        std::vector<uint8_t> narrow(2 * static_cast<size_t>(n) + 1, 0xA5), ref = narrow;
        NarrowU16(wide.data(), n, narrow.data() + shift, isa);
        NarrowU16(wide.data(), n, ref.data() + shift, Isa::kScalar);
        EXPECT_EQ(narrow, ref) << n << " " << IsaName(isa);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(ref[shift + 2 * i] | (ref[shift + 2 * i + 1] << 8), wide[i] & 0xFFFF);
        }
      }
    }
    for (int64_t at = 1; at < n; ++at) {  // one pair out of order (or equal), anywhere
      std::vector<int32_t> broken = v;
      broken[at] = broken[at - 1] - static_cast<int32_t>(rng() % 2);
      for (Isa isa : SupportedIsas()) {
        ASSERT_FALSE(StrictlyAscending(broken.data(), n, isa))
            << n << " at " << at << " " << IsaName(isa);
        ASSERT_EQ(MaxUnsigned(broken.data(), n, isa), MaxUnsigned(broken.data(), n, Isa::kScalar));
      }
    }
  }
  EXPECT_EQ(MaxUnsigned(nullptr, 0), 0u);
}

}  // namespace
}  // namespace kvrecall::indexer::kernels
