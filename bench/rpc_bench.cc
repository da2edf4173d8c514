#include "bench/rpc_bench.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>

#include "absl/strings/str_cat.h"
#include "bench/flag_map.h"
#include "bench/loopback_server.h"
#include "bench/percentile.h"
#include "client/tier.h"
#include "common/clock.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/subprocess.h"
#include "indexer/index.h"
#include "kvstore/node.h"

namespace kvrecall::bench {
namespace {

absl::StatusOr<RpcBenchOptions> ParseOptions(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(FlagMap f, FlagMap::Parse(args));
  RpcBenchOptions o;
  RETURN_IF_ERROR(f.Get("sequences", &o.sequences));
  RETURN_IF_ERROR(f.Get("kv_heads", &o.kv_heads));
  RETURN_IF_ERROR(f.Get("group", &o.group));
  RETURN_IF_ERROR(f.Get("head_dim", &o.head_dim));
  RETURN_IF_ERROR(f.Get("tokens", &o.tokens));
  RETURN_IF_ERROR(f.Get("budget", &o.budget));
  RETURN_IF_ERROR(f.Get("method", &o.method));
  RETURN_IF_ERROR(f.Get("sinks", &o.sinks));
  RETURN_IF_ERROR(f.Get("window", &o.window));
  RETURN_IF_ERROR(f.Get("iterations", &o.iterations));
  RETURN_IF_ERROR(f.Get("warmup", &o.warmup));
  RETURN_IF_ERROR(f.Get("ucx_tls", &o.ucx_tls));
  RETURN_IF_ERROR(f.Get("seed", &o.seed));
  RETURN_IF_ERROR(f.Get("delta", &o.delta));
  RETURN_IF_ERROR(f.Get("drift", &o.drift));
  RETURN_IF_ERROR(f.Get("bf16_queries", &o.bf16_queries));
  RETURN_IF_ERROR(f.Get("ctkvr_min_similarity", &o.ctkvr_min_similarity));
  RETURN_IF_ERROR(f.Get("ctkvr_copy_list_rows", &o.ctkvr_copy_list_rows));
  RETURN_IF_ERROR(f.Get("threads", &o.threads));
  RETURN_IF_ERROR(f.Get("search_spin_us", &o.search_spin_us));
  RETURN_IF_ERROR(f.Get("reply_poll_us", &o.reply_poll_us));
  RETURN_IF_ERROR(f.Get("queries_in_region", &o.queries_in_region));
  RETURN_IF_ERROR(f.Get("server", &o.server));
  RETURN_IF_ERROR(f.Get("server_binary", &o.server_binary));
  RETURN_IF_ERROR(f.CheckAllUsed());
  if (o.sequences < 1 || o.kv_heads < 1 || o.group < 1 || o.head_dim < 2 || o.head_dim % 2 ||
      o.iterations < 1 || o.warmup < 0 || o.search_spin_us < 0 || o.reply_poll_us < 0 ||
      o.budget < 1 || o.sinks < 0 || o.window < 1 || o.tokens <= o.sinks + o.window + 64 ||
      !(o.drift >= 0)) {
    return absl::InvalidArgumentError("need positive sizes, drift >= 0 and tokens > sinks + window + 64");
  }
  if (o.method != "exact" && o.method != "ctkvr" && o.method != "cluster") {
    return absl::InvalidArgumentError("--method must be exact, ctkvr or cluster");
  }
  if (o.server != "process" && o.server != "inprocess") {
    return absl::InvalidArgumentError("--server must be process or inprocess");
  }
  return o;
}

// Stores `batch` (one layer) in a node of this process without streaming it through gRPC.
absl::Status FillDirectly(kvstore::Node& node, const std::string& sequence_id,
                          const client::AppendBatch& batch) {
  ASSIGN_OR_RETURN(std::shared_ptr<kvstore::Sequence> seq,
                   node.FindSequence("default", sequence_id));
  RETURN_IF_ERROR(seq->BeginAppend());
  auto bytes = [](const std::string& b) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  };
  if (absl::Status st = seq->AppendChunk(0, batch.token_start, batch.num_tokens,
                                         bytes(batch.keys[0]), bytes(batch.values[0]));
      !st.ok()) {
    seq->AbortAppend();
    return st;
  }
  return seq->CommitAppend().status();
}

// The directory this program was started from ("" when /proc cannot say).
std::string OwnDirectory() {
  char path[4096];
  const ssize_t n = ::readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n <= 0) return "";
  const std::string exe(path, static_cast<size_t>(n));
  const size_t slash = exe.rfind('/');
  return slash == std::string::npos ? "" : exe.substr(0, slash);
}

// A kvrecall-server child on 127.0.0.1 with the node options the in-process tier has; its port
// file and log live in a directory of its own, removed when the bench stops it, kept when it
// exited by itself after it started serving (a crash).
class ServerChild {
 public:
  static absl::StatusOr<std::unique_ptr<ServerChild>> Start(const RpcBenchOptions& o,
                                                            const kvstore::NodeOptions& node) {
    std::string binary = o.server_binary;
    if (binary.empty()) binary = OwnDirectory() + "/kvrecall-server";
    if (::access(binary.c_str(), X_OK) != 0) {
      return absl::NotFoundError(
          absl::StrCat("no kvrecall-server at ", binary, " (--server_binary)"));
    }
    char dir[] = "/tmp/kvrecall-rpc-bench-XXXXXX";
    if (::mkdtemp(dir) == nullptr)
      return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
    auto c = std::unique_ptr<ServerChild>(new ServerChild(dir));
    std::vector<std::string> argv = {
        binary,
        "--listen=127.0.0.1:0",
        "--metrics_port=-1",
        "--port_file=" + c->port_file(),
        absl::StrCat("--memory=", node.memory_bytes),
        absl::StrCat("--search_threads=", node.search_threads),
        absl::StrCat("--search_spin_us=", o.search_spin_us),
        absl::StrCat("--ctkvr_min_similarity=", o.ctkvr_min_similarity),
        std::string("--ctkvr_copy_list_rows=") + (o.ctkvr_copy_list_rows ? "true" : "false")};
    if (!o.ucx_tls.empty()) argv.push_back("--ucx_tls=" + o.ucx_tls);
    ASSIGN_OR_RETURN(Subprocess p, Subprocess::Start(argv, c->log()));
    c->process_.emplace(std::move(p));
    ASSIGN_OR_RETURN(std::vector<int> ports,
                     WaitForPorts(*c->process_, c->port_file(), 2, c->log(), absl::Seconds(60)));
    c->target_ = absl::StrCat("127.0.0.1:", ports[0]);
    c->serving_ = true;
    KV_LOG(INFO) << "rpc bench: kvrecall-server pid " << c->process_->pid() << " on " << c->target_
                 << ", log " << c->log();
    return c;
  }
  ~ServerChild() {
    if (serving_ && !process_->running()) {
      // It exited while the bench used it: its log says why. (One that never served had its
      // log's text in Start's error.)
      KV_LOG(WARNING) << "rpc bench: kvrecall-server exited early; its log is kept at " << log();
      return;
    }
    if (process_.has_value()) process_->Stop();
    std::remove(port_file().c_str());
    std::remove(log().c_str());
    ::rmdir(dir_.c_str());
  }
  const std::string& target() const { return target_; }

 private:
  explicit ServerChild(std::string dir) : dir_(std::move(dir)) {}
  std::string port_file() const { return dir_ + "/port"; }
  std::string log() const { return dir_ + "/server.log"; }
  std::string dir_;
  std::optional<Subprocess> process_;
  bool serving_ = false;  // it wrote its ports
  std::string target_;
};

}  // namespace

absl::StatusOr<nlohmann::json> RunRpcBench(const std::vector<std::string>& args) {
  ASSIGN_OR_RETURN(RpcBenchOptions o, ParseOptions(args));
  const kvstore::Method method = o.method == "exact"   ? kvstore::Method::kExact
                                 : o.method == "ctkvr" ? kvstore::Method::kCtkvr
                                                       : kvstore::Method::kCluster;
  ModelSpec spec;
  spec.model_id = "rpc-bench";
  spec.num_layers = 1;  // one sparse layer: every layer's Retrieve is the same call
  spec.num_q_heads = o.kv_heads * o.group;
  spec.num_kv_heads = o.kv_heads;
  spec.head_dim = o.head_dim;
  spec.kv_dtype = DType::kBF16;
  spec.vocab_size = 1 << 20;
  const int64_t row = static_cast<int64_t>(spec.row_bytes());
  const int64_t seq_bytes = 2 * row * o.kv_heads * o.tokens;
  kvstore::NodeOptions node_options;
  RETURN_IF_ERROR(
      indexer::ApplyMinSimilarityFlag(o.ctkvr_min_similarity, &node_options.index_options.ctkvr));
  node_options.index_options.ctkvr.copy_list_rows = o.ctkvr_copy_list_rows;
  node_options.search_threads = o.threads;
  node_options.search_spin = absl::Microseconds(o.search_spin_us);
  // K/V, each sequence's index at its largest (ctkvr's bound; cluster's is smaller at these
  // sizes), and a margin.
  const int64_t index_bytes = kvstore::CtkvrIndexReserveBytes(
      node_options.index_options.ctkvr, o.kv_heads, o.group, o.head_dim, spec.kv_dtype);
  node_options.memory_bytes = (seq_bytes + index_bytes) * o.sequences + (int64_t{256} << 20);
  const int64_t entries = static_cast<int64_t>(o.sequences) * o.kv_heads;
  const int64_t call_bytes = entries * o.budget * 2 * row;

  // The server: a Node with UCX behind a gRPC service on loopback, in a child process or here.
  std::unique_ptr<ServerChild> child;
  std::unique_ptr<LoopbackServer> in_process;
  if (o.server == "process") {
    ASSIGN_OR_RETURN(child, ServerChild::Start(o, node_options));
  } else {
    ASSIGN_OR_RETURN(in_process, StartLoopbackServer(node_options, o.ucx_tls));
  }
  const std::string target = child != nullptr ? child->target() : in_process->target;

  client::TierOptions tier_options;
  tier_options.recall_buffer_bytes =
      client::RecallBufferBytes(entries, o.budget, static_cast<size_t>(2 * row), 1,
                                o.queries_in_region ? int64_t{o.group} * o.head_dim : 0);
  client::RemoteTierOptions remote_options{target, "ucx", o.ucx_tls};
  remote_options.reply_poll = absl::Microseconds(o.reply_poll_us);
  ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> remote,
                   client::CreateRemoteTier(remote_options, tier_options));
  ASSIGN_OR_RETURN(std::unique_ptr<client::Tier> local, client::CreateLocalTier(node_options, tier_options));
  RETURN_IF_ERROR(remote->RegisterModel(spec));
  RETURN_IF_ERROR(local->RegisterModel(spec));

  // Data: the same random bf16 K/V for every sequence (distinct token ids, so nothing is shared).
  KV_LOG(INFO) << "rpc bench: " << o.sequences << " sequences x " << o.tokens << " tokens, "
               << o.kv_heads << " kv-heads, head_dim " << o.head_dim << " (" << (2 * seq_bytes >> 20) * o.sequences
               << " MiB in two tiers)";
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal;
  client::AppendBatch batch;
  batch.token_start = 0;
  batch.num_tokens = o.tokens;
  batch.keys.assign(1, std::string(static_cast<size_t>(seq_bytes / 2), '\0'));
  batch.values.assign(1, std::string(static_cast<size_t>(seq_bytes / 2), '\0'));
  for (auto* buf : {&batch.keys[0], &batch.values[0]}) {
    auto* p = reinterpret_cast<uint16_t*>(buf->data());
    for (size_t i = 0; i < buf->size() / 2; ++i) p[i] = F32ToBf16(normal(rng));
  }
  std::vector<float> prompt_queries(static_cast<size_t>(64) * spec.num_q_heads * o.head_dim);
  for (float& x : prompt_queries) x = normal(rng);
  std::vector<std::string> ids;
  const absl::Time t_setup = absl::Now();
  for (int s = 0; s < o.sequences; ++s) {
    ids.push_back(absl::StrCat("rpc-", s));
    std::vector<int32_t> tokens(static_cast<size_t>(o.tokens));
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % spec.vocab_size);
    RETURN_IF_ERROR(remote->OpenSequence(ids.back(), spec.model_id, tokens).status());
    RETURN_IF_ERROR(local->OpenSequence(ids.back(), spec.model_id, tokens).status());
    RETURN_IF_ERROR(local->AppendKV(ids.back(), batch));
    if (in_process == nullptr) {
      RETURN_IF_ERROR(remote->AppendKV(ids.back(), batch));
    } else {
      RETURN_IF_ERROR(FillDirectly(*in_process->node, ids.back(), batch));
    }
    if (method != kvstore::Method::kExact) {
      kvstore::BuildIndexArgs b;
      b.method = method;
      b.first_layer = 0;
      b.token_begin = o.sinks;
      b.num_queries = 64;
      if (method == kvstore::Method::kCtkvr) b.layer_queries = {prompt_queries};
      RETURN_IF_ERROR(remote->BuildIndex(ids.back(), b).status());
      RETURN_IF_ERROR(local->BuildIndex(ids.back(), b).status());
    }
  }
  const double setup_s = absl::ToDoubleSeconds(absl::Now() - t_setup);

  // One decode step's batch: every (sequence, kv-head).
  std::vector<float> queries(static_cast<size_t>(entries) * o.group * o.head_dim);
  client::RetrieveBatch rb{0, o.budget, method, {}};
  for (int64_t e = 0; e < entries; ++e) {
    float* q = queries.data() + e * o.group * o.head_dim;
    // Queries near the prompt queries' direction, as a decode step's are near the prompt's last.
    const float* pq = prompt_queries.data() + (63 * spec.num_q_heads + (e % o.kv_heads) * o.group) * o.head_dim;
    for (int i = 0; i < o.group * o.head_dim; ++i) q[i] = pq[i] + 0.3f * normal(rng);
    rb.entries.push_back({ids[e / o.kv_heads], static_cast<int>(e % o.kv_heads),
                          absl::MakeConstSpan(q, static_cast<size_t>(o.group) * o.head_dim), o.sinks,
                          o.tokens - o.window});
  }
  if (o.delta) {
    for (auto& e : rb.entries) e.slot_epoch = 1;
  }
  // The RemoteTier's batch: the same, its queries written where the tier reads them
  // (Tier::QueryStaging, when its region has room), as a worker widens its bf16 queries there.
  client::RetrieveBatch rb_remote = rb;
  const absl::Span<float> staging =
      remote->QueryStaging(spec, rb.staging_area, rb.entries.size(), rb.budget, rb.successors);
  const bool in_place = staging.size() == queries.size();
  if (in_place) {
    for (size_t e = 0; e < rb_remote.entries.size(); ++e) {
      rb_remote.entries[e].queries =
          absl::MakeConstSpan(staging.data() + e * static_cast<size_t>(o.group) * o.head_dim,
                              static_cast<size_t>(o.group) * o.head_dim);
    }
  }
  // Each tier's answers land in its own slot caches, as a worker's would: [entry][budget] pairs.
  const size_t pair = static_cast<size_t>(2 * row);
  auto apply = [&](const std::vector<client::Recalled>& out, std::vector<std::vector<uint8_t>>* caches) {
    caches->resize(out.size());
    for (size_t e = 0; e < out.size(); ++e) {
      (*caches)[e].resize(static_cast<size_t>(o.budget) * pair);
      client::internal::ApplyFills(out[e], pair, (*caches)[e].data());
    }
  };
  std::vector<std::vector<uint8_t>> local_caches, remote_caches;
  std::vector<client::Recalled> out_local, out_remote;
  std::vector<double> t_local, t_remote, t_node, t_wait, t_service, t_search, t_local_node,
      t_local_search;
  std::vector<double> t_local_stream, t_local_read, t_stream, t_read;
  int64_t rows_selected = 0, rows_sent = 0;
  indexer::CtkvrCounters ctkvr_before;
  for (int it = 0; it < o.warmup + o.iterations; ++it) {
    if (it == o.warmup) ctkvr_before = indexer::ReadCtkvrCounters();
    // Decode-like drift: each step's queries move a little from the last step's.
    if (it > 0 && o.drift > 0) {
      for (float& x : queries) x += o.drift * normal(rng);
    }
    if (o.bf16_queries) {
      for (float& x : queries) x = Bf16ToF32(F32ToBf16(x));
    }
    if (in_place) std::copy(queries.begin(), queries.end(), staging.begin());
    const client::TierCounters before = local->counters();
    const client::TierCounters remote_before = remote->counters();
    // Alternate which tier goes first, so that neither always runs on the caches (and clock
    // state) the other left behind.
    double local_us = 0, remote_us = 0;
    auto timed = [](client::Tier* tier, const client::RetrieveBatch& b, std::vector<client::Recalled>* out,
                    double* us) -> absl::Status {
      const auto start = std::chrono::steady_clock::now();
      RETURN_IF_ERROR(tier->Retrieve(b, out));
      *us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      return absl::OkStatus();
    };
    if (it % 2 == 0) {
      RETURN_IF_ERROR(timed(local.get(), rb, &out_local, &local_us));
      RETURN_IF_ERROR(timed(remote.get(), rb_remote, &out_remote, &remote_us));
    } else {
      RETURN_IF_ERROR(timed(remote.get(), rb_remote, &out_remote, &remote_us));
      RETURN_IF_ERROR(timed(local.get(), rb, &out_local, &local_us));
    }
    apply(out_local, &local_caches);
    apply(out_remote, &remote_caches);
    if (it < o.warmup) continue;
    t_local.push_back(local_us);
    t_remote.push_back(remote_us);
    t_node.push_back(static_cast<double>(remote->counters().tier_node_micros - remote_before.tier_node_micros));
    t_wait.push_back(static_cast<double>(remote->counters().tier_wait_micros - remote_before.tier_wait_micros));
    t_service.push_back(static_cast<double>(remote->counters().tier_service_micros -
                                            remote_before.tier_service_micros));
    t_search.push_back(static_cast<double>(remote->counters().tier_search_micros - remote_before.tier_search_micros));
    t_stream.push_back(static_cast<double>(remote->counters().tier_stream_micros -
                                           remote_before.tier_stream_micros));
    t_read.push_back(
        static_cast<double>(remote->counters().tier_read_micros - remote_before.tier_read_micros));
    t_local_node.push_back(static_cast<double>(local->counters().tier_node_micros - before.tier_node_micros));
    t_local_search.push_back(static_cast<double>(local->counters().tier_search_micros - before.tier_search_micros));
    t_local_stream.push_back(
        static_cast<double>(local->counters().tier_stream_micros - before.tier_stream_micros));
    t_local_read.push_back(
        static_cast<double>(local->counters().tier_read_micros - before.tier_read_micros));
    rows_selected += local->counters().rows_selected - before.rows_selected;
    rows_sent += local->counters().rows_received - before.rows_received;
  }
  // Both tiers must have answered the same thing, and both workers' slots must hold its rows.
  for (int64_t e = 0; e < entries; ++e) {
    const client::Recalled& a = out_local[e];
    const client::Recalled& b = out_remote[e];
    if (a.token_ids != b.token_ids) return absl::InternalError(absl::StrCat("entry ", e, ": selections differ"));
    for (size_t j = 0; j < a.token_ids.size(); ++j) {
      if (std::memcmp(local_caches[e].data() + static_cast<size_t>(a.slots[j]) * pair,
                      remote_caches[e].data() + static_cast<size_t>(b.slots[j]) * pair, pair) != 0) {
        return absl::InternalError(absl::StrCat("entry ", e, " token ", a.token_ids[j], ": rows differ"));
      }
    }
  }

  const double rpc50 = Percentile(t_remote, 0.5), in50 = Percentile(t_local, 0.5);
  const indexer::CtkvrCounters ctkvr_after = indexer::ReadCtkvrCounters();
  nlohmann::json j;
  j["bench"] = "rpc";
  j["method"] = o.method;
  j["transport"] = absl::StrCat("ucx", o.ucx_tls.empty() ? "" : ":" + o.ucx_tls);
  j["sequences"] = o.sequences;
  j["kv_heads"] = o.kv_heads;
  j["group"] = o.group;
  j["head_dim"] = o.head_dim;
  j["tokens"] = o.tokens;
  j["budget"] = o.budget;
  j["entries"] = entries;
  j["iterations"] = o.iterations;
  j["bytes_per_call"] = call_bytes;  // all selected rows
  j["delta"] = o.delta;
  j["drift"] = o.drift;
  j["bf16_queries"] = o.bf16_queries;
  j["rows_selected_per_call"] = static_cast<double>(rows_selected) / o.iterations;
  j["rows_sent_per_call"] = static_cast<double>(rows_sent) / o.iterations;
  j["sent_fraction"] = rows_selected > 0 ? static_cast<double>(rows_sent) / static_cast<double>(rows_selected) : 0.0;
  j["setup_seconds"] = setup_s;
  // Share of the timed ctkvr searches (both tiers) whose query was novel and scored exactly.
  j["ctkvr_novel_fraction"] = ctkvr_after.Since(ctkvr_before).novel_fraction();
  j["ctkvr_min_similarity"] = o.ctkvr_min_similarity;
  j["ctkvr_copy_list_rows"] = o.ctkvr_copy_list_rows;
  j["threads"] = o.threads;
  j["search_spin_us"] = o.search_spin_us;
  j["reply_poll_us"] = o.reply_poll_us;
  j["queries_in_region"] = o.queries_in_region;
  // The RemoteTier's queries were written in its region by the bench (QueryStaging), not copied
  // there by the tier.
  j["queries_in_place"] = in_place;
  j["server"] = o.server;
  j["rpc_us_p50"] = rpc50;
  j["rpc_us_p99"] = Percentile(t_remote, 0.99);
  // The server node's own time inside the RPC (search, slot plans, puts): rpc - node is what
  // gRPC, protobuf and the handler hop cost.
  j["node_us_p50"] = Percentile(t_node, 0.5);
  // The client's wait for the reply (gRPC round trip, node time included); rpc - wait is the
  // RemoteTier's own work (building the request, unpacking and checking the results).
  j["wait_us_p50"] = Percentile(t_wait, 0.5);
  // Of the wait, the server's own time (handler start to reply, node time included): wait -
  // service is the wire and gRPC; service - node the hop to a service thread and the handler.
  j["service_us_p50"] = Percentile(t_service, 0.5);
  // The same split of the node's time in both tiers: all of it, and its index search.
  j["node_search_us_p50"] = Percentile(t_search, 0.5);
  j["node_stream_us_p50"] = Percentile(t_stream, 0.5);
  j["node_read_us_p50"] = Percentile(t_read, 0.5);
  j["inprocess_node_us_p50"] = Percentile(t_local_node, 0.5);
  j["inprocess_search_us_p50"] = Percentile(t_local_search, 0.5);
  j["inprocess_stream_us_p50"] = Percentile(t_local_stream, 0.5);
  j["inprocess_read_us_p50"] = Percentile(t_local_read, 0.5);
  j["inprocess_us_p50"] = in50;
  j["inprocess_us_p99"] = Percentile(t_local, 0.99);
  j["overhead_ratio"] = rpc50 / in50 - 1.0;
  j["entries_per_s"] = static_cast<double>(entries) / (rpc50 * 1e-6);
  j["inprocess_entries_per_s"] = static_cast<double>(entries) / (in50 * 1e-6);
  j["note"] =
      "server = a kvrecall-server child process (process) or inside this process (inprocess), on "
      "the same "
      "cores either way; in-process = LocalTier (same Node code, rows by "
      "memcpy); rpc = RemoteTier over gRPC with rows put over UCX; with delta (default) each tier "
      "sends only "
      "the rows its worker's slot caches lack, while the queries drift by `drift` per step";
  return j;
}

}  // namespace kvrecall::bench
