// Transport data-path benchmark: RemoteWriter::PutAll throughput and latency, for comparison with
// `ucx_perftest -t ucp_put_bw` on the same UCX transport (scripts/bench-transport.sh runs both).
//
// Two phases, each timed for `seconds`:
//   scattered:  batches of `rows_per_put_batch` rows of `row_bytes` each, to distinct random row
//               slots of the receiver's region (the shape of streaming selected K/V rows), one
//               PutAll per batch.
//   contiguous: one PutAll of a single `large_put_bytes` op per call.
// Sender and receiver are two Transport instances in this process (two UCX workers, each with its
// own progress thread, talking over the chosen transport); the output says so.
#ifndef KVRECALL_BENCH_TRANSPORT_BENCH_H_
#define KVRECALL_BENCH_TRANSPORT_BENCH_H_

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrecall::bench {

struct TransportBenchOptions {
  // UCX_TLS for both ends ("tcp", "posix,sysv,cma,self", ...), or "inproc" for the memcpy
  // transport (a ceiling: no UCX at all).
  std::string transports = "tcp";
  // UCX_NET_DEVICES for both ends; empty = UCX's choice. "lo" keeps TCP on loopback.
  std::string net_devices;
  size_t row_bytes = 512;
  int rows_per_put_batch = 1024;
  // Contiguous-phase put size; 0 skips the phase.
  size_t large_put_bytes = 4 << 20;
  // Receiver region; the scattered rows land in distinct slots of it.
  // REQUIRES: >= rows_per_put_batch * row_bytes and >= large_put_bytes.
  size_t region_bytes = 64 << 20;
  // Seconds per phase.
  double seconds = 3;
  // Concurrent PutAll callers in each phase (each with its own RemoteWriter, all sharing one
  // connection, as the tier node's thread pool does).
  int threads = 1;
  uint32_t seed = 1;
};

// Parses "--name=value" flags named after the fields above (e.g. "--transports=tcp",
// "--rows_per_put_batch=256", "--seconds=1.5"). Arguments that are not "--" flags, and
// "--json", are ignored so that callers can pass their whole subcommand argv.
// INVALID_ARGUMENT for an unknown flag or a bad value.
absl::StatusOr<TransportBenchOptions> ParseTransportBenchFlags(
    const std::vector<std::string>& args);

// Runs both phases and returns
//   {"bench": "transport", "transport": "ucx"|"inproc", "tls": ..., "same_process": true,
//    "options": {...},
//    "scattered":  {"row_bytes", "rows_per_batch", "threads", "calls", "rows", "seconds",
//                   "rows_per_s", "gb_per_s", "mib_per_s", "latency_us": {"p50", "p99", "max"}},
//    "contiguous": {"put_bytes", "threads", "calls", "seconds", "gb_per_s", "mib_per_s",
//                   "latency_us": {...}},
//    "verified": true}
// (gb = 1e9 bytes; mib_per_s uses 2^20, as ucx_perftest's "MB/s" does). Latency is per PutAll
// call. "verified" is a final check that one scattered batch landed byte-exact.
// Errors: INVALID_ARGUMENT for inconsistent options; whatever the transport answers.
absl::StatusOr<nlohmann::json> RunTransportBench(const TransportBenchOptions& options);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_TRANSPORT_BENCH_H_
