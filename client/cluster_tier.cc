// ClusterTier: placement, replication and failover over one RemoteTier per node. The contract
// is in cluster_tier.h; this file keeps the bookkeeping.
#include "client/cluster_tier.h"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/channel.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "grpcpp/grpcpp.h"
#include "proto/convert.h"
#include "proto/kvrecall/v1/kvrecall.grpc.pb.h"

namespace kvrecall::client {
namespace {

namespace v1 = ::kvrecall::v1;
using proto::FromGrpc;

constexpr size_t kRefillChunkBytes = 16 << 20;  // KV bytes (all layers) per refill AppendKV

bool NodeGone(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}
// The node answered, but no longer knows the sequence or this worker: it restarted (or dropped
// state) behind our back; its connection is rebuilt and replicas on it re-synchronised.
bool NodeForgot(const absl::Status& s) { return absl::IsNotFound(s) || absl::IsFailedPrecondition(s); }

Counter* FailoverMetric() {
  static Counter* c = Metrics::Global().GetCounter(
      "kvrecall_client_failovers_total", "Retrieve entries a cluster client moved to another replica");
  return c;
}
Counter* RefillMetric() {
  static Counter* c = Metrics::Global().GetCounter("kvrecall_client_refills_total",
                                                   "Replicas a cluster client refilled from another replica");
  return c;
}

absl::StatusOr<std::vector<std::string>> ResolveDns(const std::string& name_port) {
  const size_t colon = name_port.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("'", name_port, "' has no :port"));
  const std::string host = name_port.substr(0, colon), port = name_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", host, ": ", gai_strerror(rc)));
  }
  std::set<std::string> out;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char buf[NI_MAXHOST];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, buf, sizeof(buf), nullptr, 0, NI_NUMERICHOST) != 0) continue;
    out.insert(a->ai_family == AF_INET6 ? absl::StrCat("[", buf, "]:", port) : absl::StrCat(buf, ":", port));
  }
  freeaddrinfo(res);
  if (out.empty()) return absl::UnavailableError(absl::StrCat(host, " resolved to no address"));
  return std::vector<std::string>(out.begin(), out.end());
}

// Tokens [off, num_tokens) of `batch`, which holds KV of a `spec` model.
AppendBatch Slice(const AppendBatch& batch, const ModelSpec& spec, int64_t off) {
  AppendBatch out;
  out.token_start = batch.token_start + off;
  out.num_tokens = batch.num_tokens - off;
  if (!batch.token_ids.empty()) out.token_ids.assign(batch.token_ids.begin() + off, batch.token_ids.end());
  const size_t row = spec.row_bytes();
  out.keys.resize(batch.keys.size());
  out.values.resize(batch.values.size());
  for (size_t l = 0; l < batch.keys.size(); ++l) {
    for (int h = 0; h < spec.num_kv_heads; ++h) {
      const size_t from = static_cast<size_t>(h * batch.num_tokens + off) * row;
      const size_t n = static_cast<size_t>(out.num_tokens) * row;
      out.keys[l].append(batch.keys[l], from, n);
      out.values[l].append(batch.values[l], from, n);
    }
  }
  return out;
}

class ClusterTierImpl final : public ClusterTier {
 public:
  ClusterTierImpl(const ClusterTierOptions& cluster, const TierOptions& options)
      : cluster_(cluster), options_(options), clock_(cluster.clock ? cluster.clock : Clock::Real()) {
    if (options_.worker_id.empty()) options_.worker_id = internal::DefaultWorkerId();
    // Epochs only grow, also across restarts of this worker (see cluster_tier.h).
    next_epoch_ = static_cast<uint64_t>(std::max<int64_t>(1, absl::ToUnixMicros(absl::Now())));
  }

  absl::Status Init() {
    absl::MutexLock lock(&mu_);
    if (cluster_.replication < 1) return absl::InvalidArgumentError("replication must be >= 1");
    if (cluster_.peers.empty()) return absl::InvalidArgumentError("no tier nodes given");
    if (cluster_.peers.size() == 1 && absl::StartsWith(cluster_.peers[0], kDnsPrefix)) {
      dns_ = cluster_.peers[0].substr(sizeof(kDnsPrefix) - 1);
      if (!cluster_.resolve) cluster_.resolve = ResolveDns;
      RETURN_IF_ERROR(ResolveLocked(/*initial=*/true));
      CreateRpcPoolLocked();
      return absl::OkStatus();
    }
    for (const std::string& p : cluster_.peers) {
      if (absl::StartsWith(p, kDnsPrefix)) return absl::InvalidArgumentError("a dns:/// target must be the only one");
    }
    SetNodesLocked(cluster_.peers);
    CreateRpcPoolLocked();
    if (static_cast<size_t>(cluster_.replication) > names_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("replication ", cluster_.replication, " exceeds the ", names_.size(), " nodes"));
    }
    return absl::OkStatus();
  }

  absl::Status RegisterModel(const ModelSpec& spec) override {
    absl::MutexLock lock(&mu_);
    specs_[spec.model_id] = spec;
    int registered = 0;
    absl::Status last = absl::UnavailableError("no tier node reachable");
    for (const std::string& name : names_) {
      Node& n = nodes_[name];
      const bool fresh = n.tier == nullptr;
      if (!UsableLocked(n)) continue;  // connecting registers every known model
      if (!fresh) {
        absl::Status s = n.tier->RegisterModel(spec);
        if (NodeGone(s)) {
          MarkDownLocked(n, s);
          last = s;
          continue;
        }
        RETURN_IF_ERROR(s);
      }
      ++registered;
    }
    return registered > 0 ? absl::OkStatus() : last;
  }

  absl::StatusOr<OpenResult> OpenSequence(const std::string& sequence_id, const std::string& model_id,
                                          absl::Span<const int32_t> token_ids) override {
    absl::MutexLock lock(&mu_);
    if (specs_.find(model_id) == specs_.end()) {
      return absl::FailedPreconditionError(absl::StrCat("RegisterModel('", model_id, "') first on this client"));
    }
    if (!dns_.empty() && clock_->Now() >= next_resolve_) ResolveLocked(false).IgnoreError();
    auto existing = seqs_.find(sequence_id);
    if (existing != seqs_.end()) return ReopenLocked(existing->second, token_ids);

    Seq seq;
    seq.id = sequence_id;
    seq.model_id = model_id;
    seq.ids.assign(token_ids.begin(), token_ids.end());
    seq.prompt_tokens = static_cast<int64_t>(token_ids.size());
    seq.key = placement::PrefixAffinityKey(options_.tenant, model_id, token_ids, cluster_.affinity_tokens);
    seq.order = placement::RankNodes(names_, seq.key);
    const size_t want = std::min<size_t>(static_cast<size_t>(cluster_.replication), seq.order.size());
    bool redirected = false;
    for (size_t i = 0; i < seq.order.size() && seq.replicas.size() < want; ++i) {
      if (HasReplica(seq, seq.order[i])) continue;
      Node& n = NodeLocked(seq.order[i]);
      if (!UsableLocked(n)) continue;
      absl::StatusOr<int64_t> stored = PlacedOpenLocked(n, seq, token_ids);
      if (stored.ok()) {
        seq.replicas.push_back({n.name, n.generation, *stored});
        continue;
      }
      if (placement::IsDrainingError(stored.status())) {
        counters_.drained_skips++;
        continue;  // the next node of the order takes it; the draining one still serves the rest
      }
      if (NodeGone(stored.status())) {
        MarkDownLocked(n, stored.status());
        continue;
      }
      std::optional<std::vector<std::string>> owners;
      if (absl::IsFailedPrecondition(stored.status())) owners = placement::ParseRedirect(stored.status().message());
      if (!owners.has_value() || !cluster_.follow_redirects || redirected) return stored.status();
      // Our node list disagrees with the node's: place the sequence on the owners it names (then
      // the rest of our order), and re-resolve our list at the next open.
      redirected = true;
      counters_.redirects++;
      KV_LOG(WARNING) << "node " << n.name << " redirected sequence " << sequence_id << " to ["
                      << absl::StrJoin(*owners, ",") << "]: our node list looks stale";
      // Replicas already opened on nodes that are not owners by the node's list are closed (kept
      // there, evictable: the id may have existed before this open).
      const auto others = std::stable_partition(seq.replicas.begin(), seq.replicas.end(), [&](const Replica& r) {
        return std::find(owners->begin(), owners->end(), r.node) != owners->end();
      });
      const auto first_other = static_cast<size_t>(others - seq.replicas.begin());
      CloseReplicasLocked(seq.id, absl::MakeConstSpan(seq.replicas).subspan(first_other));
      seq.replicas.erase(others, seq.replicas.end());
      std::vector<std::string> order = *owners;
      for (const std::string& o : seq.order) {
        if (std::find(order.begin(), order.end(), o) == order.end()) order.push_back(o);
      }
      seq.order = std::move(order);
      i = static_cast<size_t>(-1);  // restart the walk over the new order
      next_resolve_ = absl::InfinitePast();
    }
    if (seq.replicas.size() < want) {
      CloseReplicasLocked(seq.id, seq.replicas);
      return absl::UnavailableError(absl::StrCat("sequence ", sequence_id, " needs ", want, " replicas; only ",
                                                 seq.replicas.size(), " of its nodes are reachable"));
    }
    int64_t stored = seq.replicas[0].stored;
    for (const Replica& r : seq.replicas) stored = std::min(stored, r.stored);
    seq.acked = stored;
    const OpenResult result{std::min<int64_t>(stored, seq.prompt_tokens), stored};
    seqs_.emplace(sequence_id, std::move(seq));
    return result;
  }

  absl::Status AppendKV(const std::string& sequence_id, const AppendBatch& batch) override {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Seq * seq, FindLocked(sequence_id));
    const ModelSpec& spec = specs_.at(seq->model_id);
    const int64_t end = batch.token_start + batch.num_tokens;
    if (batch.token_start > seq->acked) {
      return absl::FailedPreconditionError(absl::StrCat("append at token ", batch.token_start, " of ", sequence_id,
                                                        " leaves a gap: ", seq->acked, " tokens are stored"));
    }
    if (!batch.token_ids.empty() && static_cast<int64_t>(batch.token_ids.size()) != batch.num_tokens) {
      return absl::InvalidArgumentError("token_ids must name every appended token");
    }
    if (end <= seq->acked) return absl::OkStatus();  // a retry of an acknowledged append
    RETURN_IF_ERROR(ForEachReplicaLocked(*seq, [&](Node& n, Replica& r) -> absl::Status {
      if (r.stored >= end) return absl::OkStatus();
      const int64_t off = std::max<int64_t>(0, r.stored - batch.token_start);
      absl::Status s = off == 0 ? n.tier->AppendKV(seq->id, batch) : n.tier->AppendKV(seq->id, Slice(batch, spec, off));
      if (s.ok()) {
        r.stored = end;
        return s;
      }
      // An earlier attempt may have committed although its answer was lost: read the length back.
      if (absl::IsFailedPrecondition(s)) {
        absl::StatusOr<OpenResult> o = n.tier->OpenSequence(seq->id, seq->model_id, seq->ids);
        if (o.ok() && o->stored_tokens >= end) {
          r.stored = o->stored_tokens;
          return absl::OkStatus();
        }
      }
      return s;
    }));
    seq->acked = end;
    // Ids of the appended tokens, for refills of replicas later (the replicas above still saw
    // the ids as they were before this append).
    if (!batch.token_ids.empty()) {
      for (int64_t t = std::max<int64_t>(batch.token_start, static_cast<int64_t>(seq->ids.size())); t < end; ++t) {
        seq->ids.push_back(batch.token_ids[static_cast<size_t>(t - batch.token_start)]);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Retrieve(const RetrieveBatch& batch, std::vector<Recalled>* out) override {
    absl::MutexLock lock(&mu_);
    if (batch.entries.empty()) return absl::InvalidArgumentError("empty retrieve batch");
    std::vector<Seq*> seqs(batch.entries.size());
    for (size_t i = 0; i < batch.entries.size(); ++i) {
      ASSIGN_OR_RETURN(seqs[i], FindLocked(batch.entries[i].sequence_id));
    }
    out->assign(batch.entries.size(), Recalled{});
    std::vector<std::unique_ptr<std::string>>& kept = kept_rows_[batch.staging_area];
    kept.clear();  // the caller is done with the previous call's rows in this area
    std::vector<bool> done(batch.entries.size(), false), copied(batch.entries.size(), false);
    std::vector<std::set<std::string>> failed(batch.entries.size());  // nodes that failed entry i
    std::vector<size_t> pending(batch.entries.size());
    for (size_t i = 0; i < pending.size(); ++i) pending[i] = i;
    absl::Status last_error;
    while (!pending.empty()) {
      // Group the pending entries by their first live, synchronised replica not yet failed.
      // By node name (one call per node, in name order).
      std::map<std::string_view, std::pair<Node*, std::vector<size_t>>> groups;
      for (size_t i : pending) {
        Node* node = ServingNodeLocked(*seqs[i], failed[i]);
        if (node == nullptr) {
          return absl::UnavailableError(absl::StrCat("no live replica of sequence ", seqs[i]->id, " left",
                                                     last_error.ok() ? "" : "; last error: ",
                                                     last_error.ok() ? "" : last_error.ToString()));
        }
        auto& group = groups[node->name];
        group.first = node;
        group.second.push_back(i);
      }
      struct Call {
        Node* node;
        std::vector<size_t> entries;
        RetrieveBatch sub;
        std::vector<Recalled> got;
        absl::Status status;
      };
      std::vector<Call> calls;
      for (auto& [name, group] : groups) {
        Node& n = *group.first;
        Call c{&n, std::move(group.second),
               RetrieveBatch{batch.layer, batch.budget, batch.method, {}, batch.staging_area, batch.successors},
               {}, {}};
        for (size_t i : c.entries) {
          RetrieveEntry e = batch.entries[i];
          e.slot_epoch = EpochLocked(*seqs[i], e, batch.layer, n);
          c.sub.entries.push_back(std::move(e));
        }
        calls.push_back(std::move(c));
      }
      auto run = [](Call* c) { c->status = c->node->tier->Retrieve(c->sub, &c->got); };
      rpc_pool_->ParallelFor(static_cast<int64_t>(calls.size()), [&](int64_t k) { run(&calls[k]); });

      pending.clear();
      for (Call& c : calls) {
        if (c.status.ok() && c.got.size() == c.entries.size()) {
          for (size_t k = 0; k < c.entries.size(); ++k) {
            (*out)[c.entries[k]] = std::move(c.got[k]);
            done[c.entries[k]] = true;
          }
          continue;
        }
        if (c.status.ok()) c.status = absl::InternalError("node answered a different number of results");
        if (!NodeGone(c.status) && !NodeForgot(c.status)) return c.status;
        last_error = c.status;
        KV_LOG(WARNING) << "retrieve on node " << c.node->name << " failed (" << c.status << "); failing over "
                        << c.entries.size() << " entries";
        counters_.failovers += static_cast<int64_t>(c.entries.size());
        FailoverMetric()->Add(static_cast<double>(c.entries.size()));
        for (size_t i : c.entries) {
          failed[i].insert(c.node->name);
          pending.push_back(i);
        }
        if (NodeGone(c.status)) {
          MarkDownLocked(*c.node, c.status);
        } else {
          ResetLocked(*c.node, c.status);
        }
      }
      // The next round may call a node that already answered in this one, whose recall buffer
      // then gets new rows: keep copies of the rows answered so far.
      if (!pending.empty()) KeepRowsLocked(seqs, done, &copied, out, &kept);
    }
    retrieve_calls_++;
    return absl::OkStatus();
  }

  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& sequence_id,
                                                        kvstore::BuildIndexArgs args) override {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Seq * seq, FindLocked(sequence_id));
    // Keep a copy: a replica refilled later gets the same index.
    auto build = std::make_shared<StoredBuild>();
    build->args = args;
    for (absl::Span<const float> q : args.layer_queries) build->queries.emplace_back(q.begin(), q.end());
    build->args.layer_queries.clear();
    for (const std::vector<float>& q : build->queries) build->args.layer_queries.push_back(q);
    for (const kvstore::BuildIndexArgs::LayerLists& l : args.ctkvr_lists) {
      build->list_tokens.emplace_back(l.tokens.begin(), l.tokens.end());
      build->list_lse.emplace_back(l.lse.begin(), l.lse.end());
    }
    build->args.ctkvr_lists.clear();
    for (size_t i = 0; i < build->list_tokens.size(); ++i) {
      build->args.ctkvr_lists.push_back({build->list_tokens[i], build->list_lse[i]});
    }
    seq->build = std::move(build);
    std::optional<kvstore::BuildIndexOutcome> first;
    RETURN_IF_ERROR(ForEachReplicaLocked(*seq, [&](Node& n, Replica& r) -> absl::Status {
      if (r.built == seq->build) return absl::OkStatus();  // refilled just now, index included
      ASSIGN_OR_RETURN(kvstore::BuildIndexOutcome o, n.tier->BuildIndex(seq->id, seq->build->args));
      r.built = seq->build;
      if (!first.has_value()) first = o;
      return absl::OkStatus();
    }));
    if (!first.has_value()) return kvstore::BuildIndexOutcome{};
    return *first;
  }

  absl::Status CloseSequence(const std::string& sequence_id, bool drop) override {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(Seq * seq, FindLocked(sequence_id));
    absl::Status result = CloseAllLocked(*seq, drop);
    seq->epochs.clear();
    if (drop) seqs_.erase(sequence_id);
    return result;
  }

  // Sums over the reachable nodes; `sequences` lists each replica.
  absl::StatusOr<kvstore::NodeStats> Stats(bool include_sequences) override {
    absl::MutexLock lock(&mu_);
    kvstore::NodeStats sum;
    int answered = 0;
    absl::Status last = absl::UnavailableError("no tier node reachable");
    for (const std::string& name : names_) {
      Node& n = nodes_[name];
      if (!UsableLocked(n)) continue;
      absl::StatusOr<kvstore::NodeStats> s = n.tier->Stats(include_sequences);
      if (!s.ok()) {
        if (NodeGone(s.status())) MarkDownLocked(n, s.status());
        last = s.status();
        continue;
      }
      ++answered;
      sum.uptime_seconds = std::max(sum.uptime_seconds, s->uptime_seconds);
      sum.memory_limit_bytes += s->memory_limit_bytes;
      sum.stored_bytes += s->stored_bytes;
      sum.num_sequences += s->num_sequences;
      sum.num_models = std::max(sum.num_models, s->num_models);
      sum.num_workers += s->num_workers;
      sum.retrieve_calls += s->retrieve_calls;
      sum.retrieve_entries += s->retrieve_entries;
      sum.bytes_streamed += s->bytes_streamed;
      sum.blocks += s->blocks;
      sum.shared_blocks += s->shared_blocks;
      sum.logical_bytes += s->logical_bytes;
      sum.prompt_tokens += s->prompt_tokens;
      sum.matched_tokens += s->matched_tokens;
      sum.evictions += s->evictions;
      sum.spilled_bytes += s->spilled_bytes;
      sum.spilled_blocks += s->spilled_blocks;
      sum.reloads += s->reloads;
      sum.ingests += s->ingests;
      sum.ingest_bytes += s->ingest_bytes;
      sum.sequences.insert(sum.sequences.end(), s->sequences.begin(), s->sequences.end());
    }
    if (answered == 0) return last;
    return sum;
  }

  TierCounters counters() const override {
    absl::MutexLock lock(&mu_);
    TierCounters c = retired_;
    for (const auto& [name, n] : nodes_) {
      if (n.tier != nullptr) c += n.tier->counters();
    }
    c.retrieve_calls = retrieve_calls_;  // calls of the caller, not per node
    return c;
  }

  std::string Describe() const override {
    absl::MutexLock lock(&mu_);
    return absl::StrCat("cluster of ", names_.size(), " nodes", dns_.empty() ? "" : absl::StrCat(" (dns ", dns_, ")"),
                        ", replication ", cluster_.replication, ", via ", cluster_.remote.transport, ": ",
                        absl::StrJoin(names_, ","));
  }

  ClusterCounters cluster_counters() const override {
    absl::MutexLock lock(&mu_);
    return counters_;
  }

  std::vector<std::string> ReplicasOf(const std::string& sequence_id) const override {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> out;
    auto it = seqs_.find(sequence_id);
    if (it == seqs_.end()) return out;
    for (const Replica& r : it->second.replicas) out.push_back(r.node);
    return out;
  }

  std::vector<std::string> Nodes() const override {
    absl::MutexLock lock(&mu_);
    return names_;
  }

 private:
  struct Node {
    std::string name;
    std::unique_ptr<Tier> tier;  // null: not connected
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::KvRecall::Stub> stub;
    absl::Time retry_at = absl::InfinitePast();
    uint64_t generation = 0;  // of the current connection; unique over all nodes and time
  };
  struct StoredBuild {
    kvstore::BuildIndexArgs args;  // layer_queries and ctkvr_lists point into the copies below
    std::vector<std::vector<float>> queries;
    std::vector<std::vector<int32_t>> list_tokens;
    std::vector<std::vector<float>> list_lse;
  };
  struct Replica {
    std::string node;
    uint64_t generation = 0;  // the node connection it was synchronised under
    int64_t stored = 0;       // tokens it holds
    std::shared_ptr<StoredBuild> built;  // the last index built there
  };
  // Delta streaming state of one (layer, kv_head) of a sequence (see EpochLocked).
  struct EpochState {
    uint64_t generation = 0;  // of the serving node's connection (unique over all nodes and time)
    uint64_t caller_epoch = 0;
    uint64_t sent_epoch = 0;
  };
  struct Seq {
    std::string id;
    std::string model_id;
    std::vector<int32_t> ids;  // token ids of [0, ids.size()): the prompt, then acknowledged tokens
    int64_t prompt_tokens = 0;
    int64_t acked = 0;  // tokens every replica holds
    uint64_t key = 0;
    std::vector<std::string> order;  // owners first, then substitutes
    std::vector<Replica> replicas;
    std::shared_ptr<StoredBuild> build;
    std::map<std::pair<int, int>, EpochState> epochs;  // by (layer, kv_head)
  };

  void SetNodesLocked(const std::vector<std::string>& names) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::set<std::string> distinct(names.begin(), names.end());
    names_.assign(distinct.begin(), distinct.end());
    peers_hash_ = placement::PeersHash(names_);
    for (const std::string& n : names_) NodeLocked(n);
  }

  // One thread per node for Retrieve's per-node calls (the caller runs one of them too).
  void CreateRpcPoolLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    rpc_pool_ = std::make_unique<ThreadPool>(std::max(1, static_cast<int>(names_.size())));
  }

  absl::Status ResolveLocked(bool initial) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    counters_.resolves++;
    next_resolve_ = clock_->Now() + cluster_.resolve_interval;
    absl::StatusOr<std::vector<std::string>> r = cluster_.resolve(dns_);
    if (!r.ok() || r->empty()) {
      absl::Status s = r.ok() ? absl::UnavailableError(absl::StrCat(dns_, " has no address")) : r.status();
      if (!initial) KV_LOG(WARNING) << "re-resolving " << dns_ << ": " << s << "; keeping " << names_.size() << " nodes";
      return s;
    }
    if (!initial && *r != names_) {
      KV_LOG(INFO) << dns_ << " now resolves to " << absl::StrJoin(*r, ",");
    }
    SetNodesLocked(*r);
    return absl::OkStatus();
  }

  // Connects the node if it is not connected and not resting after a failure. True when usable.
  bool UsableLocked(Node& n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (n.tier != nullptr) return true;
    if (clock_->Now() < n.retry_at) return false;
    absl::Status s = ConnectLocked(n);
    if (!s.ok()) {
      MarkDownLocked(n, s);
      return false;
    }
    return true;
  }

  absl::Status ConnectLocked(Node& n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    grpc::ChannelArguments args;
    // Our own subchannel: no reconnect backoff inherited from an earlier, failed connection.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel, OpenChannel(n.name, cluster_.remote.tls, args));
    if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + cluster_.connect_timeout))) {
      return absl::UnavailableError(absl::StrCat("cannot reach tier node ", n.name));
    }
    RemoteTierOptions remote = cluster_.remote;
    remote.target = n.name;
    ASSIGN_OR_RETURN(std::unique_ptr<Tier> tier, CreateRemoteTier(remote, options_));
    for (const auto& [id, spec] : specs_) RETURN_IF_ERROR(tier->RegisterModel(spec));
    n.tier = std::move(tier);
    n.channel = std::move(channel);
    n.stub = v1::KvRecall::NewStub(n.channel);
    n.generation = ++generations_;
    counters_.connects++;
    return absl::OkStatus();
  }

  void DisconnectLocked(Node& n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (n.tier != nullptr) retired_ += n.tier->counters();
    n.tier.reset();
    n.stub.reset();
    n.channel.reset();
    counters_.nodes_down++;
  }

  void MarkDownLocked(Node& n, const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (n.tier != nullptr || n.retry_at < clock_->Now()) {
      KV_LOG(WARNING) << "tier node " << n.name << " is down (" << why << "); retrying it in "
                      << cluster_.down_interval;
    }
    DisconnectLocked(n);
    n.retry_at = clock_->Now() + cluster_.down_interval;
  }

  // The node answered but forgot state: reconnect at the next use, without a rest period.
  void ResetLocked(Node& n, const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    KV_LOG(WARNING) << "tier node " << n.name << " lost state (" << why << "); reconnecting";
    DisconnectLocked(n);
    n.retry_at = absl::InfinitePast();
  }

  absl::StatusOr<Seq*> FindLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return absl::FailedPreconditionError(absl::StrCat("OpenSequence('", id, "') first on this client"));
    return &it->second;
  }

  // OpenSequence with the placement check on the control channel, then on the node's RemoteTier
  // (which must know the sequence); returns the tokens the node holds.
  absl::StatusOr<int64_t> PlacedOpenLocked(Node& n, const Seq& seq, absl::Span<const int32_t> token_ids)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::OpenSequenceRequest req;
    req.set_tenant(options_.tenant);
    req.set_model_id(seq.model_id);
    req.set_sequence_id(seq.id);
    req.mutable_token_ids()->Add(token_ids.begin(), token_ids.end());
    v1::Placement* p = req.mutable_placement();
    p->set_key(seq.key);
    p->set_peers_hash(peers_hash_);
    p->set_replication(static_cast<uint32_t>(cluster_.replication));
    v1::OpenSequenceResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
    RETURN_IF_ERROR(FromGrpc(n.stub->OpenSequence(&ctx, req, &resp)));
    ASSIGN_OR_RETURN(OpenResult r, n.tier->OpenSequence(seq.id, seq.model_id, token_ids));
    return r.stored_tokens;
  }

  absl::StatusOr<OpenResult> ReopenLocked(Seq& seq, absl::Span<const int32_t> token_ids)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t i = 0; i < token_ids.size() && i < seq.ids.size(); ++i) {
      if (token_ids[i] != seq.ids[i]) {
        return absl::FailedPreconditionError(absl::StrCat("token id at index ", i, " of ", seq.id, " is ", seq.ids[i],
                                                          ", request says ", token_ids[i]));
      }
    }
    if (token_ids.size() > seq.ids.size()) {
      // Ids beyond the stored tokens: every replica must learn them.
      seq.ids.assign(token_ids.begin(), token_ids.end());
      RETURN_IF_ERROR(ForEachReplicaLocked(seq, [&](Node& n, Replica& r) -> absl::Status {
        return n.tier->OpenSequence(seq.id, seq.model_id, seq.ids).status();
      }));
    }
    return OpenResult{std::min(seq.acked, seq.prompt_tokens), seq.acked};
  }

  static bool HasReplica(const Seq& seq, const std::string& node) {
    return std::any_of(seq.replicas.begin(), seq.replicas.end(), [&](const Replica& r) { return r.node == node; });
  }

  Node& NodeLocked(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Node& n = nodes_[name];
    n.name = name;
    return n;
  }

  // Best effort: marks the sequence closed (not dropped) on `replicas`.
  void CloseReplicasLocked(const std::string& id, absl::Span<const Replica> replicas)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const Replica& r : replicas) {
      Node& n = NodeLocked(r.node);
      if (n.tier != nullptr) n.tier->CloseSequence(id, /*drop=*/false).IgnoreError();
    }
  }

  absl::Status CloseAllLocked(Seq& seq, bool drop) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::Status result;
    for (const Replica& r : seq.replicas) {
      Node& n = nodes_[r.node];
      if (n.tier == nullptr || n.generation != r.generation) continue;  // it keeps nothing we use
      absl::Status s = n.tier->CloseSequence(seq.id, drop);
      if (NodeGone(s)) {
        MarkDownLocked(n, s);
      } else if (!s.ok() && !absl::IsNotFound(s) && result.ok()) {
        result = s;
      }
    }
    return result;
  }

  // Runs `fn` on every replica of `seq`, after making sure each is connected and synchronised;
  // a replica whose node is gone (after retries) is replaced by the next node of the sequence's
  // order, refilled, and `fn` runs there. OK when `fn` succeeded on R replicas.
  template <typename Fn>
  absl::Status ForEachReplicaLocked(Seq& seq, Fn fn) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    size_t substitutions = 0;
    for (size_t k = 0; k < seq.replicas.size(); ++k) {
      absl::Status s = absl::UnavailableError("not tried");
      bool reconnected = false;
      for (int attempt = 0; attempt <= cluster_.retries; ++attempt) {
        if (attempt > 0) counters_.retries++;
        Replica& r = seq.replicas[k];
        Node& n = nodes_[r.node];
        if (!UsableLocked(n)) {
          s = absl::UnavailableError(absl::StrCat("tier node ", n.name, " is down"));
          break;
        }
        s = SyncLocked(seq, k);
        if (s.ok()) s = fn(n, seq.replicas[k]);
        if (s.ok()) break;
        if (absl::IsNotFound(s) && !reconnected) {
          // The node lost the sequence (restarted behind our back): reconnect, and SyncLocked
          // refills it. Does not use up a retry.
          reconnected = true;
          ResetLocked(n, s);
          --attempt;
          continue;
        }
        if (!NodeGone(s)) return s;
      }
      if (s.ok()) continue;
      // Here s is UNAVAILABLE / DEADLINE_EXCEEDED: the loop returned every other error.
      MarkDownLocked(nodes_[seq.replicas[k].node], s);
      if (++substitutions > nodes_.size()) return s;
      RETURN_IF_ERROR(SubstituteLocked(seq, k));
      --k;  // run fn on the substitute
    }
    return absl::OkStatus();
  }

  // Replaces replica k by the next reachable node of the sequence's order that holds no replica,
  // refilled to the acknowledged length.
  absl::Status SubstituteLocked(Seq& seq, size_t k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::string gone = seq.replicas[k].node;
    std::vector<std::string> candidates = seq.order;
    for (const std::string& name : names_) {  // nodes that joined since the sequence was placed
      if (std::find(candidates.begin(), candidates.end(), name) == candidates.end()) candidates.push_back(name);
    }
    for (const std::string& name : candidates) {
      if (name == gone) continue;
      if (HasReplica(seq, name)) continue;
      Node& n = NodeLocked(name);
      if (!UsableLocked(n)) continue;
      seq.replicas[k] = Replica{name, 0, 0, nullptr};  // generation 0: SyncLocked refills it
      absl::Status s = SyncLocked(seq, k);
      if (s.ok()) {
        counters_.substitutions++;
        KV_LOG(WARNING) << "sequence " << seq.id << ": replica on " << gone << " replaced by " << name;
        if (std::find(seq.order.begin(), seq.order.end(), name) == seq.order.end()) seq.order.push_back(name);
        return absl::OkStatus();
      }
      if (NodeGone(s)) {
        MarkDownLocked(n, s);
        continue;
      }
      return s;
    }
    return absl::UnavailableError(absl::StrCat("sequence ", seq.id, " lost its replica on ", gone,
                                               " and no other node can take it (replication ", cluster_.replication,
                                               ")"));
  }

  // Makes replica k hold exactly the acknowledged tokens (and the last index) if its node was
  // reconnected since it was last synchronised. REQUIRES: its node is connected.
  absl::Status SyncLocked(Seq& seq, size_t k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Replica& r = seq.replicas[k];
    Node& n = nodes_[r.node];
    if (r.generation == n.generation) return absl::OkStatus();
    const std::vector<int32_t>& open_ids = seq.ids;  // the prompt and every acknowledged token
    absl::StatusOr<OpenResult> o = n.tier->OpenSequence(seq.id, seq.model_id, open_ids);
    if (absl::IsFailedPrecondition(o.status())) {  // a different sequence under this id: start over
      RETURN_IF_ERROR(n.tier->CloseSequence(seq.id, /*drop=*/true));
      o = n.tier->OpenSequence(seq.id, seq.model_id, open_ids);
    }
    RETURN_IF_ERROR(o.status());
    int64_t stored = o->stored_tokens;
    if (stored > seq.acked) {
      // More than was acknowledged: an append that failed elsewhere. Its rows may not be what
      // the caller appends next, so this copy is not trusted.
      RETURN_IF_ERROR(n.tier->CloseSequence(seq.id, /*drop=*/true));
      ASSIGN_OR_RETURN(OpenResult again, n.tier->OpenSequence(seq.id, seq.model_id, open_ids));
      stored = again.stored_tokens;
      if (stored > seq.acked) return absl::InternalError("a freshly opened replica holds unacknowledged tokens");
    }
    if (stored < seq.acked) RETURN_IF_ERROR(RefillLocked(seq, k, stored));
    r.stored = seq.acked;
    r.built = nullptr;
    if (seq.build != nullptr && seq.acked > 0) {
      RETURN_IF_ERROR(n.tier->BuildIndex(seq.id, seq.build->args).status());
      r.built = seq.build;
    }
    r.generation = n.generation;
    return absl::OkStatus();
  }

  // Copies tokens [from, acked) of `seq` from a synchronised replica to replica k.
  absl::Status RefillLocked(Seq& seq, size_t k, int64_t from) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Node* source = nullptr;
    for (size_t j = 0; j < seq.replicas.size(); ++j) {
      if (j == k) continue;
      Node& n = nodes_[seq.replicas[j].node];
      if (n.tier != nullptr && n.generation == seq.replicas[j].generation && seq.replicas[j].stored >= seq.acked) {
        source = &n;
        break;
      }
    }
    if (source == nullptr) {
      return absl::UnavailableError(absl::StrCat("no live replica of ", seq.id, " to refill ",
                                                 seq.replicas[k].node, " from"));
    }
    const ModelSpec& spec = specs_.at(seq.model_id);
    const size_t row = spec.row_bytes();
    const int64_t token_bytes = static_cast<int64_t>(2 * row) * spec.num_kv_heads * spec.num_layers;
    const int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>(kRefillChunkBytes) / token_bytes);
    Node& target = nodes_[seq.replicas[k].node];
    for (int64_t t0 = from; t0 < seq.acked; t0 += chunk) {
      const int64_t n = std::min(chunk, seq.acked - t0);
      AppendBatch b;
      b.token_start = t0;
      b.num_tokens = n;
      b.keys.resize(static_cast<size_t>(spec.num_layers));
      b.values.resize(static_cast<size_t>(spec.num_layers));
      for (int l = 0; l < spec.num_layers; ++l) {
        for (int h = 0; h < spec.num_kv_heads; ++h) {
          RETURN_IF_ERROR(FetchLocked(*source, seq.id, l, h, t0, t0 + n, row, &b.keys[l], &b.values[l]));
        }
      }
      RETURN_IF_ERROR(target.tier->AppendKV(seq.id, b));
    }
    counters_.refills++;
    counters_.refilled_tokens += seq.acked - from;
    RefillMetric()->Add();
    KV_LOG(INFO) << "sequence " << seq.id << ": refilled tokens [" << from << ", " << seq.acked << ") on "
                 << target.name << " from " << source->name;
    return absl::OkStatus();
  }

  // Appends rows [begin, end) of (layer, kv_head) to keys / values ([n][row] each).
  absl::Status FetchLocked(Node& n, const std::string& seq, int layer, int kv_head, int64_t begin, int64_t end,
                           size_t row, std::string* keys, std::string* values) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    v1::FetchKVRequest req;
    req.set_tenant(options_.tenant);
    req.set_sequence_id(seq);
    req.set_layer(layer);
    req.set_kv_head(kv_head);
    req.set_token_begin(begin);
    req.set_token_end(end);
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
    auto reader = n.stub->FetchKV(&ctx, req);
    v1::FetchKVResponse chunk;
    size_t got = 0;
    while (reader->Read(&chunk)) {
      const size_t m = static_cast<size_t>(chunk.token_ids_size());
      if (chunk.keys().size() != m * row || chunk.values().size() != m * row) {
        ctx.TryCancel();
        reader->Finish().ok();
        return absl::DataLossError("malformed FetchKV chunk");
      }
      keys->append(chunk.keys());
      values->append(chunk.values());
      got += m;
    }
    RETURN_IF_ERROR(FromGrpc(reader->Finish()));
    if (got != static_cast<size_t>(end - begin)) return absl::DataLossError("FetchKV returned fewer rows than asked");
    return absl::OkStatus();
  }

  // The node to read entry's sequence from: its first replica that is connected, synchronised
  // and not in `failed`; null when there is none.
  Node* ServingNodeLocked(const Seq& seq, const std::set<std::string>& failed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const Replica& r : seq.replicas) {
      if (failed.count(r.node) > 0) continue;
      Node& n = nodes_[r.node];
      if (n.tier == nullptr || n.generation != r.generation || r.stored < seq.acked) continue;
      return &n;
    }
    return nullptr;
  }

  // Copies the rows of answered, not yet copied entries into one new buffer of `kept` and points
  // their results there. Copies a whole selection's worth of rows (the entry's area holds
  // `budget` >= that many), which covers the fill rows under delta streaming.
  void KeepRowsLocked(const std::vector<Seq*>& seqs, const std::vector<bool>& done, std::vector<bool>* copied,
                      std::vector<Recalled>* out, std::vector<std::unique_ptr<std::string>>* kept)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<size_t> bytes(out->size(), 0);
    size_t total = 0;
    for (size_t i = 0; i < out->size(); ++i) {
      if (!done[i] || (*copied)[i] || (*out)[i].rows == nullptr) continue;
      const size_t rows = std::max((*out)[i].token_ids.size(), (*out)[i].fill_slots.size());
      bytes[i] = rows * 2 * specs_.at(seqs[i]->model_id).row_bytes();
      total += bytes[i];
    }
    auto buf = std::make_unique<std::string>(total, '\0');
    size_t at = 0;
    for (size_t i = 0; i < out->size(); ++i) {
      if (!done[i] || (*copied)[i]) continue;
      (*copied)[i] = true;
      if ((*out)[i].rows == nullptr) continue;
      const size_t n = bytes[i];
      std::memcpy(buf->data() + at, (*out)[i].rows, n);
      (*out)[i].rows = reinterpret_cast<const uint8_t*>(buf->data() + at);
      at += n;
    }
    kept->push_back(std::move(buf));
  }

  // The slot_epoch to send node `n` for entry `e` of `seq`: the one sent last time when the same
  // connection (generations are unique over nodes, so also the same node) serves it and the
  // caller's epoch is unchanged, else a fresh one.
  uint64_t EpochLocked(Seq& seq, const RetrieveEntry& e, int layer, const Node& n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (e.slot_epoch == 0) return 0;
    EpochState& st = seq.epochs[{layer, e.kv_head}];
    if (st.sent_epoch == 0 || st.generation != n.generation || st.caller_epoch != e.slot_epoch) {
      st = EpochState{n.generation, e.slot_epoch, next_epoch_++};
    }
    return st.sent_epoch;
  }

  ClusterTierOptions cluster_;
  TierOptions options_;
  Clock* const clock_;

  mutable absl::Mutex mu_;
  std::string dns_ ABSL_GUARDED_BY(mu_);  // "name:port" when resolved from DNS
  absl::Time next_resolve_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::vector<std::string> names_ ABSL_GUARDED_BY(mu_);  // the node list, sorted
  uint64_t peers_hash_ ABSL_GUARDED_BY(mu_) = 0;          // placement::PeersHash(names_)
  std::map<std::string, Node> nodes_ ABSL_GUARDED_BY(mu_);  // every node ever listed
  std::map<std::string, ModelSpec> specs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Seq> seqs_ ABSL_GUARDED_BY(mu_);
  // Per staging area: copies of rows answered before a failover round (see Retrieve).
  std::map<int, std::vector<std::unique_ptr<std::string>>> kept_rows_ ABSL_GUARDED_BY(mu_);
  uint64_t next_epoch_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t generations_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t retrieve_calls_ ABSL_GUARDED_BY(mu_) = 0;
  TierCounters retired_ ABSL_GUARDED_BY(mu_);  // counters of closed node connections
  ClusterCounters counters_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<ThreadPool> rpc_pool_;  // set by Init
};

}  // namespace

absl::StatusOr<std::unique_ptr<ClusterTier>> CreateClusterTier(const ClusterTierOptions& cluster,
                                                               const TierOptions& options) {
  auto tier = std::make_unique<ClusterTierImpl>(cluster, options);
  RETURN_IF_ERROR(tier->Init());
  return tier;
}

}  // namespace kvrecall::client
