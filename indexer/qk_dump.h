// On-disk dumps of real post-RoPE queries, keys (and values) for measuring the indices on real
// attention. `kvrecall-worker --dump-qk DIR` writes them (WriteQkDump*); benchmarks and tests
// read them (ReadQkDump*).
//
// Format (version 1), a directory:
//   header.json         {"format": "kvrecall-qk-dump", "version": 1, "dtype": "f32"|"bf16"|"f16",
//                        "head_dim": D, "num_q_heads": H, "num_kv_heads": KV, "tokens": N,
//                        "prompt_tokens": P, "layers": [l0, l1, ...], "has_values": bool,
//                        "rope_theta": θ, "model": "name"}
//   layer_<l>.q.bin     [H][N][D]   post-RoPE queries of layer l
//   layer_<l>.k.bin     [KV][N][D]  post-RoPE keys
//   layer_<l>.v.bin     [KV][N][D]  values (only if has_values)
// Arrays are raw, little-endian, of `dtype` (bf16/f16 as IEEE bit patterns), no padding. Token
// positions [0, P) are the prompt, [P, N) decode steps. GQA: query head h belongs to kv-head
// h / (H / KV). Unknown header keys are ignored (readers of version 1 accept additions).
#ifndef KVRECALL_INDEXER_QK_DUMP_H_
#define KVRECALL_INDEXER_QK_DUMP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

struct QkDumpHeader {
  DType dtype = DType::kBF16;
  int head_dim = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int64_t tokens = 0;
  int64_t prompt_tokens = 0;
  std::vector<int> layers;
  bool has_values = true;
  double rope_theta = 0;
  std::string model;
};

// One layer, converted to fp32.
struct QkDumpLayer {
  int layer = 0;
  std::vector<float> q;  // [num_q_heads][tokens][head_dim]
  std::vector<float> k;  // [num_kv_heads][tokens][head_dim]
  std::vector<float> v;  // [num_kv_heads][tokens][head_dim] or empty
};

// Writes DIR/header.json (creating DIR if needed). INVALID_ARGUMENT for an inconsistent header
// (non-positive sizes, num_q_heads not a multiple of num_kv_heads, prompt_tokens > tokens);
// INTERNAL for I/O errors.
absl::Status WriteQkDumpHeader(const std::string& dir, const QkDumpHeader& header);

// Writes one layer's arrays from fp32 (rounded to header.dtype). Shapes as in QkDumpLayer; v
// must be empty iff !header.has_values. INVALID_ARGUMENT for a layer not in header.layers or
// wrong sizes; INTERNAL for I/O errors.
absl::Status WriteQkDumpLayer(const std::string& dir, const QkDumpHeader& header, int layer,
                              absl::Span<const float> q, absl::Span<const float> k,
                              absl::Span<const float> v);

// NOT_FOUND if DIR/header.json is missing; DATA_LOSS if it is not a valid version-1 header.
absl::StatusOr<QkDumpHeader> ReadQkDumpHeader(const std::string& dir);

// NOT_FOUND for a missing file, DATA_LOSS for a file of the wrong size, INVALID_ARGUMENT for a
// layer not in the header.
absl::StatusOr<QkDumpLayer> ReadQkDumpLayer(const std::string& dir, const QkDumpHeader& header,
                                            int layer);

// A PagedRows view (fp32, one page) of kv-head `kv_head`'s keys (or values) of a loaded layer.
// The view points into `layer`, which must outlive it. REQUIRES: kv_head < num_kv_heads.
PagedRows DumpRows(const QkDumpHeader& header, const QkDumpLayer& layer, int kv_head, bool values);

// The query group of kv-head `kv_head` at `position`: [group][head_dim] fp32 into *out.
void DumpQueryGroup(const QkDumpHeader& header, const QkDumpLayer& layer, int kv_head,
                    int64_t position, std::vector<float>* out);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_QK_DUMP_H_
