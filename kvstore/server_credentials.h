// Transport security of kvrecall-server's gRPC port (ARCHITECTURE.md §10).
//
//   TLS:         --tls-cert=server.pem --tls-key=server.key
//   mutual TLS:  ... --tls-ca=clients-ca.pem   (clients must present a certificate it signed)
//   plaintext:   no TLS flags, and either a loopback --listen address or --allow-plaintext
//
// A tier holds every tenant's prompts in a form that can be turned back into text, so plaintext
// on a reachable address must be asked for, not fallen into.
#ifndef KVRECALL_KVSTORE_SERVER_CREDENTIALS_H_
#define KVRECALL_KVSTORE_SERVER_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/security/server_credentials.h"

namespace kvrecall::kvstore {

struct ServerTlsOptions {
  std::string cert_file;  // PEM certificate chain of this server
  std::string key_file;   // PEM private key of cert_file
  std::string ca_file;    // PEM CA bundle; set: clients must present a certificate it signed
  bool allow_plaintext = false;
};

// Credentials for a server listening on `listen` ("host:port"). INVALID_ARGUMENT for a key
// without a certificate (or the reverse) or a CA without both; NOT_FOUND / DATA_LOSS for a file
// that cannot be read or holds no PEM block; FAILED_PRECONDITION for plaintext on an address that
// is not loopback without allow_plaintext.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const ServerTlsOptions& options,
                                                                              absl::string_view listen);

// Whether the host of "host:port" (or "[v6]:port") is a loopback address or "localhost".
bool IsLoopbackListen(absl::string_view listen);

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SERVER_CREDENTIALS_H_
