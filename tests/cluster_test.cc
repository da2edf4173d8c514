// Many nodes: three real kvrecall-server processes on loopback (started with --peers and
// --advertise) behind a ClusterTier.
//   - routing spreads sequences over the nodes and keeps sequences with a shared prompt prefix on
//     one node;
//   - a client with a wrong node list is redirected to the owners (or told so), never silently
//     misplaced;
//   - with R = 2, a decode-like run (append one token per sequence, retrieve every layer, compared
//     bit for bit with an in-process LocalTier oracle) survives SIGKILL of a node, a restart of it
//     with a stale durable copy, and an unnoticed restart of another node with an empty disk; no
//     acknowledged token is lost and no stale row is ever served.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/cluster_tier.h"
#include "client/tier.h"
#include "common/clock.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/placement.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"
#include "tests/testing/process.h"

namespace kvrecall::testing {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr int kLayers = 2, kKvHeads = 2, kGroup = 2, kHeadDim = 8, kVocab = 1000;
constexpr size_t kRow = kHeadDim * 2;  // bf16
constexpr int kNodes = 3;

ModelSpec Spec() {
  ModelSpec s;
  s.model_id = "m";
  s.num_layers = kLayers;
  s.num_q_heads = kKvHeads * kGroup;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kHeadDim;
  s.kv_dtype = DType::kBF16;
  s.vocab_size = kVocab;
  return s;
}

uint32_t Mix(uint32_t x) { return static_cast<uint32_t>(placement::Fmix64(x)); }

// One row of K (v=false) or V: finite bf16 values, a function of (sequence, layer, head, token).
std::string Row(int seq, int layer, bool v, int head, int64_t token) {
  std::string r(kRow, '\0');
  for (int d = 0; d < kHeadDim; ++d) {
    const uint32_t h = Mix(static_cast<uint32_t>(seq * 1000003 + layer * 7919 + (v ? 104729 : 0) + head * 613 +
                                                 static_cast<int>(token) * 31 + d));
    const uint16_t b = F32ToBf16(static_cast<float>(static_cast<int>(h % 2001) - 1000) / 1000.0f);
    std::memcpy(&r[2 * d], &b, 2);
  }
  return r;
}

int32_t TokenId(int seq, int64_t pos) { return static_cast<int32_t>((seq * 131 + pos * 7) % kVocab); }

std::string SeqName(int seq) { return absl::StrCat("seq", seq); }

std::vector<int32_t> Prompt(int seq, int n) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(TokenId(seq, i));
  return p;
}

// KV of tokens [t0, t0 + n) of `seq`; with ids when the tier does not know them yet.
client::AppendBatch Batch(int seq, int64_t t0, int64_t n, bool with_ids) {
  client::AppendBatch b;
  b.token_start = t0;
  b.num_tokens = n;
  for (int64_t t = t0; t < t0 + n && with_ids; ++t) b.token_ids.push_back(TokenId(seq, t));
  b.keys.resize(kLayers);
  b.values.resize(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kKvHeads; ++h) {
      for (int64_t t = t0; t < t0 + n; ++t) {
        b.keys[l] += Row(seq, l, false, h, t);
        b.values[l] += Row(seq, l, true, h, t);
      }
    }
  }
  return b;
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(a.sin_port);
}

// Sequence id -> stored tokens on one node, read with a plain stub.
std::map<std::string, int64_t> StoredOn(const std::string& address) {
  auto stub = v1::KvRecall::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  v1::StatsRequest req;
  req.set_include_sequences(true);
  v1::StatsResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  std::map<std::string, int64_t> out;
  grpc::Status s = stub->Stats(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  for (const auto& q : resp.sequences()) out[q.sequence_id()] = q.stored_tokens();
  return out;
}

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = absl::StrCat(::testing::TempDir(), "/cluster.", getpid(), ".",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    for (int i = 0; i < kNodes; ++i) {
      const int port = FreePort();
      ASSERT_GT(port, 0);
      ports_.push_back(port);
      names_.push_back(absl::StrCat("127.0.0.1:", port));
    }
    servers_.resize(kNodes);
    for (int i = 0; i < kNodes; ++i) ASSERT_NO_FATAL_FAILURE(StartNode(i, "data"));
  }
  void TearDown() override {
    servers_.clear();
    std::filesystem::remove_all(dir_);
  }

  // (Re)starts node i on its port, durable in <dir>/node<i>/<data>.
  void StartNode(int i, const std::string& data) {
    const std::string d = absl::StrCat(dir_, "/node", i);
    std::filesystem::create_directories(d);
    auto s = StartServer(d, {absl::StrCat("--listen=127.0.0.1:", ports_[i]), "--metrics-port=-1",
                             "--transport=none", "--memory=32MiB", "--block-tokens=16", "--search-threads=1",
                             "--rpc-threads=2", "--peers=" + absl::StrJoin(names_, ","), "--advertise=" + names_[i],
                             "--durable", absl::StrCat("--data-dir=", d, "/", data)});
    ASSERT_TRUE(s.ok()) << s.status();
    servers_[i] = std::make_unique<ServerProcess>(std::move(*s));
  }
  void KillNode(int i) {
    ASSERT_EQ(kill(servers_[i]->process.pid(), SIGKILL), 0);
    ASSERT_TRUE(servers_[i]->process.Wait(absl::Seconds(10)).ok());
  }
  int IndexOf(const std::string& name) const {
    return static_cast<int>(std::find(names_.begin(), names_.end(), name) - names_.begin());
  }

  std::unique_ptr<client::ClusterTier> Connect(std::vector<std::string> peers, int r, Clock* clock = nullptr,
                                               bool follow = true) {
    client::ClusterTierOptions co;
    co.peers = std::move(peers);
    co.replication = r;
    co.remote.transport = "grpc";
    co.clock = clock;
    co.down_interval = absl::Seconds(1);
    co.connect_timeout = absl::Seconds(1);
    co.follow_redirects = follow;
    client::TierOptions to;
    to.tenant = "t";
    to.deadline = absl::Seconds(10);
    to.recall_buffer_bytes = 1 << 20;
    auto t = client::CreateClusterTier(co, to);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? std::move(*t) : nullptr;
  }

  std::string dir_;
  std::vector<int> ports_;
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<ServerProcess>> servers_;
};

TEST_F(ClusterTest, RoutingSpreadsSequencesAndKeepsSharedPrefixesTogether) {
  auto tier = Connect(names_, 1);
  ASSERT_NE(tier, nullptr);
  ASSERT_OK(tier->RegisterModel(Spec()));
  std::map<std::string, int> per_node;
  std::map<std::string, std::string> where;
  for (int s = 0; s < 60; ++s) {
    const std::vector<int32_t> prompt = Prompt(s, 40);
    ASSERT_OK(tier->OpenSequence(SeqName(s), "m", prompt).status());
    const std::vector<std::string> r = tier->ReplicasOf(SeqName(s));
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0], placement::Owners(names_, placement::PrefixAffinityKey("t", "m", prompt), 1)[0]);
    per_node[r[0]]++;
    where[SeqName(s)] = r[0];
  }
  ASSERT_EQ(per_node.size(), 3u);
  for (const auto& [node, n] : per_node) EXPECT_GE(n, 8) << node;  // 20 expected
  // Each node holds exactly the sequences routed to it.
  for (const std::string& node : names_) {
    for (const auto& [seq, stored] : StoredOn(node)) EXPECT_EQ(where[seq], node) << seq;
  }

  // Ten sessions with one 1024-token system prompt and their own questions: one node.
  std::vector<int32_t> shared = Prompt(1000, 1024);
  std::string home;
  for (int s = 0; s < 10; ++s) {
    std::vector<int32_t> p = shared;
    for (int i = 0; i < 30 + 7 * s; ++i) p.push_back(TokenId(2000 + s, i));
    ASSERT_OK(tier->OpenSequence(absl::StrCat("chat", s), "m", p).status());
    const std::vector<std::string> r = tier->ReplicasOf(absl::StrCat("chat", s));
    ASSERT_EQ(r.size(), 1u);
    if (s == 0) home = r[0];
    EXPECT_EQ(r[0], home) << s;
  }
  const std::map<std::string, int64_t> on_home = StoredOn(home);
  for (int s = 0; s < 10; ++s) EXPECT_EQ(on_home.count(absl::StrCat("chat", s)), 1u) << s;
}

// kvrecallctl drain on one node: new sequences go to the other nodes, the drained node keeps
// serving (and taking appends for) the sequences it holds; undrain brings it back.
TEST_F(ClusterTest, DrainedNodeTakesNoNewSequencesButServesItsOwn) {
  auto tier = Connect(names_, 1);
  ASSERT_NE(tier, nullptr);
  ASSERT_OK(tier->RegisterModel(Spec()));
  std::vector<int> on_drained;
  for (int s = 0; s < 30; ++s) {
    ASSERT_OK(tier->OpenSequence(SeqName(s), "m", Prompt(s, 40)).status());
    ASSERT_OK(tier->AppendKV(SeqName(s), Batch(s, 0, 40, false)));
    if (tier->ReplicasOf(SeqName(s))[0] == names_[0]) on_drained.push_back(s);
  }
  ASSERT_FALSE(on_drained.empty());
  auto ctl = [&](const std::string& cmd) {
    auto p = Process::Start({BinDir() + "/kvrecallctl", "--server=" + names_[0], cmd}, dir_ + "/ctl.log");
    ASSERT_TRUE(p.ok()) << p.status();
    auto rc = p->Wait(absl::Seconds(20));
    ASSERT_TRUE(rc.ok()) << rc.status();
    EXPECT_EQ(*rc, 0) << ReadFile(dir_ + "/ctl.log");
  };
  ASSERT_NO_FATAL_FAILURE(ctl("drain"));
  for (int s = 100; s < 130; ++s) {
    ASSERT_OK(tier->OpenSequence(SeqName(s), "m", Prompt(s, 40)).status());
    EXPECT_NE(tier->ReplicasOf(SeqName(s))[0], names_[0]) << s;
  }
  EXPECT_GT(tier->cluster_counters().drained_skips, 0);
  EXPECT_EQ(tier->cluster_counters().nodes_down, 0) << "a draining node is not a dead one";
  // What it holds still takes appends and answers retrievals.
  const int held = on_drained[0];
  ASSERT_OK(tier->AppendKV(SeqName(held), Batch(held, 40, 1, true)));
  EXPECT_EQ(StoredOn(names_[0])[SeqName(held)], 41);
  std::vector<float> q(kGroup * kHeadDim, 0.5f);
  client::RetrieveBatch rb;
  rb.layer = 1;
  rb.budget = 4;
  rb.entries.push_back({SeqName(held), 0, q, 0, 41});
  std::vector<client::Recalled> out;
  ASSERT_OK(tier->Retrieve(rb, &out));
  EXPECT_EQ(out[0].token_ids.size(), 4u);
  EXPECT_EQ(tier->ReplicasOf(SeqName(held))[0], names_[0]);
  ASSERT_NO_FATAL_FAILURE(ctl("undrain"));
  int back = 0;
  for (int s = 200; s < 230; ++s) {
    ASSERT_OK(tier->OpenSequence(SeqName(s), "m", Prompt(s, 40)).status());
    back += tier->ReplicasOf(SeqName(s))[0] == names_[0];
  }
  EXPECT_GT(back, 0);
}

TEST_F(ClusterTest, WrongNodeListIsRedirectedNeverMisplaced) {
  // The client misses node 2; the nodes know all three.
  const std::vector<std::string> stale = {names_[0], names_[1]};
  auto tier = Connect(stale, 1);
  ASSERT_NE(tier, nullptr);
  ASSERT_OK(tier->RegisterModel(Spec()));
  for (int s = 0; s < 30; ++s) {
    const std::vector<int32_t> prompt = Prompt(s, 40);
    ASSERT_OK(tier->OpenSequence(SeqName(s), "m", prompt).status());
    const std::string owner = placement::Owners(names_, placement::PrefixAffinityKey("t", "m", prompt), 1)[0];
    EXPECT_EQ(tier->ReplicasOf(SeqName(s)), std::vector<std::string>{owner}) << s;
  }
  EXPECT_GT(tier->cluster_counters().redirects, 0);
  // Nothing was left on a node that is not the owner.
  for (const std::string& node : names_) {
    for (const auto& [seq, stored] : StoredOn(node)) {
      EXPECT_EQ(tier->ReplicasOf(seq), std::vector<std::string>{node}) << seq;
    }
  }

  // Without following redirects the caller gets the error, naming the owners.
  auto strict = Connect(stale, 1, nullptr, /*follow=*/false);
  ASSERT_NE(strict, nullptr);
  ASSERT_OK(strict->RegisterModel(Spec()));
  int refused = 0;
  for (int s = 100; s < 130; ++s) {
    const std::vector<int32_t> prompt = Prompt(s, 40);
    absl::StatusOr<client::OpenResult> r = strict->OpenSequence(SeqName(s), "m", prompt);
    const std::string owner = placement::Owners(names_, placement::PrefixAffinityKey("t", "m", prompt), 1)[0];
    if (owner == names_[2]) {
      EXPECT_THAT(r, StatusIs(absl::StatusCode::kFailedPrecondition));
      EXPECT_THAT(std::string(r.status().message()), HasSubstr("owners=[" + owner + "]"));
      ++refused;
    } else {
      EXPECT_OK(r.status());
    }
  }
  EXPECT_GT(refused, 0);
}

// One decode-like run: R = 2, every step appends a token to every sequence and retrieves every
// layer; each answer is compared with an in-process LocalTier that saw the same calls.
class DecodeRun {
 public:
  DecodeRun(client::Tier* cluster, client::Tier* oracle) : cluster_(cluster), oracle_(oracle) {}

  void Open(int seq, int prompt_tokens) {
    const std::vector<int32_t> p = Prompt(seq, prompt_tokens);
    for (client::Tier* t : {cluster_, oracle_}) {
      ASSERT_OK_AND_ASSIGN(client::OpenResult r, t->OpenSequence(SeqName(seq), "m", p));
      ASSERT_EQ(r.stored_tokens, 0);
      ASSERT_OK(t->AppendKV(SeqName(seq), Batch(seq, 0, prompt_tokens, false)));
    }
    len_[seq] = prompt_tokens;
  }

  // Appends one decode token to every sequence, runs `between`, then retrieves every layer for
  // all of them.
  void Step(int step, const std::function<void()>& between = nullptr) {
    for (auto& [seq, len] : len_) {
      for (client::Tier* t : {cluster_, oracle_}) ASSERT_OK(t->AppendKV(SeqName(seq), Batch(seq, len, 1, true)));
      ++len;
    }
    if (between) between();
    for (int layer = 0; layer < kLayers; ++layer) {
      client::RetrieveBatch b;
      b.layer = layer;
      b.budget = 8;
      b.method = client::Method::kExact;
      std::vector<std::vector<float>> queries;
      queries.reserve(len_.size() * kKvHeads);  // the entries point into it: it must not move
      for (auto& [seq, len] : len_) {
        for (int h = 0; h < kKvHeads; ++h) {
          std::vector<float> q(kGroup * kHeadDim);
          for (size_t d = 0; d < q.size(); ++d) {
            q[d] = static_cast<float>(static_cast<int>(Mix(step * 977 + seq * 31 + h * 7 + d) % 200) - 100) / 50.0f;
          }
          queries.push_back(std::move(q));
          b.entries.push_back({SeqName(seq), h, queries.back(), 0, len});
        }
      }
      std::vector<client::Recalled> got, want;
      ASSERT_OK(cluster_->Retrieve(b, &got));
      ASSERT_OK(oracle_->Retrieve(b, &want));
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(got[i].token_ids, want[i].token_ids) << b.entries[i].sequence_id << " step " << step;
        const int seq = std::stoi(b.entries[i].sequence_id.substr(3));
        for (size_t j = 0; j < got[i].token_ids.size(); ++j) {
          const std::string row(reinterpret_cast<const char*>(got[i].rows) + j * 2 * kRow, 2 * kRow);
          const int t = got[i].token_ids[j];
          ASSERT_EQ(row, Row(seq, layer, false, b.entries[i].kv_head, t) + Row(seq, layer, true, b.entries[i].kv_head, t))
              << b.entries[i].sequence_id << " token " << t << " step " << step;
        }
      }
    }
  }

  // Reads back every acknowledged token of every sequence (budget = all of them) from the cluster.
  void CheckAllStored() {
    for (auto& [seq, len] : len_) {
      for (int layer = 0; layer < kLayers; ++layer) {
        client::RetrieveBatch b;
        b.layer = layer;
        b.budget = static_cast<int>(len);
        const std::vector<float> q(kGroup * kHeadDim, 0.5f);
        for (int h = 0; h < kKvHeads; ++h) b.entries.push_back({SeqName(seq), h, q, 0, len});
        std::vector<client::Recalled> got;
        ASSERT_OK(cluster_->Retrieve(b, &got));
        for (int h = 0; h < kKvHeads; ++h) {
          ASSERT_EQ(static_cast<int64_t>(got[h].token_ids.size()), len) << SeqName(seq);
          for (int64_t t = 0; t < len; ++t) {
            ASSERT_EQ(got[h].token_ids[t], t);
            const std::string row(reinterpret_cast<const char*>(got[h].rows) + t * 2 * kRow, 2 * kRow);
            ASSERT_EQ(row, Row(seq, layer, false, h, t) + Row(seq, layer, true, h, t)) << SeqName(seq) << " " << t;
          }
        }
      }
    }
  }

  const std::map<int, int64_t>& lengths() const { return len_; }

 private:
  client::Tier* cluster_;
  client::Tier* oracle_;
  std::map<int, int64_t> len_;  // sequence -> tokens acknowledged
};

TEST_F(ClusterTest, ReplicatedRunSurvivesNodeLossAndRestarts) {
  FakeClock clock;
  auto tier = Connect(names_, 2, &clock);
  ASSERT_NE(tier, nullptr);
  client::TierOptions oo;
  oo.tenant = "t";
  oo.recall_buffer_bytes = 1 << 20;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<client::Tier> oracle,
                       client::CreateLocalTier(kvstore::NodeOptions{int64_t{32} << 20, 16, 1}, oo));
  for (client::Tier* t : {static_cast<client::Tier*>(tier.get()), oracle.get()}) ASSERT_OK(t->RegisterModel(Spec()));
  DecodeRun run(tier.get(), oracle.get());
  for (int s = 0; s < 6; ++s) ASSERT_NO_FATAL_FAILURE(run.Open(s, 40));
  for (int s = 0; s < 6; ++s) ASSERT_EQ(tier->ReplicasOf(SeqName(s)).size(), 2u);

  int step = 0;
  for (; step < 6; ++step) ASSERT_NO_FATAL_FAILURE(run.Step(step));
  EXPECT_EQ(tier->cluster_counters().failovers, 0);

  // SIGKILL the node that serves the most sequences, between a step's appends and its reads.
  std::map<std::string, int> serving;
  for (int s = 0; s < 6; ++s) serving[tier->ReplicasOf(SeqName(s))[0]]++;
  const std::string victim =
      std::max_element(serving.begin(), serving.end(), [](auto& a, auto& b) { return a.second < b.second; })->first;
  const int v = IndexOf(victim);
  std::vector<int> had_victim;
  for (int s = 0; s < 6; ++s) {
    const auto r = tier->ReplicasOf(SeqName(s));
    if (std::find(r.begin(), r.end(), victim) != r.end()) had_victim.push_back(s);
  }
  ASSERT_NO_FATAL_FAILURE(run.Step(step++, [&] { KillNode(v); }));
  EXPECT_GT(tier->cluster_counters().failovers, 0);  // the reads moved to the other replicas
  for (; step < 12; ++step) ASSERT_NO_FATAL_FAILURE(run.Step(step));
  client::ClusterCounters c = tier->cluster_counters();
  EXPECT_GT(c.failovers, 0);
  EXPECT_GT(c.substitutions, 0);
  EXPECT_GT(c.refills, 0);  // the substitutes were filled from the surviving replicas
  for (int s : had_victim) EXPECT_THAT(tier->ReplicasOf(SeqName(s)), Not(Contains(victim))) << s;
  for (int s = 0; s < 6; ++s) EXPECT_EQ(tier->ReplicasOf(SeqName(s)).size(), 2u);

  // The victim comes back with its durable, now stale copies. It takes new sequences it owns;
  // the old ones stay on their substitutes, so its stale copies are never read.
  ASSERT_NO_FATAL_FAILURE(StartNode(v, "data"));
  clock.Advance(absl::Seconds(2));  // past down_interval: the client tries it again
  int added = 0;
  for (int s = 100; added < 2 && s < 400; ++s) {
    const auto owners = placement::Owners(names_, placement::PrefixAffinityKey("t", "m", Prompt(s, 40)), 2);
    if (std::find(owners.begin(), owners.end(), victim) == owners.end()) continue;
    ASSERT_NO_FATAL_FAILURE(run.Open(s, 40));
    EXPECT_THAT(tier->ReplicasOf(SeqName(s)), Contains(victim));
    ++added;
  }
  ASSERT_EQ(added, 2);
  for (; step < 18; ++step) ASSERT_NO_FATAL_FAILURE(run.Step(step));
  for (int s : had_victim) EXPECT_THAT(tier->ReplicasOf(SeqName(s)), Not(Contains(victim))) << s;

  // Another node is replaced behind the client's back (SIGKILL, restart with an empty disk, no
  // call in between): its replicas are detected, re-synchronised and refilled, or replaced.
  const std::vector<std::string> replicas0 = tier->ReplicasOf(SeqName(0));
  const std::string other = replicas0[0] == victim ? replicas0[1] : replicas0[0];
  const int o = IndexOf(other);
  const int64_t refills_before = tier->cluster_counters().refills;
  ASSERT_NO_FATAL_FAILURE(KillNode(o));
  ASSERT_NO_FATAL_FAILURE(StartNode(o, "fresh"));
  for (; step < 26; ++step) {
    ASSERT_NO_FATAL_FAILURE(run.Step(step));
    clock.Advance(absl::Milliseconds(300));
  }
  EXPECT_GT(tier->cluster_counters().refills, refills_before);
  ASSERT_NO_FATAL_FAILURE(run.CheckAllStored());
  for (const auto& [seq, len] : run.lengths()) {
    const auto r = tier->ReplicasOf(SeqName(seq));
    ASSERT_EQ(r.size(), 2u);
    // Every replica holds every acknowledged token.
    for (const std::string& node : r) EXPECT_EQ(StoredOn(node)[SeqName(seq)], len) << SeqName(seq) << " on " << node;
  }
  const client::ClusterCounters end = tier->cluster_counters();
  KV_LOG(INFO) << "failovers " << end.failovers << ", substitutions " << end.substitutions << ", refills "
               << end.refills << " (" << end.refilled_tokens << " tokens), nodes down " << end.nodes_down;
}

}  // namespace
}  // namespace kvrecall::testing
