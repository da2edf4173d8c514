#include "indexer/kernels.h"

// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;`, which trips
// -Wuninitialized once inlined into target-attributed functions (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>

#include "absl/strings/string_view.h"

#define KV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KV_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define KV_TARGET_AVX512BF16 \
  __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define KV_TARGET_AMX __attribute__((target("amx-tile,amx-bf16")))

namespace kvrecall::indexer::kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// Scalar reference.

inline float LoadOne(DType type, const uint8_t* p, int64_t j) {
  switch (type) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * j, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * j, 2);
      return Bf16ToF32(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * j, 2);
      return F16ToF32(h);
    }
  }
  return 0;
}

void ToF32Scalar(DType type, const void* src, int64_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = LoadOne(type, p, i);
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[j + u] * b[j + u];
  for (; j < n; ++j) acc[0] += a[j] * b[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void QueryKeyDotsScalar(DType type, const uint8_t* const* rows, int64_t n, int d, const float* q,
                        int nq, float* out, int64_t ld) {
  std::vector<float> key(static_cast<size_t>(d));
  for (int64_t i = 0; i < n; ++i) {
    ToF32Scalar(type, rows[i], d, key.data());
    for (int h = 0; h < nq; ++h)
      out[h * ld + i] = DotScalar(q + static_cast<int64_t>(h) * d, key.data(), d);
  }
}

double SumExpScalar(const float* x, int64_t n, float shift) {
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(static_cast<double>(x[i]) - shift);
  return z;
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C.

KV_TARGET_AVX2 inline __m256 Load8(DType type, const uint8_t* p) {
  switch (type) {
    case DType::kF32:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    case DType::kBF16: {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    case DType::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  return _mm256_setzero_ps();
}

KV_TARGET_AVX2 inline float Hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

KV_TARGET_AVX2 void ToF32Avx2(DType type, const void* src, int64_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  const size_t es = DTypeSize(type);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, Load8(type, p + i * es));
  for (; i < n; ++i) dst[i] = LoadOne(type, p, i);
}

KV_TARGET_AVX2 float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  for (; j + 8 <= n; j += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
  float s = Hsum8(_mm256_add_ps(acc0, acc1));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

template <DType type, int NH>
KV_TARGET_AVX2 void QkChunkAvx2(const uint8_t* const* rows, int64_t n, int d, const float* q,
                                float* out, int64_t ld) {
  const size_t es = DTypeSize(type);
  const int d8 = d & ~7;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = rows[i];
    __m256 acc[NH];
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) acc[h] = _mm256_setzero_ps();
    for (int j = 0; j < d8; j += 8) {
      const __m256 k = Load8(type, row + j * es);
#pragma GCC unroll 16
      for (int h = 0; h < NH; ++h)
        acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + j), k, acc[h]);
    }
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) {
      float s = Hsum8(acc[h]);
      for (int j = d8; j < d; ++j) s += q[h * d + j] * LoadOne(type, row, j);
      out[h * ld + i] = s;
    }
  }
}

KV_TARGET_AVX2 inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

KV_TARGET_AVX2 double SumExpAvx2(const float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  double z = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min<int64_t>(n & ~int64_t{7}, i + 1024);
    for (; i < end; i += 8)
      acc = _mm256_add_ps(acc, Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s)));
    z += Hsum8(acc);
  }
  for (; i < n; ++i) z += std::exp(static_cast<double>(x[i]) - shift);
  return z;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 F/BW/VL.

KV_TARGET_AVX512 inline __m512 Load16(DType type, const uint8_t* p, __mmask16 m) {
  switch (type) {
    case DType::kF32:
      return _mm512_maskz_loadu_ps(m, p);
    case DType::kBF16: {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    case DType::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  return _mm512_setzero_ps();
}

KV_TARGET_AVX512 inline __mmask16 TailMask(int64_t rest) {
  return rest >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rest) - 1);
}

KV_TARGET_AVX512 void ToF32Avx512(DType type, const void* src, int64_t n, float* dst) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  const size_t es = DTypeSize(type);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, Load16(type, p + i * es, m));
  }
}

KV_TARGET_AVX512 float DotAvx512(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), acc1);
  }
  for (; j < n; j += 16) {
    const __mmask16 m = TailMask(n - j);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

template <DType type, int NH>
KV_TARGET_AVX512 void QkChunkAvx512(const uint8_t* const* rows, int64_t n, int d, const float* q,
                                    float* out, int64_t ld) {
  const size_t es = DTypeSize(type);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = rows[i];
    if (i + 4 < n) {
      const char* next = reinterpret_cast<const char*>(rows[i + 4]);
      for (int off = 0; off < d * static_cast<int>(es); off += 64)
        _mm_prefetch(next + off, _MM_HINT_T0);
    }
    __m512 acc[NH];
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) acc[h] = _mm512_setzero_ps();
    const int d16 = d & ~15;
    for (int j = 0; j < d16; j += 16) {
      const __m512 k = Load16(type, row + j * es, 0xffff);
#pragma GCC unroll 16
      for (int h = 0; h < NH; ++h)
        acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + j), k, acc[h]);
    }
    for (int j = d16; j < d; j += 16) {
      const __mmask16 m = TailMask(d - j);
      const __m512 k = Load16(type, row + j * es, m);
#pragma GCC unroll 16
      for (int h = 0; h < NH; ++h)
        acc[h] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + h * d + j), k, acc[h]);
    }
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) out[h * ld + i] = _mm512_reduce_add_ps(acc[h]);
  }
}

KV_TARGET_AVX512 inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

KV_TARGET_AVX512 double SumExpAvx512(const float* x, int64_t n, float shift) {
  // Two accumulators (each Exp16 is a dependent chain; two overlap), flushed to double every 2048.
  const __m512 s = _mm512_set1_ps(shift);
  double z = 0;
  int64_t i = 0;
  while (i < n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const int64_t end = std::min<int64_t>(n, i + 2048);
    for (; i + 32 <= end; i += 32) {
      acc0 = _mm512_add_ps(acc0, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), s)));
      acc1 = _mm512_add_ps(acc1, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), s)));
    }
    for (; i < end; i += 16) {
      const __mmask16 m = TailMask(end - i);
      const __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s));
      acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(m, e));
    }
    z += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  return z;
}

// ---------------------------------------------------------------------------------------------

// C[i][j] = A_i . B_j with B packed as [tiles of 16 columns][d][16] (zero-padded).
template <int R>
KV_TARGET_AVX512 void GemmRowsAvx512(const float* a, int64_t lda, const float* bp, int64_t tiles,
                                     int d, int64_t n, float* c, int64_t ldc) {
  for (int64_t t = 0; t < tiles; ++t) {
    const float* b = bp + t * d * 16;
    __m512 acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int k = 0; k < d; ++k) {
      const __m512 bv = _mm512_loadu_ps(b + k * 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + k]), bv, acc[r]);
    }
    const __mmask16 m = TailMask(n - t * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + t * 16, m, acc[r]);
  }
}

template <int R>
KV_TARGET_AVX2 void GemmRowsAvx2(const float* a, int64_t lda, const float* bp, int64_t tiles, int d,
                                 int64_t n, float* c, int64_t ldc) {
  for (int64_t t = 0; t < tiles; ++t) {
    const float* b = bp + t * d * 8;
    __m256 acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int k = 0; k < d; ++k) {
      const __m256 bv = _mm256_loadu_ps(b + k * 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r * lda + k]), bv, acc[r]);
    }
    alignas(32) float tmp[8];
    const int64_t cols = std::min<int64_t>(8, n - t * 8);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(tmp, acc[r]);
      std::memcpy(c + r * ldc + t * 8, tmp, static_cast<size_t>(cols) * 4);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Packed rows (PackRows): one lane per row, each dot a fused multiply-add chain in j order.

constexpr int kMaxPackedQueries = 4;  // queries per kernel call: 2 × 4 accumulators (AVX2)

inline size_t PackedTileBytes(DType type, int d) {
  const int elements = type == DType::kBF16 ? 2 * Bf16Pairs(d) : d;
  return static_cast<size_t>(elements) * kPackRows * DTypeSize(type);
}

// acc[h * kPackRows + r] = q_h · row r of the tile, for h < nh.
void PackedTileScalar(DType type, const uint8_t* tile, int d, const float* q, int nh, float* acc) {
  for (int h = 0; h < nh; ++h) {
    for (int r = 0; r < kPackRows; ++r) {
      float a = 0;
      for (int j = 0; j < d; ++j)
        a = std::fma(q[static_cast<size_t>(h) * d + j], LoadOne(type, tile, j * kPackRows + r), a);
      acc[h * kPackRows + r] = a;
    }
  }
}

template <DType type, int NH>
KV_TARGET_AVX2 void PackedTileAvx2(const uint8_t* tile, int d, const float* q, float* out) {
  const size_t es = DTypeSize(type);
  __m256 acc[NH][2];
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
  for (int j = 0; j < d; ++j) {
    const uint8_t* p = tile + static_cast<size_t>(j) * kPackRows * es;
    const __m256 b0 = Load8(type, p), b1 = Load8(type, p + 8 * es);
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m256 qb = _mm256_broadcast_ss(q + static_cast<size_t>(h) * d + j);
      acc[h][0] = _mm256_fmadd_ps(qb, b0, acc[h][0]);
      acc[h][1] = _mm256_fmadd_ps(qb, b1, acc[h][1]);
    }
  }
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) {
    _mm256_storeu_ps(out + h * kPackRows, acc[h][0]);
    _mm256_storeu_ps(out + h * kPackRows + 8, acc[h][1]);
  }
}

// Accumulators of the AVX-512 tile kernels: acc[t][h] for NT tiles and NH queries, stored as
// out[(t * NH + h) * kPackRows + r].
template <int NT, int NH>
KV_TARGET_AVX512 inline void ZeroTiles(__m512 (&acc)[NT][NH]) {
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) acc[t][h] = _mm512_setzero_ps();
}
template <int NT, int NH>
KV_TARGET_AVX512 inline void StoreTiles(const __m512 (&acc)[NT][NH], float* out) {
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) _mm512_storeu_ps(out + (t * NH + h) * kPackRows, acc[t][h]);
}

// The same for NT consecutive tiles: out[(t * NH + h) * kPackRows + r].
template <DType type, int NH, int NT>
KV_TARGET_AVX512 void PackedTilesAvx512(const uint8_t* tile, int d, const float* q, float* out) {
  const size_t es = DTypeSize(type), tile_bytes = static_cast<size_t>(d) * kPackRows * es;
  __m512 acc[NT][NH];
  ZeroTiles<NT, NH>(acc);
  for (int j = 0; j < d; ++j) {
    __m512 b[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      b[t] = Load16(type, tile + t * tile_bytes + static_cast<size_t>(j) * kPackRows * es, 0xffff);
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m512 qb = _mm512_set1_ps(q[static_cast<size_t>(h) * d + j]);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t][h] = _mm512_fmadd_ps(qb, b[t], acc[t][h]);
    }
  }
  StoreTiles<NT, NH>(acc, out);
}

using PackedKernel = void (*)(const uint8_t*, int, const float*, float*);

// The kernel for nh (1..kMaxPackedQueries) queries over nt (1, or 2 on AVX-512) tiles.
template <DType T>
PackedKernel PackedKernelFor(Isa isa, int nh, int nt) {
  static constexpr PackedKernel kAvx2[] = {&PackedTileAvx2<T, 1>, &PackedTileAvx2<T, 2>,
                                           &PackedTileAvx2<T, 3>, &PackedTileAvx2<T, 4>};
  static constexpr PackedKernel kAvx512One[] = {
      &PackedTilesAvx512<T, 1, 1>, &PackedTilesAvx512<T, 2, 1>, &PackedTilesAvx512<T, 3, 1>,
      &PackedTilesAvx512<T, 4, 1>};
  static constexpr PackedKernel kAvx512Two[] = {
      &PackedTilesAvx512<T, 1, 2>, &PackedTilesAvx512<T, 2, 2>, &PackedTilesAvx512<T, 3, 2>,
      &PackedTilesAvx512<T, 4, 2>};
  if (isa == Isa::kAvx512) return nt == 2 ? kAvx512Two[nh - 1] : kAvx512One[nh - 1];
  return kAvx2[nh - 1];
}

// bf16 pair tiles (PackRows' bf16 layout) with bf16 query pairs (PackQueriesBf16): per pair p,
// acc += q[2p+1] k[2p+1], then acc += q[2p] k[2p] (exact products, one rounding each), which is
// vdpbf16ps' order. tile: [pairs][kPackRows] words; q: [NH][pairs] words.
// acc[h * kPackRows + r] = the chain of query h and row r, unscaled.
void PairTileScalar(const uint8_t* tile, int pairs, const uint32_t* q, int nh, float* acc) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(tile);
  for (int h = 0; h < nh; ++h) {
    for (int r = 0; r < kPackRows; ++r) {
      float a = 0;
      for (int p = 0; p < pairs; ++p) {
        const uint32_t k = w[p * kPackRows + r], qp = q[static_cast<size_t>(h) * pairs + p];
        a = std::fma(Bf16ToF32(static_cast<uint16_t>(qp >> 16)),
                     Bf16ToF32(static_cast<uint16_t>(k >> 16)), a);
        a = std::fma(Bf16ToF32(static_cast<uint16_t>(qp)), Bf16ToF32(static_cast<uint16_t>(k)), a);
      }
      acc[h * kPackRows + r] = a;
    }
  }
}

// The high and low bf16 halves of each 32-bit lane as fp32.
KV_TARGET_AVX2 inline __m256 HighBf16(__m256i w) {
  return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
KV_TARGET_AVX2 inline __m256 LowBf16(__m256i w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

template <int NH>
KV_TARGET_AVX2 void PairTileAvx2(const uint8_t* tile, int pairs, const uint32_t* q, float* out) {
  __m256 acc[NH][2];
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    const uint8_t* t = tile + static_cast<size_t>(p) * kPackRows * 4;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32));
    const __m256 hi0 = HighBf16(w0), lo0 = LowBf16(w0), hi1 = HighBf16(w1), lo1 = LowBf16(w1);
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m256i qp = _mm256_set1_epi32(static_cast<int>(q[static_cast<size_t>(h) * pairs + p]));
      const __m256 qh = HighBf16(qp), ql = LowBf16(qp);
      acc[h][0] = _mm256_fmadd_ps(ql, lo0, _mm256_fmadd_ps(qh, hi0, acc[h][0]));
      acc[h][1] = _mm256_fmadd_ps(ql, lo1, _mm256_fmadd_ps(qh, hi1, acc[h][1]));
    }
  }
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) {
    _mm256_storeu_ps(out + h * kPackRows, acc[h][0]);
    _mm256_storeu_ps(out + h * kPackRows + 8, acc[h][1]);
  }
}

KV_TARGET_AVX512 inline __m512 HighBf16x16(__m512i w) {
  return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
KV_TARGET_AVX512 inline __m512 LowBf16x16(__m512i w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// NT consecutive tiles: out[(t * NH + h) * kPackRows + r].
template <int NH, int NT>
KV_TARGET_AVX512 void PairTilesAvx512(const uint8_t* tile, int pairs, const uint32_t* q,
                                      float* out) {
  const size_t tile_bytes = static_cast<size_t>(pairs) * kPackRows * 4;
  __m512 acc[NT][NH];
  ZeroTiles<NT, NH>(acc);
  for (int p = 0; p < pairs; ++p) {
    __m512 hi[NT], lo[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i w = _mm512_loadu_si512(tile + t * tile_bytes + static_cast<size_t>(p) * 64);
      hi[t] = HighBf16x16(w);
      lo[t] = LowBf16x16(w);
    }
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m512i qp = _mm512_set1_epi32(static_cast<int>(q[static_cast<size_t>(h) * pairs + p]));
      const __m512 qh = HighBf16x16(qp), ql = LowBf16x16(qp);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t)
        acc[t][h] = _mm512_fmadd_ps(ql, lo[t], _mm512_fmadd_ps(qh, hi[t], acc[t][h]));
    }
  }
  StoreTiles<NT, NH>(acc, out);
}

// The same with vdpbf16ps: one instruction per pair, query and tile.
template <int NH, int NT>
KV_TARGET_AVX512BF16 void PairTilesAvx512Bf16(const uint8_t* tile, int pairs, const uint32_t* q,
                                              float* out) {
  const size_t tile_bytes = static_cast<size_t>(pairs) * kPackRows * 4;
  __m512 acc[NT][NH];
  ZeroTiles<NT, NH>(acc);
  for (int p = 0; p < pairs; ++p) {
    __m512bh w[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      w[t] = reinterpret_cast<__m512bh>(
          _mm512_loadu_si512(tile + t * tile_bytes + static_cast<size_t>(p) * 64));
#pragma GCC unroll 8
    for (int h = 0; h < NH; ++h) {
      const __m512bh qp = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(q[static_cast<size_t>(h) * pairs + p])));
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t][h] = _mm512_dpbf16_ps(acc[t][h], w[t], qp);
    }
  }
  StoreTiles<NT, NH>(acc, out);
}

// AMX: one thread's TDPBF16PS kernel, AmxTileDots, in one of two tile configurations that
// differ only in how many queries (A rows, C rows) they hold. tmm0..tmm3: the accumulators of up
// to four consecutive tiles (queries x kPackRows rows, fp32); tmm4: the queries' next 16 pairs
// (A, queries x 16 words); tmm5: a tile's next 16 pairs ([16 pairs][kPackRows] words: PackRows'
// bf16 layout is TDPBF16PS' B layout). kGroupTiles: one group's kAmxQueries queries;
// kStackTiles: kStackedQueries (four groups).
constexpr int kAmxQueries = 4;
constexpr int kAmxPairs = 16;  // pairs per TDPBF16PS (64-byte tile rows)
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64);
static_assert(kPackRows * 4 == 64, "a packed tile's pair row is one 64-byte AMX tile row");
enum class AmxTiles : uint8_t { kNone, kGroupTiles, kStackTiles };

constexpr AmxTileConfig MakeAmxConfig(AmxTiles tiles) {
  AmxTileConfig c;
  const int queries = tiles == AmxTiles::kGroupTiles ? kAmxQueries : kStackedQueries;
  for (int t = 0; t < 6; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<uint8_t>(t < 5 ? queries : kAmxPairs);
  }
  return c;
}

// Loads the configuration `tiles` unless this thread has it loaded. It is never released:
// nothing else in this process uses AMX (code that does would have to reload its own, and these
// kernels theirs, per call). Switching costs one LDTILECFG; a search's scoring pass mostly stays
// in one.
KV_TARGET_AMX inline void ConfigureAmx(AmxTiles tiles) {
  thread_local AmxTiles loaded = AmxTiles::kNone;
  if (loaded != tiles) {
    static constexpr AmxTileConfig kGroup = MakeAmxConfig(AmxTiles::kGroupTiles);
    static constexpr AmxTileConfig kStack = MakeAmxConfig(AmxTiles::kStackTiles);
    _tile_loadconfig(tiles == AmxTiles::kGroupTiles ? &kGroup : &kStack);
    loaded = tiles;
  }
}

// NT (1 to 4) consecutive tiles for the queries of `layout` (q: [queries][pairs]): tile u's
// result for query h at out[u * tile_step + h * ld + r]. TDPBF16PS accumulates per pair the even
// element's product, then the odd one's, in fp32 with round-to-nearest-even and denormals
// flushed: close to, not bit-equal with, the other bodies' chain; each result row is computed on
// its own, so a query gets the same bits in either layout. Four accumulators keep four chains
// in flight (one chain waits for each instruction's latency). REQUIRES: pairs % kAmxPairs == 0,
// and the calling thread may use AMX (Detect).
template <int NT>
KV_TARGET_AMX void AmxTileDots(AmxTiles layout, const uint8_t* tile, int pairs, const uint32_t* q,
                               float* out, int64_t tile_step, int64_t ld) {
  static_assert(NT >= 1 && NT <= 4);
  ConfigureAmx(layout);
  const size_t tile_bytes = static_cast<size_t>(pairs) * kPackRows * 4;
  const long q_stride = static_cast<long>(pairs) * 4;
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  for (int p = 0; p < pairs; p += kAmxPairs) {
    const uint8_t* b = tile + static_cast<size_t>(p) * 64;
    _tile_loadd(4, q + p, q_stride);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(5, b + tile_bytes, 64);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, b + 2 * tile_bytes, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(5, b + 3 * tile_bytes, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  const long out_stride = static_cast<long>(ld) * 4;
  _tile_stored(0, out, out_stride);
  if constexpr (NT > 1) _tile_stored(1, out + tile_step, out_stride);
  if constexpr (NT > 2) _tile_stored(2, out + 2 * tile_step, out_stride);
  if constexpr (NT > 3) _tile_stored(3, out + 3 * tile_step, out_stride);
}

// NT (1 or 2) consecutive tiles for kAmxQueries queries, as the other pair kernels lay them out:
// out[(t * kAmxQueries + h) * kPackRows + r].
template <int NT>
void PairTilesAmx(const uint8_t* tile, int pairs, const uint32_t* q, float* out) {
  AmxTileDots<NT>(AmxTiles::kGroupTiles, tile, pairs, q, out, kAmxQueries * kPackRows, kPackRows);
}

// outs[g]'s query h, rows [0, n): scale * tmp[(4g + h) * ld + i]. n % kPackRows == 0.
KV_TARGET_AVX512 void ScatterStacked(const float* tmp, int64_t ld, int64_t n,
                                     const StackedGroupOut (&outs)[kStackedGroups]) {
  for (int g = 0; g < kStackedGroups; ++g) {
    if (outs[g].out == nullptr) continue;
    const __m512 scale = _mm512_set1_ps(outs[g].scale);
    for (int h = 0; h < 4; ++h) {
      const float* src = tmp + (4 * g + h) * ld;
      float* dst = outs[g].out + h * outs[g].ld;
      for (int64_t i = 0; i < n; i += kPackRows)
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_load_ps(src + i), scale));
    }
  }
}

using PairKernel = void (*)(const uint8_t*, int, const uint32_t*, float*);

// The pair kernel for nh (1..kMaxPackedQueries) queries over nt (1, or 2 on AVX-512) tiles.
PairKernel PairKernelFor(Isa isa, int nh, int nt) {
  static constexpr PairKernel kAvx2[] = {&PairTileAvx2<1>, &PairTileAvx2<2>, &PairTileAvx2<3>,
                                         &PairTileAvx2<4>};
  static constexpr PairKernel kAvx512[2][4] = {{&PairTilesAvx512<1, 1>, &PairTilesAvx512<2, 1>,
                                                &PairTilesAvx512<3, 1>, &PairTilesAvx512<4, 1>},
                                               {&PairTilesAvx512<1, 2>, &PairTilesAvx512<2, 2>,
                                                &PairTilesAvx512<3, 2>, &PairTilesAvx512<4, 2>}};
  static constexpr PairKernel kBf16[2][4] = {
      {&PairTilesAvx512Bf16<1, 1>, &PairTilesAvx512Bf16<2, 1>, &PairTilesAvx512Bf16<3, 1>,
       &PairTilesAvx512Bf16<4, 1>},
      {&PairTilesAvx512Bf16<1, 2>, &PairTilesAvx512Bf16<2, 2>, &PairTilesAvx512Bf16<3, 2>,
       &PairTilesAvx512Bf16<4, 2>}};
  if (isa >= Isa::kAvx512Bf16) return kBf16[nt - 1][nh - 1];
  if (isa == Isa::kAvx512) return kAvx512[nt - 1][nh - 1];
  return kAvx2[nh - 1];
}

// Runs kernel(tile, first tile's index t, nt, h0, nh, tmp) over the tiles of rows
// [first, first + n), in steps of two tiles on AVX-512, and copies tmp's rows of the range to
// out (times `scale`). tmp: [nt][nh][kPackRows].
template <typename Kernel>
void ForPackedTiles(int64_t first, int64_t n, int nq, bool two_tiles, float scale, float* out,
                    int64_t ld, const Kernel& kernel) {
  alignas(64) float tmp[2 * kMaxPackedQueries * kPackRows];
  const int64_t t_end = (first + n - 1) / kPackRows + 1;
  for (int64_t t = first / kPackRows; t < t_end;) {
    const int nt = two_tiles && t + 1 < t_end ? 2 : 1;
    for (int h0 = 0; h0 < nq; h0 += kMaxPackedQueries) {
      const int nh = std::min(kMaxPackedQueries, nq - h0);
      kernel(t, nt, h0, nh, tmp);
      for (int u = 0; u < nt; ++u) {
        const int64_t base = (t + u) * kPackRows;
        const int64_t lo = std::max(first, base), hi = std::min(first + n, base + kPackRows);
        for (int h = 0; h < nh; ++h) {
          const float* src = tmp + (u * nh + h) * kPackRows + (lo - base);
          float* dst = out + (h0 + h) * ld + (lo - first);
          if (scale == 1.0f) {
            std::memcpy(dst, src, static_cast<size_t>(hi - lo) * sizeof(float));
          } else {
            for (int64_t i = 0; i < hi - lo; ++i) dst[i] = src[i] * scale;
          }
        }
      }
    }
    t += nt;
  }
}

// The Isa whose bodies the kernels other than PackedQueryDotsBf16 run.
inline Isa Base(Isa isa) { return isa >= Isa::kAvx512Bf16 ? Isa::kAvx512 : isa; }

// Whether this CPU has AMX-TILE and AMX-BF16 (cpuid leaf 7, edx bits 24 and 22) and the kernel
// lets this process use the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool AmxUsable() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  if ((d & (1u << 24)) == 0 || (d & (1u << 22)) == 0) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Isa DetectBest() {
  Isa best = Isa::kScalar;
  __builtin_cpu_init();
  // F16C by cpuid (leaf 1, ecx bit 29): clang's __builtin_cpu_supports does not know it.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) {
    best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
      // AVX512-BF16: cpuid leaf 7, subleaf 1, eax bit 5.
      unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
      if (__get_cpuid_count(7, 1, &a7, &b7, &c7, &d7) != 0 && (a7 & (1u << 5)) != 0) {
        best = Isa::kAvx512Bf16;
        if (AmxUsable()) best = Isa::kAmxBf16;
      }
    }
  }
  return best;
}

Isa HardwareBest() {
  static const Isa best = DetectBest();
  return best;
}

}  // namespace

absl::string_view IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAmxBf16:
      return "amxbf16";
  }
  return "?";
}

bool IsaSupported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(HardwareBest()); }

Isa BestIsa() {
  static const Isa best = [] {
    // kAvx512Bf16 only on request: on the H100 host (Xeon with AVX512-BF16) its vdpbf16ps body
    // searched 1.6x slower than kAvx512's FMA body. kAmxBf16 where the CPU has it: its decode
    // steps ran 19-20 % faster there (docs/benchmarks.md).
    Isa b =
        HardwareBest() == Isa::kAmxBf16 ? Isa::kAmxBf16 : std::min(HardwareBest(), Isa::kAvx512);
    if (const char* env = std::getenv("KVRECALL_ISA"); env != nullptr) {
      const absl::string_view e(env);
      Isa want = b;
      if (e == "scalar") want = Isa::kScalar;
      if (e == "avx2") want = Isa::kAvx2;
      if (e == "avx512") want = Isa::kAvx512;
      if (e == "avx512bf16") want = Isa::kAvx512Bf16;
      if (e == "amxbf16") want = Isa::kAmxBf16;
      if (IsaSupported(want)) b = want;  // may name kAvx512Bf16
    }
    return b;
  }();
  return best;
}

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAmxBf16})
    if (IsaSupported(i)) out.push_back(i);
  return out;
}

void ToF32(DType type, const void* src, int64_t n, float* dst, Isa isa) {
  if (type == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  switch (isa) {
    case Isa::kAvx512:
    case Isa::kAvx512Bf16:
    case Isa::kAmxBf16:
      return ToF32Avx512(type, src, n, dst);
    case Isa::kAvx2:
      return ToF32Avx2(type, src, n, dst);
    case Isa::kScalar:
      return ToF32Scalar(type, src, n, dst);
  }
}

float Dot(const float* a, const float* b, int64_t n, Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
    case Isa::kAvx512Bf16:
    case Isa::kAmxBf16:
      return DotAvx512(a, b, n);
    case Isa::kAvx2:
      return DotAvx2(a, b, n);
    case Isa::kScalar:
      break;
  }
  return DotScalar(a, b, n);
}

namespace {

template <DType T>
void QkTyped(const uint8_t* const* rows, int64_t n, int d, const float* qh, int nh, float* oh,
             int64_t ld, Isa isa) {
#define KV_CASE(N)                                 \
  case N:                                          \
    if (isa == Isa::kAvx512)                       \
      QkChunkAvx512<T, N>(rows, n, d, qh, oh, ld); \
    else                                           \
      QkChunkAvx2<T, N>(rows, n, d, qh, oh, ld);   \
    break;
  switch (nh) {
    KV_CASE(1)
    KV_CASE(2)
    KV_CASE(3)
    KV_CASE(4)
    KV_CASE(5)
    KV_CASE(6)
    KV_CASE(7)
    KV_CASE(8)
  }
#undef KV_CASE
}

}  // namespace

void QueryKeyDots(DType type, const uint8_t* const* rows, int64_t n, int d, const float* q, int nq,
                  float* out, int64_t ld, Isa isa) {
  isa = Base(isa);
  if (isa == Isa::kScalar) return QueryKeyDotsScalar(type, rows, n, d, q, nq, out, ld);
  for (int h0 = 0; h0 < nq; h0 += 8) {
    const int nh = std::min(8, nq - h0);
    const float* qh = q + static_cast<int64_t>(h0) * d;
    float* oh = out + h0 * ld;
    switch (type) {
      case DType::kF32:
        QkTyped<DType::kF32>(rows, n, d, qh, nh, oh, ld, isa);
        break;
      case DType::kBF16:
        QkTyped<DType::kBF16>(rows, n, d, qh, nh, oh, ld, isa);
        break;
      case DType::kF16:
        QkTyped<DType::kF16>(rows, n, d, qh, nh, oh, ld, isa);
        break;
    }
  }
}

size_t PackedRowsBytes(DType type, int64_t n, int head_dim) {
  return static_cast<size_t>((n + kPackRows - 1) / kPackRows) * PackedTileBytes(type, head_dim);
}

void PackRows(DType type, const uint8_t* const* rows, int64_t n, int head_dim, uint8_t* out) {
  const size_t es = DTypeSize(type), tile_bytes = PackedTileBytes(type, head_dim);
  for (int64_t t0 = 0; t0 < n; t0 += kPackRows) {
    uint8_t* tile = out + static_cast<size_t>(t0 / kPackRows) * tile_bytes;
    const int rn = static_cast<int>(std::min<int64_t>(kPackRows, n - t0));
    if (rn < kPackRows || (type == DType::kBF16 && head_dim % 2 != 0)) {
      std::memset(tile, 0, tile_bytes);
    }
    if (type == DType::kBF16) {  // pairs: element j of row r at (j / 2 * kPackRows + r) * 2 + j % 2
      const int whole = head_dim / 2;  // pairs copied as 32-bit words; an odd tail's pair after
      for (int r = 0; r < rn; ++r) {
        const uint8_t* src = rows[t0 + r];
        for (int p = 0; p < whole; ++p)
          std::memcpy(tile + (static_cast<size_t>(p) * kPackRows + r) * 4, src + 4 * p, 4);
        if (head_dim % 2 != 0)
          std::memcpy(tile + (static_cast<size_t>(whole) * kPackRows + r) * 4, src + 4 * whole, 2);
      }
    } else if (es == 2) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(tile);
      for (int r = 0; r < rn; ++r) {
        const uint8_t* src = rows[t0 + r];
        for (int j = 0; j < head_dim; ++j) std::memcpy(dst + j * kPackRows + r, src + 2 * j, 2);
      }
    } else {
      for (int r = 0; r < rn; ++r)
        for (int j = 0; j < head_dim; ++j)
          std::memcpy(tile + (static_cast<size_t>(j) * kPackRows + r) * es, rows[t0 + r] + j * es,
                      es);
    }
  }
}

void PackedQueryDots(DType type, const uint8_t* packed, int64_t first, int64_t n, int head_dim,
                     const float* q, int nq, float* out, int64_t ld, Isa isa) {
  if (n <= 0 || nq <= 0 || type == DType::kBF16) return;  // bf16: PackedQueryDotsBf16
  const int d = head_dim;
  isa = Base(isa);
  const size_t tile_bytes = PackedTileBytes(type, d);
  ForPackedTiles(first, n, nq, isa == Isa::kAvx512, 1.0f, out, ld,
                 [&](int64_t t, int nt, int h0, int nh, float* tmp) {
                   const uint8_t* tile = packed + static_cast<size_t>(t) * tile_bytes;
                   const float* qh = q + static_cast<size_t>(h0) * d;
                   if (isa == Isa::kScalar) return PackedTileScalar(type, tile, d, qh, nh, tmp);
                   const PackedKernel k = type == DType::kF32
                                              ? PackedKernelFor<DType::kF32>(isa, nh, nt)
                                              : PackedKernelFor<DType::kF16>(isa, nh, nt);
                   k(tile, d, qh, tmp);
                 });
}

void PackQueriesBf16(const float* q, int nq, int head_dim, uint32_t* out) {
  const int pairs = Bf16Pairs(head_dim);
  for (int h = 0; h < nq; ++h) {
    const float* qh = q + static_cast<size_t>(h) * head_dim;
    for (int p = 0; p < pairs; ++p) {
      const uint32_t lo = F32ToBf16(qh[2 * p]);
      const uint32_t hi = 2 * p + 1 < head_dim ? F32ToBf16(qh[2 * p + 1]) : 0;
      out[static_cast<size_t>(h) * pairs + p] = lo | hi << 16;
    }
  }
}

void PackedQueryDotsBf16(const uint8_t* packed, int64_t first, int64_t n, int head_dim,
                         const uint32_t* q_pairs, int nq, float scale, float* out, int64_t ld,
                         Isa isa) {
  if (n <= 0 || nq <= 0) return;
  const int pairs = Bf16Pairs(head_dim);
  const size_t tile_bytes = PackedTileBytes(DType::kBF16, head_dim);
  ForPackedTiles(first, n, nq, isa >= Isa::kAvx512, scale, out, ld,
                 [&](int64_t t, int nt, int h0, int nh, float* tmp) {
                   const uint8_t* tile = packed + static_cast<size_t>(t) * tile_bytes;
                   const uint32_t* qh = q_pairs + static_cast<size_t>(h0) * pairs;
                   if (isa == Isa::kScalar) return PairTileScalar(tile, pairs, qh, nh, tmp);
                   if (isa == Isa::kAmxBf16) {
                     if (nh == kAmxQueries && pairs % kAmxPairs == 0) {
                       return nt == 2 ? PairTilesAmx<2>(tile, pairs, qh, tmp)
                                      : PairTilesAmx<1>(tile, pairs, qh, tmp);
                     }
                     // Other shapes: the FMA body (vdpbf16ps' measured slower).
                     return PairKernelFor(Isa::kAvx512, nh, nt)(tile, pairs, qh, tmp);
                   }
                   PairKernelFor(isa, nh, nt)(tile, pairs, qh, tmp);
                 });
}

bool CanStackQueries(Isa isa, int head_dim) {
  return isa == Isa::kAmxBf16 && head_dim % (2 * kAmxPairs) == 0;
}

void StackedQueryDotsBf16(const uint8_t* packed, int64_t tile, int64_t tiles, int head_dim,
                          const uint32_t* q_pairs, const StackedGroupOut (&outs)[kStackedGroups]) {
  const int pairs = Bf16Pairs(head_dim);
  const size_t tile_bytes = PackedTileBytes(DType::kBF16, head_dim);
  constexpr int64_t kLd = 4 * kPackRows;
  alignas(64) float tmp[kStackedQueries * kLd];
  for (int64_t u = 0; u < tiles; u += 4) {
    const uint8_t* t = packed + static_cast<size_t>(tile + u) * tile_bytes;
    const int64_t nt = std::min<int64_t>(4, tiles - u);
    switch (nt) {
      case 4:
        AmxTileDots<4>(AmxTiles::kStackTiles, t, pairs, q_pairs, tmp, kPackRows, kLd);
        break;
      case 3:
        AmxTileDots<3>(AmxTiles::kStackTiles, t, pairs, q_pairs, tmp, kPackRows, kLd);
        break;
      case 2:
        AmxTileDots<2>(AmxTiles::kStackTiles, t, pairs, q_pairs, tmp, kPackRows, kLd);
        break;
      default:
        AmxTileDots<1>(AmxTiles::kStackTiles, t, pairs, q_pairs, tmp, kPackRows, kLd);
    }
    StackedGroupOut at[kStackedGroups];
    for (int g = 0; g < kStackedGroups; ++g) {
      at[g] = outs[g];
      if (at[g].out != nullptr) at[g].out += u * kPackRows;
    }
    ScatterStacked(tmp, kLd, nt * kPackRows, at);
  }
}

double SumExp(const float* x, int64_t n, float shift, Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
    case Isa::kAvx512Bf16:
    case Isa::kAmxBf16:
      return SumExpAvx512(x, n, shift);
    case Isa::kAvx2:
      return SumExpAvx2(x, n, shift);
    case Isa::kScalar:
      break;
  }
  return SumExpScalar(x, n, shift);
}

void DotsF32(const float* a, int64_t m, const float* b, int64_t n, int d, float* c, int64_t ldc,
             Isa isa) {
  if (m <= 0 || n <= 0) return;
  isa = Base(isa);
  if (isa == Isa::kScalar) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = DotScalar(a + i * d, b + j * d, d);
    return;
  }
  const int w = isa == Isa::kAvx512 ? 16 : 8;
  const int64_t tiles = (n + w - 1) / w;
  std::vector<float> bp(static_cast<size_t>(tiles * d * w), 0.0f);
  for (int64_t j = 0; j < n; ++j)
    for (int k = 0; k < d; ++k)
      bp[static_cast<size_t>((j / w) * d * w + k * w + j % w)] = b[j * d + k];
  for (int64_t i = 0; i < m; i += 8) {
    const int r = static_cast<int>(std::min<int64_t>(8, m - i));
#define KV_CASE(N)                                                               \
  case N:                                                                        \
    if (isa == Isa::kAvx512)                                                     \
      GemmRowsAvx512<N>(a + i * d, d, bp.data(), tiles, d, n, c + i * ldc, ldc); \
    else                                                                         \
      GemmRowsAvx2<N>(a + i * d, d, bp.data(), tiles, d, n, c + i * ldc, ldc);   \
    break;
    switch (r) {
      KV_CASE(1)
      KV_CASE(2)
      KV_CASE(3)
      KV_CASE(4)
      KV_CASE(5)
      KV_CASE(6)
      KV_CASE(7)
      KV_CASE(8)
    }
#undef KV_CASE
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// Maxima.

float MaxValueScalar(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

void MaxShiftedScalar(const float* x, int64_t ld, int rows, const float* shift, int64_t n,
                      float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] - shift[0];
  for (int r = 1; r < rows; ++r) {
    const float* xr = x + r * ld;
    for (int64_t i = 0; i < n; ++i) {
      const float y = xr[i] - shift[r];
      out[i] = y > out[i] ? y : out[i];
    }
  }
}

KV_TARGET_AVX2 float MaxValueAvx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(x[0]), m1 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
  }
  alignas(32) float a[8];
  _mm256_store_ps(a, _mm256_max_ps(m0, m1));
  float m = a[0];
  for (int j = 1; j < 8; ++j) m = a[j] > m ? a[j] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

KV_TARGET_AVX2 void MaxShiftedAvx2(const float* x, int64_t ld, int rows, const float* shift,
                                   int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 m = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(shift[0]));
    for (int r = 1; r < rows; ++r)
      m = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x + r * ld + i), _mm256_set1_ps(shift[r])),
                        m);
    _mm256_storeu_ps(out + i, m);
  }
  if (i < n) MaxShiftedScalar(x + i, ld, rows, shift, n - i, out + i);
}

KV_TARGET_AVX512 float MaxValueAvx512(const float* x, int64_t n) {
  // Four independent chains: one vmaxps chain waits out its latency every 16 values.
  __m512 m0 = _mm512_set1_ps(x[0]), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + i + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + i + 48));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = TailMask(n - i);
    m0 = _mm512_mask_max_ps(m0, k, m0, _mm512_maskz_loadu_ps(k, x + i));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

KV_TARGET_AVX512 void MaxShiftedAvx512(const float* x, int64_t ld, int rows, const float* shift,
                                       int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = TailMask(n - i);
    __m512 m = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_set1_ps(shift[0]));
    for (int r = 1; r < rows; ++r)
      m = _mm512_max_ps(
          _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + r * ld + i), _mm512_set1_ps(shift[r])), m);
    _mm512_mask_storeu_ps(out + i, k, m);
  }
}

// Signed 32-bit key in the order of the float x: -0 (the bits of INT32_MIN) is folded into +0 on
// the bits, whatever the rounding mode; a negative value's magnitude bits are flipped so that a
// larger magnitude gives a smaller key.
inline int32_t SortKey(float x) {
  int32_t s;
  std::memcpy(&s, &x, sizeof s);
  s = s == std::numeric_limits<int32_t>::min() ? 0 : s;
  return s ^ ((s >> 31) & 0x7FFFFFFF);
}

// keys[i] = SortKey(v[i]) for i < n; *lo / *hi: their minimum and maximum. REQUIRES n >= 1.
void SortKeysScalar(const float* v, int64_t n, int32_t* keys, int32_t* lo, int32_t* hi) {
  int32_t mn = SortKey(v[0]), mx = mn;
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = SortKey(v[i]);
    mn = std::min(mn, keys[i]);
    mx = std::max(mx, keys[i]);
  }
  *lo = mn;
  *hi = mx;
}

int64_t CountAtLeastScalar(const int32_t* keys, int64_t n, int32_t t) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] >= t ? 1 : 0;
  return c;
}

KV_TARGET_AVX2 inline __m256i SortKey8(__m256 x) {
  __m256i s = _mm256_castps_si256(x);
  s = _mm256_andnot_si256(
      _mm256_cmpeq_epi32(s, _mm256_set1_epi32(std::numeric_limits<int32_t>::min())), s);
  return _mm256_xor_si256(
      s, _mm256_and_si256(_mm256_srai_epi32(s, 31), _mm256_set1_epi32(0x7FFFFFFF)));
}

KV_TARGET_AVX2 void SortKeysAvx2(const float* v, int64_t n, int32_t* keys, int32_t* lo,
                                 int32_t* hi) {
  __m256i mn = _mm256_set1_epi32(SortKey(v[0])), mx = mn;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = SortKey8(_mm256_loadu_ps(v + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i), k);
    mn = _mm256_min_epi32(mn, k);
    mx = _mm256_max_epi32(mx, k);
  }
  alignas(32) int32_t a[8], b[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), mn);
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), mx);
  int32_t l = a[0], h = b[0];
  for (int j = 1; j < 8; ++j) l = std::min(l, a[j]), h = std::max(h, b[j]);
  for (; i < n; ++i) {
    keys[i] = SortKey(v[i]);
    l = std::min(l, keys[i]);
    h = std::max(h, keys[i]);
  }
  *lo = l;
  *hi = h;
}

KV_TARGET_AVX2 int64_t CountAtLeastAvx2(const int32_t* keys, int64_t n, int32_t t) {
  // keys >= t  <=>  keys > t - 1 (t > INT32_MIN here: the search never counts at its minimum).
  const __m256i tm1 = _mm256_set1_epi32(t - 1);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // A true compare is -1: subtracting it counts.
    acc0 = _mm256_sub_epi32(
        acc0,
        _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i)), tm1));
    acc1 = _mm256_sub_epi32(
        acc1, _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i + 8)),
                                 tm1));
  }
  alignas(32) int32_t a[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), _mm256_add_epi32(acc0, acc1));
  int64_t c = 0;
  for (int j = 0; j < 8; ++j) c += a[j];
  for (; i < n; ++i) c += keys[i] >= t ? 1 : 0;
  return c;
}

KV_TARGET_AVX512 void SortKeysAvx512(const float* v, int64_t n, int32_t* keys, int32_t* lo,
                                     int32_t* hi) {
  __m512i mn = _mm512_set1_epi32(SortKey(v[0])), mx = mn;
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i negative_zero = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    __m512i s = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, v + i));
    s = _mm512_mask_mov_epi32(s, _mm512_cmpeq_epi32_mask(s, negative_zero), _mm512_setzero_si512());
    const __m512i k = _mm512_xor_si512(s, _mm512_and_si512(_mm512_srai_epi32(s, 31), magnitude));
    _mm512_mask_storeu_epi32(keys + i, m, k);
    mn = _mm512_mask_min_epi32(mn, m, mn, k);
    mx = _mm512_mask_max_epi32(mx, m, mx, k);
  }
  *lo = _mm512_reduce_min_epi32(mn);
  *hi = _mm512_reduce_max_epi32(mx);
}

KV_TARGET_AVX512 int64_t CountAtLeastAvx512(const int32_t* keys, int64_t n, int32_t t) {
  const __m512i tv = _mm512_set1_epi32(t);
  int64_t c0 = 0, c1 = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    c0 += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + i), tv));
    c1 += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + i + 16), tv));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    c0 += __builtin_popcount(
        _mm512_mask_cmpge_epi32_mask(m, _mm512_maskz_loadu_epi32(m, keys + i), tv));
  }
  return c0 + c1;
}

// out[0, k) = the positions i < n with keys[i] > key and the first `ties` with keys[i] == key,
// ascending (the caller's k is their number). Branch-free: the tests would mispredict.
void EmitSelected(const int32_t* keys, int64_t n, int32_t key, int64_t ties, int64_t k,
                  int32_t* out) {
  int64_t o = 0, eq = 0;
  for (int64_t i = 0; i < n && o < k; ++i) {
    const int64_t is_eq = keys[i] == key ? 1 : 0;
    out[o] = static_cast<int32_t>(i);
    o += (keys[i] > key ? 1 : 0) | (is_eq & (eq < ties ? 1 : 0));
    eq += is_eq;
  }
}

// The positions i < n with keys[i] >= key, ascending, into out, which has room for kEmitSlack
// more (whole-vector stores).
// Eight lanes at a time: the lanes that pass are moved to the front by a permutation looked up
// from their mask.
constexpr int64_t kEmitSlack = 8;

struct LanePermutations {
  uint64_t lanes[256];  // for each 8-bit mask, its set lanes' numbers as bytes, lowest first
  LanePermutations() {
    for (int m = 0; m < 256; ++m) {
      uint64_t p = 0;
      int o = 0;
      for (int l = 0; l < 8; ++l)
        if ((m >> l) & 1) p |= static_cast<uint64_t>(l) << (8 * o++);
      lanes[m] = p;
    }
  }
};

KV_TARGET_AVX2 void EmitAtLeastAvx2(const int32_t* keys, int64_t n, int32_t key, int32_t* out) {
  static const LanePermutations kPerm;
  const __m256i tm1 = _mm256_set1_epi32(key - 1);  // key > INT32_MIN (see CountAtLeastAvx2)
  const __m256i step = _mm256_set1_epi32(8);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t o = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, tm1)));
    const __m256i perm =
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kPerm.lanes[m])));
    // Writes 8 lanes; only the first popcount(m) are kept (out has room: see SelectTop).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o),
                        _mm256_permutevar8x32_epi32(idx, perm));
    o += __builtin_popcount(static_cast<unsigned>(m));
    idx = _mm256_add_epi32(idx, step);
  }
  for (; i < n; ++i) {
    out[o] = static_cast<int32_t>(i);
    o += keys[i] >= key ? 1 : 0;
  }
}

KV_TARGET_AVX512 void EmitAtLeastAvx512(const int32_t* keys, int64_t n, int32_t key, int32_t* out) {
  const __m512i kv = _mm512_set1_epi32(key);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t o = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    const __mmask16 take =
        _mm512_mask_cmpge_epi32_mask(m, _mm512_maskz_loadu_epi32(m, keys + i), kv);
    _mm512_mask_compressstoreu_epi32(out + o, take, idx);
    o += __builtin_popcount(take);
    idx = _mm512_add_epi32(idx, step);
  }
}

// The k largest of v[0, n) (ties: the lower position wins), their positions ascending in out[0, k).
// REQUIRES 1 <= k < n; out has room for k + kEmitSlack values (beyond k they are scratch). The k-th
// largest key is found by bisection over the keys' range, each step one vectorised count over all
// n; no data-dependent branches or swaps.
void SelectTop(const float* v, int64_t n, int64_t k, Isa isa, int32_t* out) {
  thread_local std::vector<int32_t> keys;
  keys.resize(static_cast<size_t>(n));
  int32_t lo32, hi32;
  isa = Base(isa);
  auto count = [&](int32_t t) {
    switch (isa) {
      case Isa::kAvx512:
        return CountAtLeastAvx512(keys.data(), n, t);
      case Isa::kAvx2:
        return CountAtLeastAvx2(keys.data(), n, t);
      default:
        return CountAtLeastScalar(keys.data(), n, t);
    }
  };
  switch (isa) {
    case Isa::kAvx512:
      SortKeysAvx512(v, n, keys.data(), &lo32, &hi32);
      break;
    case Isa::kAvx2:
      SortKeysAvx2(v, n, keys.data(), &lo32, &hi32);
      break;
    default:
      SortKeysScalar(v, n, keys.data(), &lo32, &hi32);
  }
  // Invariant: count(>= lo) >= k and count(>= hi + 1) = above < k, so the k-th key is in [lo, hi].
  int64_t lo = lo32, hi = hi32, above = 0;
  bool exact = false;  // count(>= lo) == k: the keys >= lo are the answer, ties and all
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    const int64_t c = count(static_cast<int32_t>(mid));
    if (c >= k) {
      lo = mid;
      if (c == k) {
        exact = true;
        break;
      }
    } else {
      hi = mid - 1;
      above = c;
    }
  }
  if (exact && isa == Isa::kAvx512)
    return EmitAtLeastAvx512(keys.data(), n, static_cast<int32_t>(lo), out);
  if (exact && isa == Isa::kAvx2 && lo > std::numeric_limits<int32_t>::min()) {
    return EmitAtLeastAvx2(keys.data(), n, static_cast<int32_t>(lo), out);
  }
  EmitSelected(keys.data(), n, static_cast<int32_t>(lo), exact ? n : k - above, k, out);
}

}  // namespace

float MaxValue(const float* x, int64_t n, Isa isa) {
  switch (Base(isa)) {
    case Isa::kAvx512:
      return MaxValueAvx512(x, n);
    case Isa::kAvx2:
      return MaxValueAvx2(x, n);
    default:
      return MaxValueScalar(x, n);
  }
}

void MaxShifted(const float* x, int64_t ld, int rows, const float* shift, int64_t n, float* out,
                Isa isa) {
  if (n <= 0) return;
  switch (Base(isa)) {
    case Isa::kAvx512:
      return MaxShiftedAvx512(x, ld, rows, shift, n, out);
    case Isa::kAvx2:
      return MaxShiftedAvx2(x, ld, rows, shift, n, out);
    default:
      return MaxShiftedScalar(x, ld, rows, shift, n, out);
  }
}

void TopK(const float* v, int64_t n, int64_t k, std::vector<int32_t>* out, Isa isa) {
  out->clear();
  k = std::clamp<int64_t>(k, 0, n);
  if (k == 0) return;
  if (k == n) {
    out->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) (*out)[i] = static_cast<int32_t>(i);
    return;
  }
  if (n > 4 * k && n > 4096) {
    // Threshold from a strided sample, chosen a little below the sample's estimate of the k-th
    // value; every element >= it is a candidate. If at least k pass, the true top-k are among
    // them (their values are >= the k-th value >= the threshold); otherwise fall back.
    constexpr int64_t kSample = 4096;
    thread_local std::vector<float> sample;
    sample.resize(kSample);
    for (int64_t i = 0; i < kSample; ++i) sample[i] = v[(i * n) / kSample];
    const int64_t r = std::min<int64_t>(kSample - 1, (k * kSample) / n * 3 / 2 + 16);
    std::nth_element(sample.begin(), sample.begin() + r, sample.end(), std::greater<float>());
    const float threshold = sample[r];
    thread_local std::vector<int32_t> cand;
    thread_local std::vector<float> cand_v;
    cand.clear();
    cand_v.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (v[i] >= threshold) {
        cand.push_back(static_cast<int32_t>(i));
        cand_v.push_back(v[i]);
      }
    }
    const int64_t m = static_cast<int64_t>(cand.size());
    if (m >= k) {
      // Candidates keep their order, so positions among them map to ascending indices.
      out->resize(static_cast<size_t>(k + kEmitSlack));
      if (m > k) SelectTop(cand_v.data(), m, k, isa, out->data());
      for (int64_t j = 0; j < k; ++j) (*out)[j] = cand[m > k ? (*out)[j] : j];
      out->resize(static_cast<size_t>(k));
      return;
    }
  }
  out->resize(static_cast<size_t>(k + kEmitSlack));
  SelectTop(v, n, k, isa, out->data());
  out->resize(static_cast<size_t>(k));
}

namespace {

KV_TARGET_AVX512 void CopyRowsStreamingAvx512(const uint8_t* const* rows, int64_t n,
                                              size_t row_bytes, uint8_t* dst, size_t dst_stride) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* src = rows[j];
    uint8_t* out = dst + static_cast<size_t>(j) * dst_stride;
    for (size_t b = 0; b < row_bytes; b += 64) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + b),
                          _mm512_loadu_si512(reinterpret_cast<const void*>(src + b)));
    }
  }
  _mm_sfence();
}

KV_TARGET_AVX2 bool StrictlyAscendingAvx2(const int32_t* v, int64_t n) {
  int64_t j = 1;
  __m256i good = _mm256_set1_epi32(-1);
  for (; j + 8 <= n; j += 8) {
    const __m256i cur = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j));
    const __m256i prev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j - 1));
    good = _mm256_and_si256(good, _mm256_cmpgt_epi32(cur, prev));
  }
  bool ok = _mm256_movemask_epi8(good) == -1;
  for (; j < n; ++j) ok &= v[j] > v[j - 1];
  return ok;
}

KV_TARGET_AVX2 uint32_t MaxUnsignedAvx2(const int32_t* v, int64_t n) {
  int64_t j = 0;
  __m256i top = _mm256_setzero_si256();
  for (; j + 8 <= n; j += 8) {
    top = _mm256_max_epu32(top, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), top);
  uint32_t m = 0;
  for (uint32_t x : lanes) m = std::max(m, x);
  for (; j < n; ++j) m = std::max(m, static_cast<uint32_t>(v[j]));
  return m;
}

KV_TARGET_AVX2 void WidenU16Avx2(const uint8_t* le16, int64_t n, int32_t* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(le16 + 2 * j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 8),
                        _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1)));
  }
  for (; j < n; ++j) out[j] = le16[2 * j] | (le16[2 * j + 1] << 8);
}

KV_TARGET_AVX2 void NarrowU16Avx2(const int32_t* v, int64_t n, uint8_t* le16) {
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i a =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)), low);
    const __m256i b =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j + 8)), low);
    // packus works per 128-bit lane (a0 b0 a1 b1); the permute puts the quarters in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(le16 + 2 * j), packed);
  }
  for (; j < n; ++j) {
    le16[2 * j] = static_cast<uint8_t>(v[j]);
    le16[2 * j + 1] = static_cast<uint8_t>(v[j] >> 8);
  }
}

KV_TARGET_AVX2 void CopyRowsStreamingAvx2(const uint8_t* const* rows, int64_t n, size_t row_bytes,
                                          uint8_t* dst, size_t dst_stride) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* src = rows[j];
    uint8_t* out = dst + static_cast<size_t>(j) * dst_stride;
    for (size_t b = 0; b < row_bytes; b += 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out + b),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b)));
    }
  }
  _mm_sfence();
}

}  // namespace

void CopyRowsStreaming(const uint8_t* const* rows, int64_t n, size_t row_bytes, uint8_t* dst,
                       size_t dst_stride, Isa isa) {
  const bool aligned =
      reinterpret_cast<uintptr_t>(dst) % 64 == 0 && dst_stride % 64 == 0 && row_bytes % 64 == 0;
  if (aligned && Base(isa) == Isa::kAvx512)
    return CopyRowsStreamingAvx512(rows, n, row_bytes, dst, dst_stride);
  if (aligned && Base(isa) == Isa::kAvx2)
    return CopyRowsStreamingAvx2(rows, n, row_bytes, dst, dst_stride);
  for (int64_t j = 0; j < n; ++j)
    std::memcpy(dst + static_cast<size_t>(j) * dst_stride, rows[j], row_bytes);
}

bool StrictlyAscending(const int32_t* v, int64_t n, Isa isa) {
  if (Base(isa) != Isa::kScalar) return StrictlyAscendingAvx2(v, n);
  bool ok = true;
  for (int64_t j = 1; j < n; ++j) ok &= v[j] > v[j - 1];
  return ok;
}

uint32_t MaxUnsigned(const int32_t* v, int64_t n, Isa isa) {
  if (Base(isa) != Isa::kScalar) return MaxUnsignedAvx2(v, n);
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, static_cast<uint32_t>(v[j]));
  return m;
}

void WidenU16(const uint8_t* le16, int64_t n, int32_t* out, Isa isa) {
  if (Base(isa) != Isa::kScalar) return WidenU16Avx2(le16, n, out);
  for (int64_t j = 0; j < n; ++j) out[j] = le16[2 * j] | (le16[2 * j + 1] << 8);
}

void NarrowU16(const int32_t* v, int64_t n, uint8_t* le16, Isa isa) {
  if (Base(isa) != Isa::kScalar) return NarrowU16Avx2(v, n, le16);
  for (int64_t j = 0; j < n; ++j) {
    le16[2 * j] = static_cast<uint8_t>(v[j]);
    le16[2 * j + 1] = static_cast<uint8_t>(v[j] >> 8);
  }
}

}  // namespace kvrecall::indexer::kernels
