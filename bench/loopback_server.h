// A kvrecall server inside a benchmark's own process: a kvstore::Node with a UCX transport behind
// the gRPC service on 127.0.0.1 (ephemeral port), for benchmarks that put RemoteTier next to an
// in-process reference in one run (rpc, ingest).
#ifndef KVRECALL_BENCH_LOOPBACK_SERVER_H_
#define KVRECALL_BENCH_LOOPBACK_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/grpc_service.h"
#include "kvstore/node.h"
#include "transport/transport.h"

namespace kvrecall::bench {

// Destroyed in reverse order: the gRPC server stops before the service, node and transport go.
struct LoopbackServer {
  std::unique_ptr<transport::Transport> transport;
  std::unique_ptr<kvstore::Node> node;
  std::unique_ptr<kvstore::GrpcService> service;
  std::unique_ptr<grpc::Server> server;
  std::string target;  // "127.0.0.1:<port>"
  ~LoopbackServer();
};

// UNAVAILABLE when the server cannot start; the node's arena_status() when its storage cannot.
// put_delay > 0: every put to a worker waits that long first (transport::WithPutDelay), for
// tests of a slow node.
absl::StatusOr<std::unique_ptr<LoopbackServer>> StartLoopbackServer(
    const kvstore::NodeOptions& options, const std::string& ucx_tls,
    absl::Duration put_delay = absl::ZeroDuration());

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_LOOPBACK_SERVER_H_
