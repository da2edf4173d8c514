// Delta streaming vs ucx_perftest on the same UCX transport (issue 5's stream benchmark).
//
// A kvstore::Node with a UCX transport holds `sequences` × `kv_heads` entries' worth of K/V
// (random bf16, filled directly through Sequence::BeginAppend / AppendChunk / CommitAppend). A
// second UCX transport instance in this process plays the worker: it allocates a region and the
// node attaches it (Node::AttachWorker). Every timed call is one Node::Retrieve (method exact,
// worker attached, stable nonzero slot_epoch per entry, increasing call_seq), so the slot-mirror
// diff, the packing of new rows and the one-put-per-entry path of Node::StreamDeltas all run.
//
// Per message size (--message_sizes, bytes of one entry's put = budget × 2 × row_bytes): each
// call's candidate range is exactly `budget` tokens and moves to a disjoint window every call, so
// every selected row is new and every call streams entries × budget rows. stream_gbps = bytes
// streamed / wall time of the Retrieve calls (search, planning, packing, puts, flush: all of it).
// Next to it, ucx_perftest -t ucp_put_bw with the same message size and UCX_TLS, spawned by the
// benchmark (perftest_runner.h); stream_vs_perftest = stream_gbps / ucx_perftest_gbps (target
// >= 0.8 for 256 KiB+); with --perftest_runs > 1 it is the median of that many runs (all in
// ucx_perftest_runs_gbps). ucx_perftest_gbps is null when it is not installed or --perftest=false.
//
// stream_stage_gbps = the same bytes / the node's own time for its streaming stage (slot plans,
// row copies or puts, results; RetrieveOutcome::stream_micros), i.e. without validation, reads
// and search. A call's range holds exactly `budget` tokens, which an exact search takes whole
// without scoring (indexer::Search), so the calls are validation + reads + streaming.
// Breakdown per size (to read the ratio): ids_only_us_p50 = the same Retrieve without a worker
// (validation, snapshots, exact search); stream_excl_search_gbps = bytes per call / (p50 -
// ids_only p50), an estimate of plan + pack + put + flush alone; putall_gbps = the transport
// alone (RemoteWriter::PutAll with StreamDeltas' op shape: one op per entry, same region).
//
// Steady phase: budget --steady_budget, the range slides by --drift × budget per call, so a
// fraction ~drift of the rows is new: rows/s, bytes per call, and the fraction actually sent.
//
// At the end of each phase the worker region is compared, byte for byte, with Node::ReadRows of
// the tokens the last call reported as filled (every entry).
#ifndef KVRECALL_BENCH_STREAM_BENCH_H_
#define KVRECALL_BENCH_STREAM_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvrecall::bench {

struct StreamBenchOptions {
  std::string tls = "tcp";           // UCX_TLS of both ends and of ucx_perftest
  std::string net_devices = "auto";  // "auto": "lo" when tls contains tcp, else UCX's choice
  int entries = 8;                   // (sequence, kv-head) entries per Retrieve
  int kv_heads = 4;                  // per sequence; sequences = ceil(entries / kv_heads)
  int group = 1;                     // q-heads per kv-head (the exact search's work scales with it)
  int head_dim = 128;                // bf16: 256 B rows, 512 B K+V pairs
  std::vector<int64_t> message_sizes = {262144, 1048576, 4194304};
  double seconds = 2;                // per size, unless iterations > 0
  int iterations = 0;                // > 0: exactly this many timed calls per size
  int warmup = 2;                    // untimed calls per size
  int windows = 4;                   // stored tokens = windows × the largest budget (>= 2)
  double drift = 0.1;                // steady phase: fraction of the budget that changes per call
  int steady_budget = 1024;          // 0 skips the steady phase
  bool perftest = true;              // run ucx_perftest next to each size
  int64_t perftest_iters = 0;        // 0: about 128 MiB (tcp) / 2 GiB (others) per size, >= 20
  double perftest_timeout = 120;     // seconds per ucx_perftest process
  // ucx_perftest runs per size; ucx_perftest_gbps is their median (one run at 256 KiB over shm
  // read anywhere from 18 to 37 GB/s on the H100 host).
  int perftest_runs = 3;
  std::string perftest_binary = "ucx_perftest";
  int threads = 0;   // the node's search threads (NodeOptions); <= 0: every core
  int spin_us = -1;  // NodeOptions::search_spin in µs; < 0: the node's default
  uint64_t seed = 1;
};

// Flags: --name=value for every field above (--message_sizes comma-separated). INVALID_ARGUMENT
// for unknown flags or bad values.
absl::StatusOr<nlohmann::json> RunStreamBench(const std::vector<std::string>& args);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_STREAM_BENCH_H_
