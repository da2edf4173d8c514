// CPU kernels of the indices: element conversion to fp32, dot products, batched query-key dots,
// a vectorised sum of exponentials and a fast top-k.
//
// Every vector kernel exists for three instruction sets, chosen at run time (the binary is built
// for baseline x86-64; the AVX2 and AVX-512 bodies are compiled with target attributes):
//   kScalar      — portable C++, the reference the others are tested against;
//   kAvx2        — AVX2 + FMA + F16C;
//   kAvx512      — AVX-512 F/BW/VL/DQ (+ F16C);
//   kAvx512Bf16  — kAvx512 plus AVX512-BF16, whose vdpbf16ps PackedQueryDotsBf16 uses (every
//                  other kernel runs its kAvx512 body);
//   kAmxBf16     — kAvx512Bf16 plus AMX-BF16: PackedQueryDotsBf16 scores 4 queries at a time
//                  with TDPBF16PS (even element first, denormals flushed: within rounding of
//                  the others, not bit-equal), other query counts with kAvx512's FMA body;
//                  StackedQueryDotsBf16 scores 16 (four groups) per instruction.
// Functions that take an `Isa` use the given one (REQUIRES: IsaSupported(isa)); BestIsa() is
// kAmxBf16 where supported, else the widest one up to kAvx512 (kAvx512Bf16 measured slower on the
// H100 host);
// the environment variable KVRECALL_ISA=scalar|avx2|avx512|avx512bf16|amxbf16 picks another
// supported one, e.g. to compare paths. All functions are pure: thread-safe, no allocation unless
// stated.
#ifndef KVRECALL_INDEXER_KERNELS_H_
#define KVRECALL_INDEXER_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/dtype.h"

namespace kvrecall::indexer::kernels {

enum class Isa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmxBf16 = 4 };

absl::string_view IsaName(Isa isa);  // "scalar" | "avx2" | "avx512" | "avx512bf16" | "amxbf16"
bool IsaSupported(Isa isa);
Isa BestIsa();
// The supported ones, narrowest first (for tests and benchmarks).
std::vector<Isa> SupportedIsas();

// dst[i] = float(src[i]) for i < n. src: n elements of `type` (bf16/fp16 as raw bits, or fp32).
void ToF32(DType type, const void* src, int64_t n, float* dst, Isa isa = BestIsa());

// Σ a[i] * b[i] over i < n, fp32 (accumulation order depends on the ISA).
float Dot(const float* a, const float* b, int64_t n, Isa isa = BestIsa());

// Query-key dots for a batch of key rows:
//   out[h * ld + i] = Σ_j q[h * head_dim + j] * float(rows[i][j])    for h < nq, i < n
// rows: n pointers, each to head_dim elements of `type` (post-RoPE keys);
// q:    [nq][head_dim] fp32; out: nq rows of stride ld (>= n) floats, unscaled.
void QueryKeyDots(DType type, const uint8_t* const* rows, int64_t n, int head_dim, const float* q,
                  int nq, float* out, int64_t ld, Isa isa = BestIsa());

// Key rows packed for PackedQueryDots: tiles of kPackRows rows, the last tile zero-padded.
// Queries read a tile with whole-vector loads, one lane per row, and need no horizontal sums.
//   fp32, fp16: [head_dim][kPackRows] elements (element j of row r at j * kPackRows + r);
//   bf16: [Bf16Pairs(head_dim)][kPackRows][2] elements: elements 2p and 2p + 1 of row r side by
//     side, as one 32-bit word (2p in the low half; an odd head_dim's last pair padded with 0),
//     the operand layout of vdpbf16ps.
inline constexpr int kPackRows = 16;
inline int Bf16Pairs(int head_dim) { return (head_dim + 1) / 2; }
// Bytes of n packed rows of head_dim elements of `type` (whole tiles).
size_t PackedRowsBytes(DType type, int64_t n, int head_dim);
// Packs rows[i] (head_dim elements of `type` each) as packed row i, i < n, into `out`
// (PackedRowsBytes(type, n, head_dim) bytes; the padding is zeroed).
void PackRows(DType type, const uint8_t* const* rows, int64_t n, int head_dim, uint8_t* out);
// Query-key dots over packed rows [first, first + n) of fp32 or fp16:
//   out[h * ld + i] = Σ_j q[h * head_dim + j] * float(row_{first+i}[j])   for h < nq, i < n
// Each dot is one fused multiply-add chain in j order, so every Isa gives the same bits.
// packed: rows packed by PackRows (at least first + n of them); q: [nq][head_dim] fp32.
// REQUIRES: type is fp32 or fp16 (bf16 rows: PackedQueryDotsBf16; a bf16 call writes nothing).
void PackedQueryDots(DType type, const uint8_t* packed, int64_t first, int64_t n, int head_dim,
                     const float* q, int nq, float* out, int64_t ld, Isa isa = BestIsa());

// Queries for PackedQueryDotsBf16: q [nq][head_dim] fp32, each element rounded to bf16 (to
// nearest even), as pairs: out[h * Bf16Pairs(head_dim) + p] = bf16(q[2p]) | bf16(q[2p+1]) << 16
// (an odd head_dim's last high half 0). A bf16 model's queries are rounded without loss.
void PackQueriesBf16(const float* q, int nq, int head_dim, uint32_t* out);
// Dots of bf16 queries (PackQueriesBf16) with packed bf16 rows [first, first + n), scaled:
//   out[h * ld + i] = scale * (chain over p of (+ q[2p+1] k[2p+1]) then (+ q[2p] k[2p]))
// Each product of two bf16 values is exact in fp32, so each step of the fp32 chain rounds once:
// what AVX512-BF16's vdpbf16ps computes, and what every other Isa computes too (same bits; a
// result that underflows to a denormal may differ, as vdpbf16ps flushes it to zero).
void PackedQueryDotsBf16(const uint8_t* packed, int64_t first, int64_t n, int head_dim,
                         const uint32_t* q_pairs, int nq, float scale, float* out, int64_t ld,
                         Isa isa = BestIsa());

// AMX scores up to four groups' queries against a tile in one instruction: the batch's entries
// that share a row copy stack their queries (Search's scoring pass).
inline constexpr int kStackedQueries = 16;
// Whether StackedQueryDotsBf16 runs for head_dim under isa: kAmxBf16 and whole 16-pair steps.
bool CanStackQueries(Isa isa, int head_dim);
// Where StackedQueryDotsBf16 writes one group's 4 queries' results (out == nullptr: the group's
// rows of q_pairs are padding, nothing is written).
struct StackedGroupOut {
  float* out = nullptr;
  int64_t ld = 0;
  float scale = 1;
};
inline constexpr int kStackedGroups = kStackedQueries / 4;
// Dots of kStackedQueries bf16 queries (q_pairs: [16][Bf16Pairs(head_dim)], rows of
// PackQueriesBf16; group g is rows 4g..4g+3) with the whole packed tiles [tile, tile + tiles),
// scaled per group: outs[g].out[h * outs[g].ld + (t - tile) * kPackRows + r] = scale * dot.
// Each value is the bits PackedQueryDotsBf16 gives that query under kAmxBf16 with the same
// scale (TDPBF16PS computes each result row on its own, whatever the rows beside it hold).
// REQUIRES: CanStackQueries(kAmxBf16, head_dim), IsaSupported(kAmxBf16), tiles >= 0, and
// outs[g].ld >= tiles * kPackRows for each group written.
void StackedQueryDotsBf16(const uint8_t* packed, int64_t tile, int64_t tiles, int head_dim,
                          const uint32_t* q_pairs, const StackedGroupOut (&outs)[kStackedGroups]);

// Dense fp32 dot matrix: c[i * ldc + j] = a_i . b_j for i < m, j < n; a: [m][d], b: [n][d] fp32,
// ldc >= n. Packs b (allocates n * d floats); meant for many-by-many products (k-means).
void DotsF32(const float* a, int64_t m, const float* b, int64_t n, int d, float* c, int64_t ldc,
             Isa isa = BestIsa());

// Σ exp(x[i] - shift) over i < n, with x[i] - shift <= 0 expected (shift = max x); accumulated in
// double per block. Relative error <= 1e-6 against std::exp.
double SumExp(const float* x, int64_t n, float shift, Isa isa = BestIsa());

// The largest of x[0, n). REQUIRES: n >= 1 and no NaN in x (a NaN's effect depends on the Isa).
float MaxValue(const float* x, int64_t n, Isa isa = BestIsa());

// out[i] = max over r < rows of (x[r * ld + i] - shift[r]), for i < n (ld >= n, rows >= 1). Every
// Isa gives the same bits (one rounding per difference; max is exact). REQUIRES: no NaN.
void MaxShifted(const float* x, int64_t ld, int rows, const float* shift, int64_t n, float* out,
                Isa isa = BestIsa());

// Indices of the k largest values of v[0, n) (ties: the lower index wins; -0 ties with +0),
// returned in ascending index order in *out. k is clamped to [0, n]. REQUIRES: no NaN in v.
// Keeps O(n) thread-local scratch.
void TopK(const float* v, int64_t n, int64_t k, std::vector<int32_t>* out, Isa isa = BestIsa());

// dst + j * dst_stride <- row_bytes bytes at rows[j], for j < n, for destinations that no CPU
// reads soon (rows on their way to a GPU or a NIC): AVX-512 and AVX2 use non-temporal stores,
// which neither read the destination's lines first nor leave them in the cache, then a store
// fence, when dst, dst_stride and row_bytes are multiples of 64; otherwise (and kScalar) memcpy.
// Sources need no alignment.
void CopyRowsStreaming(const uint8_t* const* rows, int64_t n, size_t row_bytes, uint8_t* dst,
                       size_t dst_stride, Isa isa = BestIsa());

// Checks and conversions of a tier's answers (client::internal::CheckRecalled runs them over every
// selected token of a decode step, ~262 K at 256 entries x 1024):
// Whether v[0, n) is strictly ascending (true for n <= 1).
bool StrictlyAscending(const int32_t* v, int64_t n, Isa isa = BestIsa());
// The largest of v[0, n) read as uint32 (a negative value is larger than any non-negative one);
// 0 for n == 0.
uint32_t MaxUnsigned(const int32_t* v, int64_t n, Isa isa = BestIsa());
// out[i] = the little-endian uint16 at le16 + 2 * i, for i < n. le16 needs no alignment.
void WidenU16(const uint8_t* le16, int64_t n, int32_t* out, Isa isa = BestIsa());
// The opposite way (a node writing slots for the wire or a worker's region): the low 16 bits of
// v[i] as the little-endian uint16 at le16 + 2 * i, for i < n. le16 needs no alignment.
void NarrowU16(const int32_t* v, int64_t n, uint8_t* le16, Isa isa = BestIsa());

}  // namespace kvrecall::indexer::kernels

#endif  // KVRECALL_INDEXER_KERNELS_H_
