// Synthetic post-RoPE queries, keys and values that behave like real long-context attention, for
// tests and benchmarks of the indices. Deterministic per options (seed included).
//
// What the generator models (head_dim/2 rotary pairs, pair i rotating at θ^(-2i/head_dim)):
//   - rotary structure: every query and key is a pre-RoPE vector rotated by its position, so
//     fast pairs carry relative-position signal and slow pairs carry content;
//   - magnitudes that grow towards the slow pairs, and a few key channels with a large constant
//     value (the "massive" channels that make inner-product clustering fail and cosine work);
//   - content: keys belong to topic segments (128–2048 tokens) and, inside them, to phrases
//     (16–128 tokens) with their own direction; each query head mixes a few topics it is
//     "about", so attention concentrates on some thousands of tokens, in runs;
//   - queries that drift slowly with position (sinusoids with periods of 4K–32K tokens);
//   - optionally (query_token_weight > 0, off by default) a per-position retrieval component:
//     each query head at position t also looks up one token p_t of the retrieval range — p_t's
//     phrase content as its key carries it (channel magnitudes, rotated to p_t), at unit length
//     times query_token_weight × the norm of the query's stable part, is added — and p_t is
//     kept from t − 1 with probability query_token_persistence, else drawn anew. At weight 1.3
//     it reproduces what the trained reference model's traces show for queries
//     (docs/benchmarks.md, "Real traces of recall-tiny"): cosine ≈ 0.64 at lag 1 and ≈ 0.3–0.4
//     from lag 16 on, where the default generator has 0.995 and 0.94 — but it concentrates
//     attention far beyond them (top 1% of tokens: ≈ 1.0 of the mass vs 0.68 real), because
//     the generator's keys have larger content norms than the real ones; so it is not the
//     default yet;
//   - attention sinks: the first `sinks` keys align with every query;
//   - needles: `needles` keys at random positions of the retrieval range; needle j gets the
//     post-RoPE direction of head (j % group)'s middle decode query added (its stable part,
//     without the per-position retrieval component), scaled so that this query scores it 0.5
//     logit above its best other token (with the lookup component: above the best
//     other token of every decode query of the head). Every decode query must find every needle (they drift
//     little over the decode steps); the prompt's last queries are similar but not equal, which
//     is what CTKVR's centroids rely on.
// Layout: positions [0, tokens). The last `decode_queries` positions are decode steps (their
// query groups are the search entries); the `prompt_queries` positions before them give the
// prompt's last queries (CTKVR centroids). The retrieval range is [sinks, tokens - window).
#ifndef KVRECALL_INDEXER_SYNTHETIC_H_
#define KVRECALL_INDEXER_SYNTHETIC_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "indexer/paged_rows.h"

namespace kvrecall::indexer {

struct SyntheticOptions {
  int64_t tokens = 8192;
  int head_dim = 128;         // even
  int group = 4;              // query heads per kv-head
  int prompt_queries = 1024;  // prompt query groups returned (the last ones before decode)
  int decode_queries = 16;    // decode query groups (search entries); <= window
  int sinks = 16;
  int window = 256;  // recent window, excluded from retrieval
  int needles = 8;
  double rope_theta = 500000;
  int massive_channels = 4;
  float massive_value = 12;
  float query_token_weight = 0;  // > 0: per-position retrieval component (see above; 1.3)
  float query_token_persistence = 0.45f;  // P(p_t = p_{t-1}), in [0, 1)
  DType dtype = DType::kBF16;  // storage type of keys and values
  int page_tokens = 64;
  uint64_t seed = 1;
};

struct SyntheticData {
  SyntheticOptions options;
  // Keys and values of one (layer, kv-head): [tokens][head_dim] of options.dtype in pages of
  // page_tokens rows; the views point into the byte buffers below (this object owns them, so it
  // is not copyable or movable once made: hold it by unique_ptr).
  PagedRows keys;
  PagedRows values;
  std::vector<uint8_t> key_bytes;
  std::vector<uint8_t> value_bytes;
  std::vector<float> prompt_queries;  // [num_prompt_queries][group][head_dim] fp32, post-RoPE
  int num_prompt_queries = 0;
  std::vector<float> decode_queries;   // [decode_queries][group][head_dim] fp32, post-RoPE
  std::vector<int32_t> needle_tokens;  // ascending, inside the retrieval range
  int64_t retrieval_begin = 0;         // = sinks
  int64_t retrieval_end = 0;           // = tokens - window

  SyntheticData() = default;
  SyntheticData(const SyntheticData&) = delete;
  SyntheticData& operator=(const SyntheticData&) = delete;
};

// INVALID_ARGUMENT for inconsistent options (odd/non-positive head_dim, tokens too small for
// sinks + window + needles, decode_queries > window, ...).
absl::StatusOr<std::unique_ptr<SyntheticData>> GenerateSynthetic(const SyntheticOptions& options);

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_SYNTHETIC_H_
