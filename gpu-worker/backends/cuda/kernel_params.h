// Argument structs of the decode worker's CUDA kernels (kernels.h declares the launchers). Plain
// structs of device pointers, sizes and strides, with no CUDA or Abseil types, so that both the
// g++-compiled launchers and the nvcc-compiled kernels include them.
//
// Conventions for every struct below:
//   - bf16 tensors are carried as uint16_t bit patterns (the layout of __nv_bfloat16); all
//     arithmetic accumulates in fp32.
//   - Every pointer is a device pointer unless a comment says otherwise.
//   - Strides are in elements, not bytes; the innermost (head_dim / dim) axis is contiguous.
//   - Rows of head_dim bf16 values must start 16-byte aligned (the kernels move rows with
//     16-byte loads): base pointers 16-byte aligned and every stride a multiple of 8.
#ifndef KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNEL_PARAMS_H_
#define KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNEL_PARAMS_H_

#include <cstddef>
#include <cstdint>

namespace kvrecall::worker::cuda {

// A read-only K/V cache: for sequence b, position t and kv-head h the K row is
//   k + page(b, t) * page_stride + (t % page_size) * token_stride + h * head_stride
// and likewise for V (same strides), where
//   paged (page_table != nullptr): page(b, t) = page_table[b * page_table_stride + t / page_size]
//   contiguous (page_table == nullptr): page(b, t) = b and page_size is unbounded, so a
//     [batch][max_len][num_kv_heads][head_dim] cache has page_stride = max_len * num_kv_heads *
//     head_dim, token_stride = num_kv_heads * head_dim, head_stride = head_dim.
struct KvCacheView {
  const uint16_t* k = nullptr;          // bf16
  const uint16_t* v = nullptr;          // bf16
  const int32_t* page_table = nullptr;  // [batch][page_table_stride] page ids, or nullptr
  int page_table_stride = 0;            // entries per sequence in page_table
  int page_size = 0;                    // tokens per page (a power of two); paged only
  int64_t page_stride = 0;              // elements between pages (or sequences if contiguous)
  int64_t token_stride = 0;             // elements between consecutive tokens of a page
  int64_t head_stride = 0;              // elements between kv-heads of a token
};

// Dense decode attention (one new query token per sequence) over positions [0, lengths[b]).
struct DecodeAttentionParams {
  int batch = 0;
  int num_q_heads = 0;  // a multiple of num_kv_heads; q-head i reads kv-head i / group
  int num_kv_heads = 0;
  int head_dim = 0;                  // 64 or 128
  int max_len = 0;                   // >= every lengths[b]; sizes the grid (host value)
  const uint16_t* q = nullptr;       // [batch][num_q_heads][head_dim] bf16, post-RoPE
  const int32_t* lengths = nullptr;  // [batch] tokens of each sequence in the cache
  KvCacheView cache;
  float scale = 0.0f;       // softmax scale, usually 1/sqrt(head_dim)
  uint16_t* out = nullptr;  // [batch][num_q_heads][head_dim] bf16
  int num_splits = 0;       // split-K partitions per (sequence, kv-head); 0 = chosen from the shape
};

// Causal prefill attention of one sequence's chunk (chunked prefill): num_tokens new query
// tokens at positions [start, start + num_tokens); query i attends to the cache rows
// [0, start + i] of sequence `seq`, which must already hold the chunk's own K/V rows (KvAppend
// or the prefill's K/V write runs first). q-head h reads kv-head h / (num_q_heads / num_kv_heads).
// The cache is addressed exactly as DecodeAttention's (KvCacheView with b = seq), so the
// engine's dense cache is passed as it is.
struct PrefillAttentionParams {
  int num_tokens = 0;  // n >= 0 new query tokens (0 launches nothing)
  int start = 0;       // position of the chunk's first token (>= 0); the cache holds start + n rows
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // 64 or 128
  // Token i, q-head h at q + i * q_token_stride + h * head_dim, bf16, post-RoPE.
  const uint16_t* q = nullptr;
  int64_t q_token_stride = 0;  // a multiple of 8, >= num_q_heads * head_dim; 0 = packed
  KvCacheView cache;
  int seq = 0;         // the sequence's batch row in `cache` (contiguous) or page-table row (paged)
  float scale = 0.0f;  // softmax scale, usually 1/sqrt(head_dim)
  // Token i, q-head h at out + i * out_token_stride + h * head_dim, bf16.
  uint16_t* out = nullptr;
  int64_t out_token_stride = 0;  // a multiple of 8, >= num_q_heads * head_dim; 0 = packed
  int block_rows = 0;            // query tokens per block: 64 or 128; 0 = chosen from the shape
};

// Per (sequence, kv-head) slot cache of recalled rows: entry e = b * num_kv_heads + h holds
// `budget` K rows at k + e * entry_stride + slot * row_stride (V likewise).
struct SlotCacheView {
  const uint16_t* k = nullptr;         // bf16
  const uint16_t* v = nullptr;         // bf16
  int budget = 0;                      // slots per entry
  int64_t entry_stride = 0;            // elements between entries
  int64_t row_stride = 0;              // elements between slots
  const int32_t* token_ids = nullptr;  // [batch * num_kv_heads][budget] position each slot holds
  const int32_t* counts = nullptr;     // [batch * num_kv_heads] slots [0, count) are filled
};

// Sparse decode attention over the union of
//   sinks:  positions [0, min(num_sinks, len)) of the dense cache,
//   window: positions [max(sinks_end, len - window), len) of the dense cache,
//   slots:  filled slots whose token id is >= 0 and lies in neither of the above (a slot that
//           also holds a sink or window token is skipped, so every token counts exactly once).
// REQUIRES: the filled slots of one entry hold distinct token ids.
struct SparseAttentionParams {
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;                  // 64 or 128
  int max_len = 0;                   // >= every lengths[b] (host value)
  int num_sinks = 0;                 // >= 0
  int window = 0;                    // >= 0
  const uint16_t* q = nullptr;       // [batch][num_q_heads][head_dim] bf16
  const int32_t* lengths = nullptr;  // [batch]
  KvCacheView cache;                 // sinks and window rows
  SlotCacheView slots;
  float scale = 0.0f;
  uint16_t* out = nullptr;  // [batch][num_q_heads][head_dim] bf16
  int num_splits = 0;       // 0 = chosen from the shape
};

// One (sequence, kv-head) entry's streamed rows: rows[j] (K[head_dim] then V[head_dim] bf16,
// adjacent; 16-byte aligned) goes to slot fill_slots[first + j] of entry (seq, kv_head), for
// j < num_rows. `rows` is any address the device can read: the tier's recall region, page-locked
// and read by the kernel where the rows landed (PinnedHostRanges), or device memory.
// With row_addresses (non-null; then `rows` is unused), row j's K is at row_addresses[2j] and its
// V at row_addresses[2j + 1], each head_dim bf16, 16-byte aligned, device-readable: the kernel
// gathers the rows where the tier keeps them (LocalTier's page-locked arena).
struct SlotFill {
  const uint16_t* rows = nullptr;
  int32_t seq = 0;
  int32_t kv_head = 0;
  int32_t first = 0;
  int32_t num_rows = 0;
  const uint16_t* const* row_addresses = nullptr;  // [2 * num_rows] or null
};

// Writes streamed rows into slot caches, one block per entry. Invalid input is skipped, never
// read or written out of bounds, and counted in *num_rejected (when not null; the kernel adds to
// it, the caller zeroes it): a row whose slot is outside [0, budget), or whose address (given by
// row_addresses) is null or misaligned, counts 1; an entry whose seq / kv_head is out of range,
// whose rows (or row_addresses array) are misaligned or whose [first, first + num_rows) is not
// inside [0, num_fill_slots) counts max(num_rows, 1).
// REQUIRES: no two rows share a destination; `entries` and `fill_slots` are device-readable.
struct SlotScatterParams {
  int num_entries = 0;
  int head_dim = 0;  // a multiple of 8
  int batch = 0;
  int num_kv_heads = 0;
  int budget = 0;
  const SlotFill* entries = nullptr;     // [num_entries]
  const int32_t* fill_slots = nullptr;   // [num_fill_slots]
  int64_t num_fill_slots = 0;
  uint16_t* k_slots = nullptr;  // bf16, layout as SlotCacheView
  uint16_t* v_slots = nullptr;
  int64_t entry_stride = 0;
  int64_t row_stride = 0;
  int32_t* num_rejected = nullptr;  // or nullptr
};

// Writes the K and V rows of one new token per sequence into a cache: token b's row of kv-head h
// goes to sequence b, position positions[b], addressed as KvCacheView (the fields below mean
// what they mean there; page_table == nullptr: contiguous, page(b, t) = b).
// REQUIRES: the cache rows of the given positions are covered by the page table.
struct KvAppendParams {
  int batch = 0;
  int num_kv_heads = 0;
  int head_dim = 0;                    // a multiple of 8
  const uint16_t* k = nullptr;         // token b, kv-head h at k + b * src_stride + h * head_dim
  const uint16_t* v = nullptr;         // likewise
  int64_t src_stride = 0;              // elements between tokens (a multiple of 8)
  const int32_t* positions = nullptr;  // [batch]; a negative position writes nothing
  uint16_t* cache_k = nullptr;         // bf16
  uint16_t* cache_v = nullptr;         // bf16
  const int32_t* page_table = nullptr;
  int page_table_stride = 0;
  int page_size = 0;
  int64_t page_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

// CTKVR's inverted lists of one layer, built from the prefill's keys while they are on the GPU
// (ARCHITECTURE §4: index construction during prefill; indexer/index.h has the list rule and
// BuildInput::ctkvr_lists the form the tier takes them in). For kv-head h, centroid c and the
// group's q-heads j < group = num_q_heads / num_kv_heads (q-head h * group + j), over the key
// positions [begin, end), n = end - begin:
//   logit[h][c][j][t] = scale * (q[c][h * group + j] . k[t][h])    fp32 from the bf16 inputs
//   lse[h][c][j]      = log sum_t exp(logit[h][c][j][t])            over the whole range
//   score[h][c][t]    = max_j (logit[h][c][j][t] - lse[h][c][j])
//   tokens[h][c]      = the list_len = min(list_size, n) positions t of the highest scores
//                       (ties: the lower position wins), ascending.
struct CtkvrListsParams {
  const uint16_t* keys =
      nullptr;               // position t, kv-head h at keys + t * token_stride + h * head_stride
  int64_t token_stride = 0;  // a multiple of 8
  int64_t head_stride = 0;   // a multiple of 8, >= head_dim
  int64_t begin = 0;         // key positions [begin, end) are listed
  int64_t end = 0;
  // Centroid c, q-head i at queries + c * query_stride + i * head_dim, bf16, post-RoPE.
  const uint16_t* queries = nullptr;
  int64_t query_stride = 0;  // a multiple of 8, >= num_q_heads * head_dim
  int num_centroids = 0;
  int num_q_heads = 0;  // a multiple of num_kv_heads
  int num_kv_heads = 0;
  int head_dim = 0;    // 64 or 128
  float scale = 0.0f;  // softmax scale, usually 1/sqrt(head_dim)
  int list_size = 0;
  int32_t* tokens = nullptr;  // [num_kv_heads][num_centroids][list_len] positions
  float* lse = nullptr;       // [num_kv_heads][num_centroids][group]
};

}  // namespace kvrecall::worker::cuda

#endif  // KVRECALL_GPU_WORKER_BACKENDS_CUDA_KERNEL_PARAMS_H_
