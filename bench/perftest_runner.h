// Runs `ucx_perftest -t ucp_put_bw` (server and client, two child processes on 127.0.0.1) from
// inside a benchmark, and parses its "Final:" line the way scripts/bench-transport.sh does.
//
// The server is `ucx_perftest -p PORT` in the background; the client, started once the server
// listens (its port appears in /proc/net/tcp), is
//   ucx_perftest 127.0.0.1 -p PORT -t ucp_put_bw -s SIZE -n ITERS -w WARMUP
// both with UCX_TLS=<tls> and, when the list contains tcp, UCX_NET_DEVICES=lo (other UCX_*
// variables of this process are passed through). Both are killed at the timeout.
#ifndef KVRECALL_BENCH_PERFTEST_RUNNER_H_
#define KVRECALL_BENCH_PERFTEST_RUNNER_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvrecall::bench {

// One "Final:" line:
//   Final: iters lat50%(us) lat_avg(us) lat_overall(us) bw_avg(MB/s) bw_overall(MB/s)
//          msgrate_avg msgrate_overall
// perftest's "MB" is 2^20 bytes; gb_per_s = mib_per_s * 2^20 / 1e9 (bw_overall, as the script).
struct PerftestResult {
  int64_t iterations = 0;
  double latency_p50_us = 0;
  double latency_avg_us = 0;
  double mib_per_s = 0;
  double gb_per_s = 0;
  double msgs_per_s = 0;
};

// Whether a UCX_TLS list names tcp, and the UCX_NET_DEVICES to use for `net_devices` ("auto" =
// "lo" when tls contains tcp so TCP stays on loopback, else UCX's choice: "").
bool ContainsTcp(const std::string& tls);
std::string ResolveNetDevices(const std::string& tls, const std::string& net_devices);

// Finds the last "Final:" line in perftest's output. INVALID_ARGUMENT when there is none or it
// does not have 8 numeric columns.
absl::StatusOr<PerftestResult> ParsePerftestFinal(absl::string_view output);

struct PerftestOptions {
  std::string binary = "ucx_perftest";  // looked up in PATH unless it contains '/'
  std::string tls;                      // UCX_TLS for both processes; empty = leave as is
  // UCX_NET_DEVICES; "auto" = "lo" when tls contains "tcp", unset otherwise.
  std::string net_devices = "auto";
  size_t message_bytes = 0;
  int64_t iterations = 0;
  int64_t warmup = -1;  // < 0: iterations / 10 (at least 1)
  absl::Duration timeout = absl::Seconds(120);  // per process
  int attempts = 3;                             // new port and new server on failure
};

// The binary's full path, or NOT_FOUND when it is not installed.
absl::StatusOr<std::string> FindPerftest(const std::string& binary);

// NOT_FOUND when ucx_perftest is not installed; DEADLINE_EXCEEDED at the timeout; UNAVAILABLE
// when the server never listened or the client failed (the message carries its output's tail);
// INVALID_ARGUMENT for bad options or unparsable output.
absl::StatusOr<PerftestResult> RunUcxPerftest(const PerftestOptions& options);

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_PERFTEST_RUNNER_H_
