#include "bench/soak_bench.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "bench/flag_map.h"
#include "bench/loopback_server.h"
#include "bench/percentile.h"
#include "client/tier.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/units.h"

namespace kvrecall::bench {
namespace {

absl::StatusOr<SoakBenchOptions> ParseOptions(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  SoakBenchOptions o;
  RETURN_IF_ERROR(f.Get("minutes", &o.minutes));
  RETURN_IF_ERROR(f.Get("clients", &o.clients));
  RETURN_IF_ERROR(f.Get("memory", &o.memory));
  RETURN_IF_ERROR(f.Get("rss_budget_mib", &o.rss_budget_mib));
  RETURN_IF_ERROR(f.Get("layers", &o.layers));
  RETURN_IF_ERROR(f.Get("kv_heads", &o.kv_heads));
  RETURN_IF_ERROR(f.Get("head_dim", &o.head_dim));
  RETURN_IF_ERROR(f.Get("tokens", &o.tokens));
  RETURN_IF_ERROR(f.Get("budget", &o.budget));
  RETURN_IF_ERROR(f.Get("keep_every", &o.keep_every));
  RETURN_IF_ERROR(f.Get("kept_per_client", &o.kept_per_client));
  RETURN_IF_ERROR(f.Get("sample_seconds", &o.sample_seconds));
  RETURN_IF_ERROR(f.Get("ucx_tls", &o.ucx_tls));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.CheckAllUsed());
  if (!(o.minutes > 0) || o.clients < 1 || o.clients > 256 || o.layers < 1 || o.kv_heads < 1 || o.head_dim < 2 ||
      o.head_dim % 2 != 0 || o.tokens < 1 || o.budget < 1 || o.budget > o.tokens || o.keep_every < 1 ||
      o.kept_per_client < 0 || !(o.sample_seconds > 0) || o.rss_budget_mib < 0) {
    return absl::InvalidArgumentError("need minutes > 0, 1..256 clients, positive sizes, budget <= tokens");
  }
  return o;
}

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The bf16 value written at (sequence, layer, token, kv-head, dim) for K (kv = 0) or V (kv = 1).
uint16_t ValueAt(uint64_t seq, int layer, int64_t token, int head, int dim, int kv) {
  const uint64_t h = Mix(seq ^ Mix((static_cast<uint64_t>(layer) << 48) ^ (static_cast<uint64_t>(token) << 16) ^
                                   (static_cast<uint64_t>(head) << 8) ^ (static_cast<uint64_t>(dim) << 1) ^
                                   static_cast<uint64_t>(kv)));
  return F32ToBf16(static_cast<float>(static_cast<int64_t>(h >> 40) - (int64_t{1} << 23)) / (1 << 23));
}

int64_t RssMib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) / 1024;
  }
  return -1;
}

struct Shared {
  std::mutex mu;
  std::vector<std::string> errors;  // the first few unexpected failures
  std::atomic<int64_t> ops{0}, sequences{0}, rows_checked{0}, mismatches{0}, evicted_reads{0}, failures{0};
  std::atomic<int64_t> backpressure{0};  // RESOURCE_EXHAUSTED answers (a full arena of leased blocks)
  std::map<std::string, std::vector<double>> latency_ms;  // per operation

  void Fail(const std::string& what) {
    failures.fetch_add(1);
    std::lock_guard<std::mutex> lock(mu);
    if (errors.size() < 10) errors.push_back(what);
  }
};

class Client {
 public:
  Client(int index, const SoakBenchOptions& o, const ModelSpec& spec, client::Tier* tier, Shared* shared)
      : index_(index), o_(o), spec_(spec), tier_(tier), shared_(shared), rng_(Mix(o.seed + index)) {}

  void Run(std::chrono::steady_clock::time_point until) {
    for (int64_t n = 0; std::chrono::steady_clock::now() < until && shared_->failures.load() == 0; ++n) {
      const std::string id = absl::StrCat("soak-c", index_, "-", n);
      const uint64_t seq = Mix(o_.seed ^ Mix(static_cast<uint64_t>(index_) << 32 | static_cast<uint64_t>(n)));
      switch (Write(id, seq)) {
        case Outcome::kFailed:
          return;
        case Outcome::kBackpressure:
          continue;
        case Outcome::kOk:
          break;
      }
      if (!Check(id, seq, /*kept=*/false)) return;
      const bool keep = o_.kept_per_client > 0 && n % o_.keep_every == 0;
      if (!Call("close", tier_->CloseSequence(id, /*drop=*/!keep))) return;
      if (keep) {
        kept_.push_back({id, seq});
        if (static_cast<int>(kept_.size()) > o_.kept_per_client) {
          // Forgotten: drop it so the node's contents stay bounded by what clients remember.
          const absl::Status s = tier_->CloseSequence(kept_.front().first, /*drop=*/true);
          if (!s.ok() && !absl::IsNotFound(s) && !Call("drop", s)) return;
          kept_.pop_front();
        }
      }
      if (!kept_.empty() && n % 3 == 0) {
        const auto& [old_id, old_seq] = kept_[rng_() % kept_.size()];
        if (!Check(old_id, old_seq, /*kept=*/true)) return;
      }
      shared_->sequences.fetch_add(1);
    }
  }

  std::map<std::string, std::vector<double>> latency_ms;

 private:
  enum class Outcome { kOk, kBackpressure, kFailed };

  // A full arena whose blocks are all pinned or leased answers RESOURCE_EXHAUSTED: the node's
  // admission control, not a fault. The client drops what it started, backs off and goes on.
  Outcome Backpressure(const std::string& id) {
    shared_->backpressure.fetch_add(1);
    const absl::Status s = tier_->CloseSequence(id, /*drop=*/true);
    if (!s.ok() && !absl::IsNotFound(s)) {
      shared_->Fail(absl::StrCat("client ", index_, " drop after backpressure: ", s.ToString()));
      return Outcome::kFailed;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng_() % 30));
    return Outcome::kBackpressure;
  }

  bool Call(const std::string& op, const absl::Status& s) {
    shared_->ops.fetch_add(1);
    if (s.ok()) return true;
    shared_->Fail(absl::StrCat("client ", index_, " ", op, ": ", s.ToString()));
    return false;
  }
  template <typename Fn>
  absl::Status Timed(const std::string& op, Fn fn) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status s = fn();
    latency_ms[op].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return s;
  }

  Outcome Write(const std::string& id, uint64_t seq) {
    std::vector<int32_t> tokens(static_cast<size_t>(o_.tokens));
    for (auto& t : tokens) t = static_cast<int32_t>(rng_() % static_cast<uint64_t>(spec_.vocab_size));
    absl::StatusOr<client::OpenResult> open;
    const absl::Status opened = Timed("open", [&] {
      open = tier_->OpenSequence(id, spec_.model_id, tokens);
      return open.status();
    });
    if (absl::IsResourceExhausted(opened)) return Backpressure(id);
    if (!Call("open", opened)) return Outcome::kFailed;
    client::AppendBatch b;
    b.token_start = 0;
    b.num_tokens = o_.tokens;
    const size_t row = spec_.row_bytes();
    for (int l = 0; l < spec_.num_layers; ++l) {
      std::string k(static_cast<size_t>(o_.tokens) * spec_.num_kv_heads * row, '\0'), v = k;
      auto* kp = reinterpret_cast<uint16_t*>(k.data());
      auto* vp = reinterpret_cast<uint16_t*>(v.data());
      for (int64_t t = 0; t < o_.tokens; ++t) {
        for (int h = 0; h < spec_.num_kv_heads; ++h) {
          for (int d = 0; d < spec_.head_dim; ++d) {
            const size_t at = (static_cast<size_t>(h) * o_.tokens + t) * spec_.head_dim + d;  // [head][token][dim]
            kp[at] = ValueAt(seq, l, t, h, d, 0);
            vp[at] = ValueAt(seq, l, t, h, d, 1);
          }
        }
      }
      b.keys.push_back(std::move(k));
      b.values.push_back(std::move(v));
    }
    const absl::Status appended = Timed("append", [&] { return tier_->AppendKV(id, b); });
    if (absl::IsResourceExhausted(appended)) return Backpressure(id);
    return Call("append", appended) ? Outcome::kOk : Outcome::kFailed;
  }

  // Retrieve from one random layer, every kv-head; every row that arrived must be what was written.
  bool Check(const std::string& id, uint64_t seq, bool kept) {
    client::RetrieveBatch batch;
    batch.layer = static_cast<int>(rng_() % static_cast<uint64_t>(spec_.num_layers));
    batch.budget = o_.budget;
    batch.method = client::Method::kExact;
    std::normal_distribution<float> normal;
    std::vector<float> q(static_cast<size_t>(spec_.num_q_heads) * spec_.head_dim);
    for (float& x : q) x = Bf16ToF32(F32ToBf16(normal(rng_)));
    const int group = spec_.group_size();
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      batch.entries.push_back({id, h, absl::MakeConstSpan(q.data() + static_cast<size_t>(h) * group * spec_.head_dim,
                                                          static_cast<size_t>(group) * spec_.head_dim),
                               0, o_.tokens});
    }
    std::vector<client::Recalled> out;
    const absl::Status s = Timed(kept ? "retrieve_kept" : "retrieve", [&] { return tier_->Retrieve(batch, &out); });
    if (kept && absl::IsNotFound(s)) {
      shared_->ops.fetch_add(1);
      shared_->evicted_reads.fetch_add(1);
      return true;
    }
    if (absl::IsResourceExhausted(s)) {  // no room to reload its evicted blocks now
      shared_->ops.fetch_add(1);
      shared_->backpressure.fetch_add(1);
      return true;
    }
    if (!Call(kept ? "retrieve_kept" : "retrieve", s)) return false;
    const size_t row = spec_.row_bytes();
    int64_t bad = 0, checked = 0;
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      const client::Recalled& r = out[static_cast<size_t>(h)];
      if (static_cast<int>(r.token_ids.size()) != o_.budget || r.fill_slots.size() != r.token_ids.size()) ++bad;
      // Without a slot epoch every selected row is sent, row j for token_ids[j].
      for (size_t j = 0; j < r.token_ids.size() && j < r.fill_slots.size(); ++j) {
        const auto* k = reinterpret_cast<const uint16_t*>(r.rows + j * 2 * row);
        const auto* v = reinterpret_cast<const uint16_t*>(r.rows + j * 2 * row + row);
        for (int d = 0; d < spec_.head_dim; ++d) {
          if (k[d] != ValueAt(seq, batch.layer, r.token_ids[j], h, d, 0) ||
              v[d] != ValueAt(seq, batch.layer, r.token_ids[j], h, d, 1)) {
            ++bad;
            break;
          }
        }
        ++checked;
      }
    }
    shared_->rows_checked.fetch_add(checked);
    if (bad > 0) {
      shared_->mismatches.fetch_add(bad);
      shared_->Fail(absl::StrCat("client ", index_, ": ", bad, " rows of '", id, "' layer ", batch.layer,
                                 " differ from what was written"));
      return false;
    }
    return true;
  }

  const int index_;
  const SoakBenchOptions& o_;
  const ModelSpec& spec_;
  client::Tier* const tier_;
  Shared* const shared_;
  std::mt19937_64 rng_;
  std::deque<std::pair<std::string, uint64_t>> kept_;
};

}  // namespace

absl::StatusOr<nlohmann::json> RunSoakBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(const SoakBenchOptions o, ParseOptions(args));
  ASSIGN_OR_RETURN(const int64_t memory, ParseBytes(o.memory));
  const int64_t rss_budget_mib = o.rss_budget_mib > 0 ? o.rss_budget_mib : (memory >> 20) + 768;

  ModelSpec spec;
  spec.model_id = "soak";
  spec.num_layers = o.layers;
  spec.num_q_heads = 2 * o.kv_heads;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim;
  spec.kv_dtype = DType::kBF16;
  spec.vocab_size = 32000;

  // The node: capped memory, a spill directory (so eviction is on) and a short lease, so that
  // closed sequences are evicted within the run.
  const std::string spill = absl::StrCat(std::filesystem::temp_directory_path().string(), "/kvrecall-soak-", ::getpid());
  std::filesystem::remove_all(spill);
  std::filesystem::create_directories(spill);
  struct RemoveDir {
    std::string dir;
    ~RemoveDir() { std::filesystem::remove_all(dir); }
  } remove_spill{spill};
  kvstore::NodeOptions node_options;
  node_options.memory_bytes = memory;
  node_options.data_dir = spill;
  node_options.lease = absl::Seconds(1);
  node_options.try_hugepages = false;
  ASSIGN_OR_RETURN(std::unique_ptr<LoopbackServer> srv, StartLoopbackServer(node_options, o.ucx_tls));

  Shared shared;
  std::vector<std::unique_ptr<client::Tier>> tiers;
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < o.clients; ++i) {
    client::RemoteTierOptions remote;
    remote.target = srv->target;
    remote.ucx_tls = o.ucx_tls;
    client::TierOptions to;
    to.worker_id = absl::StrCat("soak-worker-", i);
    to.recall_buffer_bytes = client::RecallBufferBytes(
        o.kv_heads, o.budget, 2 * spec.row_bytes(), 1, int64_t{spec.group_size()} * spec.head_dim);
    ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> tier, client::CreateRemoteTier(remote, to));
    RETURN_IF_ERROR(tier->RegisterModel(spec));  // idempotent; each client learns the spec
    clients.push_back(std::make_unique<Client>(i, o, spec, tier.get(), &shared));
    tiers.push_back(std::move(tier));
  }

  KV_LOG(INFO) << "soak: " << o.clients << " clients for " << o.minutes << " min against a node of " << o.memory
               << " (RSS budget " << rss_budget_mib << " MiB)";
  const auto start = std::chrono::steady_clock::now();
  const auto until = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(o.minutes * 60));
  std::vector<std::thread> threads;
  for (auto& c : clients) threads.emplace_back([&c, until] { c->Run(until); });
  std::vector<int64_t> rss;
  int64_t rss_max = 0;
  const auto sample = std::chrono::duration<double>(o.sample_seconds);
  auto next_log = start + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < until && shared.failures.load() == 0) {
    std::this_thread::sleep_for(std::min<std::chrono::duration<double>>(
        sample, std::chrono::duration<double>(until - std::chrono::steady_clock::now())));
    rss.push_back(RssMib());
    rss_max = std::max(rss_max, rss.back());
    if (rss.back() > rss_budget_mib) {
      shared.Fail(absl::StrCat("RSS ", rss.back(), " MiB above the budget of ", rss_budget_mib, " MiB"));
    }
    if (std::chrono::steady_clock::now() >= next_log) {
      next_log += std::chrono::seconds(10);
      KV_LOG(INFO) << "soak: " << shared.sequences.load() << " sequences, " << shared.ops.load() << " ops, RSS "
                   << rss.back() << " MiB, " << shared.evicted_reads.load() << " evicted reads, "
                   << shared.backpressure.load() << " RESOURCE_EXHAUSTED";
    }
  }
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  nlohmann::json j;
  j["bench"] = "soak";
  j["seconds"] = seconds;
  j["clients"] = o.clients;
  j["memory"] = o.memory;
  j["model"] = {{"layers", o.layers}, {"kv_heads", o.kv_heads}, {"head_dim", o.head_dim}, {"tokens", o.tokens}};
  j["sequences"] = shared.sequences.load();
  j["ops"] = shared.ops.load();
  j["ops_per_s"] = static_cast<double>(shared.ops.load()) / seconds;
  j["rows_checked"] = shared.rows_checked.load();
  j["mismatches"] = shared.mismatches.load();
  j["evicted_reads"] = shared.evicted_reads.load();
  j["backpressure"] = shared.backpressure.load();
  j["errors"] = shared.errors;
  std::map<std::string, std::vector<double>> latency;
  for (const auto& c : clients) {
    for (const auto& [op, v] : c->latency_ms) latency[op].insert(latency[op].end(), v.begin(), v.end());
  }
  for (const auto& [op, v] : latency) {
    j["latency_ms"][op] = {{"count", v.size()}, {"p50", Percentile(v, 0.5)}, {"p99", Percentile(v, 0.99)}};
  }
  j["rss_mib"] = rss;
  j["rss_max_mib"] = rss_max;
  j["rss_budget_mib"] = rss_budget_mib;
  ASSIGN_OR_RETURN(kvstore::NodeStats stats, tiers[0]->Stats(false));
  j["node"] = {{"stored_bytes", stats.stored_bytes}, {"sequences", stats.num_sequences},
               {"evictions", stats.evictions}, {"reloads", stats.reloads}, {"spilled_blocks", stats.spilled_blocks}};
  const bool passed = shared.failures.load() == 0 && shared.mismatches.load() == 0;
  j["passed"] = passed;
  if (!passed) {
    std::string why;
    for (const auto& e : shared.errors) absl::StrAppend(&why, "\n  ", e);
    return absl::InternalError(absl::StrCat("soak failed after ", seconds, " s (", shared.ops.load(), " ops):", why,
                                            "\n", j.dump()));
  }
  return j;
}

}  // namespace kvrecall::bench
