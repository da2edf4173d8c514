// Transport security against real kvrecall-server processes (issue 9 item 1): TLS, mutual TLS,
// clients that do not trust the server or carry no certificate, and plaintext refused on a
// reachable address. Certificates are made per test run with the openssl CLI.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/tier.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "tls-model";
  s.num_layers = 2;
  s.num_q_heads = 2;
  s.num_kv_heads = 1;
  s.head_dim = 8;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = 100;
  return s;
}

class SecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/security_test_" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ + "/node");
    // A CA, a server certificate for 127.0.0.1 / localhost and a client certificate signed by
    // it, and a second CA that signed nothing here.
    const std::string d = dir_;
    const std::vector<std::string> steps = {
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kvrecall-test-ca -keyout " + d + "/ca.key -out " +
            d + "/ca.pem",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue-ca -keyout " + d + "/rogue.key -out " + d +
            "/rogue.pem",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=kvrecall-server -keyout " + d + "/server.key -out " + d +
            "/server.csr",
        "openssl x509 -req -in " + d + "/server.csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -CAcreateserial -days 2 " +
            "-extfile " + d + "/server.ext -out " + d + "/server.pem",
        "openssl req -newkey rsa:2048 -nodes -subj /CN=kvrecall-worker -keyout " + d + "/client.key -out " + d +
            "/client.csr",
        "openssl x509 -req -in " + d + "/client.csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -CAcreateserial -days 2 " +
            "-out " + d + "/client.pem",
    };
    std::ofstream(d + "/server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n";
    for (const std::string& s : steps) {
      ASSERT_EQ(std::system((s + " >>" + d + "/openssl.log 2>&1").c_str()), 0) << s << "\n" << ReadFile(d + "/openssl.log");
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string F(const std::string& name) const { return dir_ + "/" + name; }

  // A RemoteTier over gRPC only (no UCX) with `tls`; its creation waits for the connection, so
  // a failed handshake shows up here, within `wait`.
  absl::StatusOr<std::unique_ptr<client::Tier>> Connect(const ServerProcess& s, const client::TlsOptions& tls,
                                                        absl::Duration wait = absl::Seconds(20)) {
    client::RemoteTierOptions remote;
    remote.target = s.address();
    remote.transport = "grpc";
    remote.tls = tls;
    client::TierOptions options;
    options.deadline = wait;
    options.recall_buffer_bytes = 1 << 20;
    return client::CreateRemoteTier(remote, options);
  }

  // kvrecallctl status against `s` with extra flags; its exit code.
  int Ctl(const ServerProcess& s, std::vector<std::string> flags) {
    std::vector<std::string> argv = {BinDir() + "/kvrecallctl", "--server=" + s.address(), "--timeout-seconds=5"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    argv.push_back("status");
    auto p = Process::Start(argv, F("ctl.log"));
    if (!p.ok()) return -1;
    auto code = p->Wait(absl::Seconds(30));
    return code.ok() ? *code : -1;
  }

  std::string dir_;
};

TEST_F(SecurityTest, TlsServesClientsThatTrustItsCa) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s, StartServer(F("node"), {"--tls-cert=" + F("server.pem"),
                                                                "--tls-key=" + F("server.key")}));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<client::Tier> tier, Connect(s, {F("ca.pem")}));
  ASSERT_OK(tier->RegisterModel(Spec()));
  ASSERT_OK_AND_ASSIGN(client::OpenResult open, tier->OpenSequence("s", "tls-model", {1, 2, 3}));
  EXPECT_EQ(open.matched_tokens, 0);
  EXPECT_EQ(Ctl(s, {"--tls-ca=" + F("ca.pem")}), 0) << ReadFile(F("ctl.log"));

  // A plaintext client, and one that trusts another CA, get nothing: no connection at all.
  EXPECT_THAT(Connect(s, {}, absl::Seconds(2)), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(Connect(s, {F("rogue.pem")}, absl::Seconds(2)), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_NE(Ctl(s, {}), 0);
  EXPECT_NE(Ctl(s, {"--tls-ca=" + F("rogue.pem")}), 0);
  // The certificate names 127.0.0.1 and localhost; a client expecting another name refuses it.
  client::TlsOptions wrong_name{F("ca.pem")};
  wrong_name.server_name = "kvrecall.example";
  EXPECT_THAT(Connect(s, wrong_name, absl::Seconds(2)), StatusIs(absl::StatusCode::kUnavailable));
  // Bad client settings are caught before connecting.
  EXPECT_THAT(Connect(s, {F("missing.pem")}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(Connect(s, {F("openssl.log")}), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(Connect(s, {F("ca.pem"), "", F("client.key")}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateFromTheCa) {
  ASSERT_OK_AND_ASSIGN(ServerProcess s,
                       StartServer(F("node"), {"--tls-cert=" + F("server.pem"), "--tls-key=" + F("server.key"),
                                               "--tls-ca=" + F("ca.pem")}));
  EXPECT_THAT(Connect(s, {F("ca.pem")}, absl::Seconds(2)), StatusIs(absl::StatusCode::kUnavailable));
  client::TlsOptions mtls{F("ca.pem"), F("client.pem"), F("client.key")};
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<client::Tier> tier, Connect(s, mtls));
  ASSERT_OK(tier->RegisterModel(Spec()));
  EXPECT_EQ(Ctl(s, {"--tls-ca=" + F("ca.pem"), "--tls-cert=" + F("client.pem"), "--tls-key=" + F("client.key")}), 0)
      << ReadFile(F("ctl.log"));
  EXPECT_NE(Ctl(s, {"--tls-ca=" + F("ca.pem")}), 0);
  // A certificate its CA did not sign (self-signed by the rogue CA) is refused too.
  client::TlsOptions rogue{F("ca.pem"), F("rogue.pem"), F("rogue.key")};
  EXPECT_THAT(Connect(s, rogue, absl::Seconds(2)), StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(SecurityTest, PlaintextOnAReachableAddressMustBeAskedFor) {
  auto refused = Process::Start({BinDir() + "/kvrecall-server", "--listen=0.0.0.0:0", "--metrics-port=-1",
                                 "--memory=64MiB", "--transport=none", "--hugepages=false"},
                                F("refused.log"));
  ASSERT_OK(refused.status());
  ASSERT_OK_AND_ASSIGN(int code, refused->Wait(absl::Seconds(30)));
  EXPECT_EQ(code, 2);
  EXPECT_NE(ReadFile(F("refused.log")).find("refusing plaintext gRPC on 0.0.0.0:0"), std::string::npos)
      << ReadFile(F("refused.log"));
  // Half a key pair is a usage error, not a plaintext server.
  auto half = Process::Start({BinDir() + "/kvrecall-server", "--listen=127.0.0.1:0", "--metrics-port=-1",
                              "--memory=64MiB", "--transport=none", "--tls-cert=" + F("server.pem")},
                             F("half.log"));
  ASSERT_OK(half.status());
  ASSERT_OK_AND_ASSIGN(code, half->Wait(absl::Seconds(30)));
  EXPECT_EQ(code, 2) << ReadFile(F("half.log"));
  // Asked for explicitly, it serves.
  ASSERT_OK_AND_ASSIGN(ServerProcess s, StartServer(F("node"), {"--listen=0.0.0.0:0", "--allow-plaintext"}));
  EXPECT_EQ(Ctl(s, {}), 0) << ReadFile(F("ctl.log"));
}

}  // namespace
}  // namespace kvrecall::testing
