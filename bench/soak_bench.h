// kvrecall-bench soak: many concurrent clients against one memory-capped node with eviction on,
// for minutes, checking every byte they read back (issue 9 item 5).
//
// One kvrecall server runs inside this process (bench/loopback_server.h: a kvstore::Node with a
// UCX transport behind the gRPC service on 127.0.0.1), with --memory capped and a spill
// directory, so the arena fills and closed sequences are evicted to RocksDB and reloaded. Each
// client is a thread with its own RemoteTier (gRPC + UCX, its own worker region). A client loops:
//   open a fresh sequence (random token ids) -> AppendKV its whole prompt -> Retrieve (exact, one
//   random layer, every kv-head) and compare every row that arrived with what was written ->
//   close it, dropping most and keeping some; now and then Retrieve from a kept (closed, maybe
//   evicted) sequence of its own and check its rows the same way.
// K/V values are a hash of (sequence, layer, token, kv-head, dim, k|v), so any row can be
// checked without keeping it. A kept sequence the node has let go of (NOT_FOUND) is counted,
// not an error, and so is RESOURCE_EXHAUSTED (the arena full of pinned or leased blocks: the
// node's admission control; the client drops what it started and backs off); every other
// failed call is an error.
//
// The main thread samples the process's RSS every --sample_seconds. The run fails (the command
// exits non-zero and prints why) if any call failed unexpectedly, any row read back differs from
// what was written, or the RSS went above --rss_budget_mib.
//
// JSON: seconds, clients, sequences, ops, ops_per_s, rows_checked, mismatches, errors,
// evicted_reads, backpressure, latency p50/p99 per operation (ms), rss_mib (samples), rss_max_mib,
// rss_budget_mib, node stats at the end, passed.
#ifndef KVRECALL_BENCH_SOAK_BENCH_H_
#define KVRECALL_BENCH_SOAK_BENCH_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvrecall::bench {

struct SoakBenchOptions {
  double minutes = 1;
  int clients = 8;
  std::string memory = "256MiB";  // the node's --memory
  int64_t rss_budget_mib = 0;     // 0: memory + 768 MiB
  int layers = 4;
  int kv_heads = 2;
  int head_dim = 64;
  int tokens = 1024;    // per sequence
  int budget = 64;      // rows Retrieve selects per kv-head
  int keep_every = 4;   // keep (close without dropping) one sequence in this many
  int kept_per_client = 32;  // a client remembers its most recent kept sequences (8 x 32 x 2 MiB > 256 MiB: eviction)
  double sample_seconds = 1;
  std::string ucx_tls;  // empty: UCX's choice
  uint64_t seed = 1;
};

// Flags: --name=value for every field above. INVALID_ARGUMENT for unknown flags or bad values;
// INTERNAL (with the reasons) when the soak fails.
absl::StatusOr<nlohmann::json> RunSoakBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_SOAK_BENCH_H_
