// Causal prefill attention of one sequence's chunk, flash-attention style on the tensor cores
// (mma.sync m16n8k16, bf16 inputs, fp32 accumulators). See kernels.h for the contract; this
// file assumes kernels.cc validated the arguments.
//
// One block of W warps per (q-head, tile of BM = 16 W query tokens); warp w owns the tile's
// tokens [16 w, 16 w + 16). The block walks the K/V rows [0, position of its last token] in
// tiles of kBlockN = 64 rows:
//   - the K and V tiles are copied to shared memory with cp.async (rows past the last needed
//     one are zero-filled, never read), double-buffered so that tile j + 1 loads while tile j
//     is computed. Each row's 16-byte chunks are XOR-swizzled by the row (chunk c of row r is
//     stored at c ^ (r % 8)) so that ldmatrix's eight row addresses hit distinct banks;
//   - S = Q K^T: Q's A fragments stay in registers for the whole walk (staged once through the
//     second K/V buffer), K's B fragments come from ldmatrix on the row-major [key][dim] tile;
//   - the causal mask is applied only on tiles that cross a warp's diagonal, and a warp skips
//     the tiles that lie entirely after its last token (it still helps load them);
//   - online softmax in the log2 domain (scores * scale * log2(e), exp2f): a row of S lives in
//     one quad of 4 lanes, so its max takes two shuffles; each lane keeps a partial row sum,
//     reduced once at the end (every lane of a quad rescales by the same factor);
//   - O += P V: P, rounded to bf16, is used as the A operand straight from the S accumulators
//     (the m16n8 C fragments of two adjacent key tiles are the m16k16 A fragment), V's B
//     fragments come from ldmatrix.trans.
// Blocks are numbered heaviest (last) query tile first, all heads of a tile together, so the
// long causal rows start early and the short ones fill the tail.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "gpu-worker/backends/cuda/internal/kv_cache.cuh"
#include "gpu-worker/backends/cuda/internal/launch.h"

namespace kvrecall::worker::cuda::internal {
namespace {

constexpr int kBlockN = 64;  // K/V rows per tile
constexpr float kLog2e = 1.4426950408889634f;

struct PrefillArgs {
  const uint16_t* q;
  uint16_t* out;
  KvCacheView cache;
  int64_t q_stride, out_stride;
  int num_tokens, start, seq, num_q_heads, group, page_shift, m_tiles;
  float qscale;  // scale * log2(e)
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (nothing is read then).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Ldsm4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16x16, row-major) * b (16x8, column-major), bf16 in, fp32 accumulate.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as bf16 (round to nearest even), lo in the low half (the lower column index).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Element offset of row r, 16-byte chunk c of a swizzled [rows][D] bf16 tile.
template <int D>
__device__ __forceinline__ int Swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

template <int D, int W>
__global__ void __launch_bounds__(W * 32) PrefillKernel(PrefillArgs a) {
  constexpr int BM = 16 * W, BN = kBlockN, NT = W * 32;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(BM <= 2 * BN, "the Q tile is staged in the second K/V buffer");
  static_assert(NT % kChunks == 0 && (BN * kChunks) % NT == 0 && (BM * kChunks) % NT == 0);
  // Buffer s: K tile at smem + s * 2 * BN * D, V tile right after it.
  extern __shared__ __align__(128) uint16_t smem[];

  const int head = blockIdx.x % a.num_q_heads;
  const int m0 = (a.m_tiles - 1 - static_cast<int>(blockIdx.x / a.num_q_heads)) * BM;
  const int kvh = head / a.group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n = a.num_tokens, start = a.start;
  // Rows [0, key_end) are attended by some token of the block; key_end <= start + n.
  const int key_end = start + min(m0 + BM, n);
  const int n_tiles = (key_end + BN - 1) / BN;

  auto load_kv = [&](int tile, int buf) {
    uint16_t* sk = smem + buf * 2 * BN * D;
    uint16_t* sv = sk + BN * D;
    const int c = tid % kChunks;
#pragma unroll
    for (int i = 0; i < BN * kChunks / NT; ++i) {
      const int r = tid / kChunks + i * (NT / kChunks);
      const int t = tile * BN + r;
      const bool valid = t < key_end;
      const int64_t off = valid ? CacheOffset(a.cache, a.page_shift, a.seq, t, kvh) + c * 8 : 0;
      CpAsync16(SmemAddr(sk + Swz<D>(r, c)), a.cache.k + off, valid);
      CpAsync16(SmemAddr(sv + Swz<D>(r, c)), a.cache.v + off, valid);
    }
  };

  // Q tile -> second buffer, K/V tile 0 -> first buffer; then Q into registers.
  uint16_t* sq = smem + 2 * BN * D;
  {
    const int c = tid % kChunks;
#pragma unroll
    for (int i = 0; i < BM * kChunks / NT; ++i) {
      const int r = tid / kChunks + i * (NT / kChunks);
      const int tok = m0 + r;
      const bool valid = tok < n;
      const int64_t off =
          valid ? static_cast<int64_t>(tok) * a.q_stride + static_cast<int64_t>(head) * D + c * 8
                : 0;
      CpAsync16(SmemAddr(sq + Swz<D>(r, c)), a.q + off, valid);
    }
  }
  load_kv(0, 0);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    Ldsm4(SmemAddr(sq + Swz<D>(warp * 16 + (lane & 15), 2 * kk + (lane >> 4))), qf[kk]);
  }
  __syncthreads();  // the second buffer is free for tile 1

  // Accumulator rows of this lane: warp tokens (lane / 4) and (lane / 4) + 8; columns
  // 2 * (lane % 4) + {0, 1} of each 8-wide n-tile.
  const int tok0 = m0 + warp * 16 + (lane >> 2);  // chunk-local token of fragment rows 0
  const int warp_first = m0 + warp * 16;
  const bool warp_active = warp_first < n;
  // Position of the warp's last real token: keys after it are masked for every row.
  const int warp_last_pos = start + min(warp_first + 15, n - 1);
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) load_kv(j + 1, (j + 1) & 1);
    CpAsyncCommit();
    CpAsyncWait<1>();  // tile j has landed (this thread's copies) ...
    __syncthreads();   // ... and everyone's
    const int k0 = j * BN;
    if (warp_active && k0 <= warp_last_pos) {
      const uint16_t* sk = smem + (j & 1) * 2 * BN * D;
      const uint16_t* sv = sk + BN * D;
      float s[BN / 8][4];
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          // Matrices: keys np*16 + [0, 8) and + [8, 16), dims kk*16 + [0, 8) and + [8, 16).
          uint32_t b[4];
          Ldsm4(SmemAddr(sk + Swz<D>(np * 16 + ((lane >> 4) << 3) + (lane & 7),
                                     2 * kk + ((lane >> 3) & 1))),
                b);
          Mma(s[2 * np], qf[kk], b[0], b[1]);
          Mma(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
      }
      // Scale and mask: key k is visible to chunk token i iff k <= start + i.
      const bool crosses = k0 + BN - 1 > start + warp_first;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[nt][e] * a.qscale;
          if (crosses) {
            const int key = k0 + nt * 8 + 2 * (lane & 3) + (e & 1);
            if (key > start + tok0 + (e >> 1) * 8) v = -INFINITY;
          }
          s[nt][e] = v;
        }
      }
      // Online softmax, rows i = 0 (token tok0) and 1 (tok0 + 8).
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[i], mx);
        // A row with nothing visible yet keeps p = 0 (exp2(-inf)) without NaNs.
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2f(m_run[i] - m_use);
        m_run[i] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          const float p0 = exp2f(s[nt][2 * i] - m_use), p1 = exp2f(s[nt][2 * i + 1] - m_use);
          s[nt][2 * i] = p0;
          s[nt][2 * i + 1] = p1;
          sum += p0 + p1;
        }
        l_run[i] = l_run[i] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[dt][2 * i] *= alpha;
          o[dt][2 * i + 1] *= alpha;
        }
      }
      // O += P V.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t pa[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]),
                                PackBf16(s[2 * kk][2], s[2 * kk][3]),
                                PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // Matrices (transposed): keys kk*16 + [0, 8) and + [8, 16), dims dp*16 + [0, 8) and
          // + [8, 16).
          uint32_t b[4];
          Ldsm4T(SmemAddr(sv + Swz<D>(kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                      2 * dp + (lane >> 4))),
                 b);
          Mma(o[2 * dp], pa, b[0], b[1]);
          Mma(o[2 * dp + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // buffer j & 1 is free for tile j + 2
  }

  if (!warp_active) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int tok = tok0 + 8 * i;
    if (tok >= n) continue;
    uint16_t* dst = a.out + static_cast<int64_t>(tok) * a.out_stride +
                    static_cast<int64_t>(head) * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8) =
          PackBf16(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    }
  }
}

template <int D, int W>
cudaError_t Launch(const PrefillArgs& a, cudaStream_t stream) {
  constexpr int kSmemBytes = 4 * kBlockN * D * static_cast<int>(sizeof(uint16_t));
  const cudaError_t e = cudaFuncSetAttribute(
      PrefillKernel<D, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (e != cudaSuccess) return e;
  const unsigned blocks = static_cast<unsigned>(a.m_tiles) * a.num_q_heads;
  PrefillKernel<D, W><<<blocks, W * 32, kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int PrefillBlockRows(const PrefillAttentionParams& p) {
  if (p.block_rows != 0) return p.block_rows;
  // 128-token blocks load each K/V tile for twice the queries (half the shared-memory fill
  // traffic per FLOP) but are half as many. At head_dim 128 they were as fast or faster at
  // every measured shape on an H100, even at n = 512 (128 blocks for 132 SMs; NOTES.md); at
  // head_dim 64 (unmeasured) they are taken while they still give every SM two blocks.
  if (p.head_dim == 128) return 128;
  const int64_t blocks128 = (static_cast<int64_t>(p.num_tokens) + 127) / 128 * p.num_q_heads;
  return blocks128 >= 2 * static_cast<int64_t>(SmCount()) ? 128 : 64;
}

cudaError_t LaunchPrefillAttention(const PrefillAttentionParams& p, int block_rows,
                                   cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  PrefillArgs a;
  a.q = p.q;
  a.out = p.out;
  a.cache = p.cache;
  const int64_t packed = static_cast<int64_t>(p.num_q_heads) * p.head_dim;
  a.q_stride = p.q_token_stride != 0 ? p.q_token_stride : packed;
  a.out_stride = p.out_token_stride != 0 ? p.out_token_stride : packed;
  a.num_tokens = p.num_tokens;
  a.start = p.start;
  a.seq = p.seq;
  a.num_q_heads = p.num_q_heads;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.page_shift = PageShift(p.cache);
  a.m_tiles = (p.num_tokens + block_rows - 1) / block_rows;
  a.qscale = p.scale * kLog2e;
  if (p.head_dim == 64) {
    return block_rows == 128 ? Launch<64, 8>(a, stream) : Launch<64, 4>(a, stream);
  }
  return block_rows == 128 ? Launch<128, 8>(a, stream) : Launch<128, 4>(a, stream);
}

}  // namespace kvrecall::worker::cuda::internal
