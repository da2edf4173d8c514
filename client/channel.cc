#include "client/channel.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/file.h"
#include "common/logging.h"
#include "common/pem.h"
#include "common/status_macros.h"
#include "grpcpp/support/client_interceptor.h"
#include "kvstore/node.h"

namespace kvrecall::client {
namespace {

constexpr absl::Duration kTokenReload = absl::Seconds(10);

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path, "token file"));
  const std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty() || token.find_first_of(" \t\r\n") != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("token file ", path, " must hold one token"));
  }
  return token;
}

// The "authorization" value of a token file, re-read every kTokenReload; a failed re-read keeps
// the previous token (logged).
class TokenSource {
 public:
  TokenSource(std::string path, std::string token)
      : path_(std::move(path)), value_("Bearer " + token), next_read_(Clock::Real()->Now() + kTokenReload) {}
  std::string Value() {
    absl::MutexLock lock(&mu_);
    const absl::Time now = Clock::Real()->Now();
    if (now >= next_read_) {
      next_read_ = now + kTokenReload;
      if (absl::StatusOr<std::string> t = ReadToken(path_); t.ok()) {
        value_ = "Bearer " + *t;
      } else {
        KV_LOG(WARNING) << "keeping the previous bearer token: " << t.status();
      }
    }
    return value_;
  }

 private:
  const std::string path_;
  absl::Mutex mu_;
  std::string value_ ABSL_GUARDED_BY(mu_);
  absl::Time next_read_ ABSL_GUARDED_BY(mu_);
};

class BearerInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(std::shared_ptr<TokenSource> token) : token_(std::move(token)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", token_->Value()});
    }
    methods->Proceed();
  }

 private:
  std::shared_ptr<TokenSource> token_;
};

class BearerFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerFactory(std::shared_ptr<TokenSource> token) : token_(std::move(token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new BearerInterceptor(token_);
  }

 private:
  std::shared_ptr<TokenSource> token_;
};

// The channel, with the bearer interceptor when tls.token_file is set.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const std::shared_ptr<grpc::ChannelCredentials>& creds,
                                                           const grpc::ChannelArguments& args, const TlsOptions& tls) {
  if (tls.token_file.empty()) return grpc::CreateCustomChannel(target, creds, args);
  ASSIGN_OR_RETURN(std::string token, ReadToken(tls.token_file));
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<BearerFactory>(std::make_shared<TokenSource>(tls.token_file, token)));
  return grpc::experimental::CreateCustomChannelWithInterceptors(target, creds, args, std::move(factories));
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(const std::string& target, const TlsOptions& tls,
                                                           grpc::ChannelArguments args) {
  args.SetMaxReceiveMessageSize(kvstore::kMaxMessageBytes);
  args.SetMaxSendMessageSize(kvstore::kMaxMessageBytes);
  const bool cert = !tls.cert_file.empty(), key = !tls.key_file.empty();
  if (cert != key) return absl::InvalidArgumentError("a client TLS certificate and its key go together");
  if (tls.ca_file.empty()) {
    if (cert) return absl::InvalidArgumentError("a client TLS certificate needs the servers' CA (tls ca_file)");
    return MakeChannel(target, grpc::InsecureChannelCredentials(), args, tls);
  }
  grpc::SslCredentialsOptions ssl;
  ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile(tls.ca_file, "TLS CA"));
  if (cert) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPemFile(tls.cert_file, "TLS client certificate"));
    ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPemFile(tls.key_file, "TLS client key"));
  }
  if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  return MakeChannel(target, grpc::SslCredentials(ssl), args, tls);
}

}  // namespace kvrecall::client
