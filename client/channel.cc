#include "client/channel.h"

#include "common/pem.h"
#include "common/status_macros.h"
#include "kvstore/node.h"

namespace kvrecall::client {

absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(const std::string& target, const TlsOptions& tls,
                                                           grpc::ChannelArguments args) {
  args.SetMaxReceiveMessageSize(kvstore::kMaxMessageBytes);
  args.SetMaxSendMessageSize(kvstore::kMaxMessageBytes);
  const bool cert = !tls.cert_file.empty(), key = !tls.key_file.empty();
  if (cert != key) return absl::InvalidArgumentError("a client TLS certificate and its key go together");
  if (tls.ca_file.empty()) {
    if (cert) return absl::InvalidArgumentError("a client TLS certificate needs the servers' CA (tls ca_file)");
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile(tls.ca_file, "TLS CA"));
  if (cert) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPemFile(tls.cert_file, "TLS client certificate"));
    ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPemFile(tls.key_file, "TLS client key"));
  }
  if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  return grpc::CreateCustomChannel(target, grpc::SslCredentials(ssl), args);
}

}  // namespace kvrecall::client
