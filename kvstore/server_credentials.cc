#include "kvstore/server_credentials.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/pem.h"
#include "common/status_macros.h"
#include "grpcpp/security/server_credentials.h"

namespace kvrecall::kvstore {

bool IsLoopbackListen(absl::string_view listen) {
  absl::string_view host = listen;
  if (absl::StartsWith(host, "[")) {
    host = host.substr(1, host.find(']') == absl::string_view::npos ? host.size() - 1 : host.find(']') - 1);
  } else if (size_t colon = host.rfind(':'); colon != absl::string_view::npos) {
    host = host.substr(0, colon);
  }
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const ServerTlsOptions& options,
                                                                              absl::string_view listen) {
  const bool cert = !options.cert_file.empty(), key = !options.key_file.empty();
  if (cert != key) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  if (!cert) {
    if (!options.ca_file.empty()) return absl::InvalidArgumentError("--tls-ca needs --tls-cert and --tls-key");
    if (!options.allow_plaintext && !IsLoopbackListen(listen)) {
      return absl::FailedPreconditionError(
          absl::StrCat("refusing plaintext gRPC on ", listen,
                       ": pass --tls-cert and --tls-key (docs/deploy.md), or --allow-plaintext to serve unencrypted"));
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain, ReadPemFile(options.cert_file, "--tls-cert"));
  ASSIGN_OR_RETURN(pair.private_key, ReadPemFile(options.key_file, "--tls-key"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile(options.ca_file, "--tls-ca"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace kvrecall::kvstore
