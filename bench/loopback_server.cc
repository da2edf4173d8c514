#include "bench/loopback_server.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/clock.h"
#include "common/status_macros.h"
#include "transport/fault_injection.h"

namespace kvrecall::bench {

LoopbackServer::~LoopbackServer() {
  if (server != nullptr) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

absl::StatusOr<std::unique_ptr<LoopbackServer>> StartLoopbackServer(
    const kvstore::NodeOptions& options, const std::string& ucx_tls, absl::Duration put_delay) {
  auto s = std::make_unique<LoopbackServer>();
  ASSIGN_OR_RETURN(s->transport, transport::CreateUcxTransport({ucx_tls}));
  if (put_delay > absl::ZeroDuration())
    s->transport = transport::WithPutDelay(std::move(s->transport), put_delay);
  s->node = std::make_unique<kvstore::Node>(options, s->transport.get(), Clock::Real());
  RETURN_IF_ERROR(s->node->arena_status());
  s->service = std::make_unique<kvstore::GrpcService>(s->node.get(), 0);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kvstore::kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kvstore::kMaxMessageBytes);
  builder.RegisterService(s->service.get());
  s->server = builder.BuildAndStart();
  if (s->server == nullptr || port == 0) return absl::UnavailableError("cannot start the in-process gRPC server");
  s->target = absl::StrCat("127.0.0.1:", port);
  return s;
}

}  // namespace kvrecall::bench
