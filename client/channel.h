// gRPC channels to tier nodes, with TLS as configured (client/tier.h TlsOptions). Every client
// of the tier (RemoteTier, ClusterTier, kvrecallctl, kvrecall-worker) opens its channels here.
#ifndef KVRECALL_CLIENT_CHANNEL_H_
#define KVRECALL_CLIENT_CHANNEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/tier.h"
#include "grpcpp/grpcpp.h"

namespace kvrecall::client {

// A channel to `target` with `args` plus the message size limits every kvrecall channel uses:
// TLS when tls.ca_file is set (with a client certificate when cert_file/key_file are), else
// plaintext; with tls.token_file, every call carries the bearer token it holds. INVALID_ARGUMENT
// for a client key without its certificate (or the reverse), a certificate without a CA, or an
// empty or multi-line token file; NOT_FOUND / DATA_LOSS for unreadable or non-PEM files. Connection
// failures (an untrusted server certificate among them) show up on the first call, as
// UNAVAILABLE.
absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(const std::string& target, const TlsOptions& tls,
                                                           grpc::ChannelArguments args = {});

}  // namespace kvrecall::client

#endif  // KVRECALL_CLIENT_CHANNEL_H_
