// Tier node storage benchmark (`kvrecall-bench store`): arena ingest and prefix sharing.
//
// ingest:  `ingest_tokens` tokens of KV for every layer appended to a kvstore::Node the way an
//          AppendKV stream does (chunks of `chunk_tokens` tokens per layer, one transaction per
//          chunk), `passes` times (the sequence is dropped between passes, so pass 0 faults the
//          arena's pages in and later passes reuse warm slots). Compared with plain memcpy of the
//          same bytes in the same chunks into one fresh, then warm, buffer.
// sharing: `sessions` sessions whose prompts share `prefix_tokens` tokens, each adding
//          `suffix_tokens` of its own; session 0 stores everything, the others open with the full
//          prompt, get the shared prefix as matched_tokens and append only their suffix.
//          sharing_ratio = bytes stored / (one prefix + sessions suffixes).
// spill:   `spill_tokens` tokens of blocks filled in an arena that holds exactly them, leases
//          expired, then as many new blocks allocated: each allocation evicts (spills) one old
//          block to a RocksDB BlockStore under `spill_dir` (spill_gbps); the new blocks are freed
//          and the old ones pinned back one by one (reload_gbps: store read + CRC check + copy
//          into the arena). Baseline: plain RocksDB Put / Get of the same number of values of one
//          block's bytes in the same column family with the same options (rocksdb_*_gbps).
#ifndef KVRECALL_BENCH_STORE_BENCH_H_
#define KVRECALL_BENCH_STORE_BENCH_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrecall::bench {

struct StoreBenchOptions {
  // Model shape; the default is Llama-3-8B's KV (32 layers x 8 kv-heads x 128, bf16: 128 KiB
  // per token over all layers).
  int layers = 32;
  int kv_heads = 8;
  int head_dim = 128;
  std::string dtype = "bf16";  // bf16 | f16 | f32
  int block_tokens = 64;
  int64_t ingest_tokens = 8192;
  int64_t chunk_tokens = 2048;  // tokens per AppendChunk, as the worker pushes them
  int passes = 5;               // >= 2: pass 0 is cold, the best later pass is reported
  int sessions = 16;
  int64_t prefix_tokens = 32768;
  int64_t suffix_tokens = 1024;
  bool hugepages = true;  // let the arena try hugepages
  int64_t spill_tokens = 4096;  // 0: skip the spill part (its figures are null)
  std::string spill_dir;        // empty: $TMPDIR (or /tmp) + "/kvrecall-bench-spill.<pid>"
};

// Parses "--name=value" flags named after the fields above. Arguments that are not "--" flags,
// and "--json", are ignored. INVALID_ARGUMENT for an unknown flag or a bad value.
absl::StatusOr<StoreBenchOptions> ParseStoreBenchFlags(const std::vector<std::string>& args);

// Runs both parts and returns
//   {"bench": "store", "options": {...}, "bytes_per_token": ..., "arena_hugepages": ...,
//    "ingest_gbps", "ingest_cold_gbps", "memcpy_gbps", "memcpy_cold_gbps", "ingest_vs_memcpy",
//    "ingest": {"bytes", "seconds_per_pass": [...]}, "memcpy": {"seconds_per_pass": [...]},
//    "shared_bytes", "ideal_bytes", "independent_bytes", "sharing_ratio", "prefix_hit_rate",
//    "sharing_seconds", "spill_gbps", "reload_gbps", "rocksdb_put_gbps", "rocksdb_get_gbps",
//    "spill": {"bytes", "blocks", "dir", ...}, "notes": [...]}
// (gbps = 1e9 bytes per second). RESOURCE_EXHAUSTED when the shapes do not fit this host's
// memory as requested (scale them down with the flags).
absl::StatusOr<nlohmann::json> RunStoreBenchWithOptions(const StoreBenchOptions& options);

// ParseStoreBenchFlags + RunStoreBenchWithOptions: what `kvrecall-bench store` calls.
absl::StatusOr<nlohmann::json> RunStoreBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_STORE_BENCH_H_
