// ClusterTier: a Tier over many kvrecall-server nodes, with placement and replication.
//
// Placement. Each sequence is placed by rendezvous hashing (common/placement.h) of its
// prefix-affinity key (tenant, model and the first block-aligned min(prompt, affinity_tokens)
// prompt token ids), so sequences that share a long prompt prefix land on the same nodes and
// share its blocks there. Its owners are the first R nodes of that order; the rest of the order
// are the substitutes, in order.
//
// Node list. Static (host:port names), or one "dns:///name:port" entry: every address of `name`
// becomes a node "ip:port", re-resolved at OpenSequence once `resolve_interval` has passed on the
// injected clock (sequences already open keep their replicas; only new ones see the new list).
// Nodes are connected lazily, one RemoteTier each (recall buffer, UCX attachment), plus a
// control channel for the placement-checked OpenSequence and FetchKV.
//
// Writes (OpenSequence, AppendKV, BuildIndex) go to every replica of the sequence, one after the
// other; AppendKV returns OK only once all R replicas hold the tokens ("a write is acknowledged
// after R nodes hold it"). When a replica's node is down (UNAVAILABLE / DEADLINE_EXCEEDED after
// `retries` extra attempts), the replica is replaced by the next reachable node of the
// sequence's order that is not already a replica, refilled from a live replica (FetchKV → AppendKV,
// then the last BuildIndex again), and written; if fewer than R nodes are reachable the write
// fails UNAVAILABLE. Retried appends are idempotent: the request id is (sequence, token_start,
// num_tokens), and the client tracks how many tokens each replica holds and sends it only the
// tokens beyond them (a node refuses an append that does not start at its length, so a write
// can never apply twice; after an ambiguous failure the replica's length is read back by
// reopening the sequence, which is idempotent for an existing id with agreeing token ids).
//
// Reads. Retrieve groups the batch's entries by the first live replica of each sequence, sends
// one RPC per node (concurrently) and fails over entry by entry to the next replica on
// UNAVAILABLE / DEADLINE_EXCEEDED (node marked down for `down_interval`) or NOT_FOUND /
// FAILED_PRECONDITION (the node lost the sequence or this worker's attachment, e.g. a restart
// nobody saw: its connection is rebuilt). Failovers are counted (ClusterCounters, the
// kvrecall_client_failovers_total metric) and logged.
//
// A node that comes back is never trusted blindly: after any reconnect, a replica on it is
// re-synchronised before it is used again: the sequence is reopened there, its stored length is
// compared with what the client acknowledged, and it is refilled from a live replica (or, if it
// holds more than was acknowledged, dropped there and refilled from scratch). Until then reads
// skip it. A node that was replaced for a sequence is not used for it again, so a stale durable
// copy there is never read.
//
// Delta streaming. Every node keeps its own mirror of this worker's slot caches, keyed by the
// slot_epoch it was sent. ClusterTier rewrites slot_epoch per node: it remembers, per (sequence,
// layer, kv_head), the node (and connection generation) that served it last, the caller's epoch
// and the epoch it sent; the same sent epoch is reused only when node, generation and caller's
// epoch are all unchanged, otherwise a fresh value from a monotonic counter is sent (the node
// then resends every selected row). Recalled::rows point into the serving node's recall buffer;
// when a call failed over, the rows answered before the failover round are copied into a buffer
// ClusterTier keeps until the next call in the same staging area (a node that answers again in
// the same call reuses its buffer).
//
// Wrong node lists. The placement-checked OpenSequence carries (key, hash of the client's node
// list, R). A node started with --peers/--advertise refuses it with FAILED_PRECONDITION naming the
// owners by its list when the lists differ and it is not an owner; ClusterTier follows such a
// redirect once (placing the sequence on the named owners and re-resolving its list), or returns
// the error with follow_redirects = false.
//
// Thread safety: like every Tier, one caller at a time; calls are serialised by a mutex.
#ifndef KVRECALL_CLIENT_CLUSTER_TIER_H_
#define KVRECALL_CLIENT_CLUSTER_TIER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/tier.h"
#include "common/clock.h"
#include "common/placement.h"

namespace kvrecall::client {

// The prefix of a node list given as one DNS name ("dns:///name:port").
inline constexpr char kDnsPrefix[] = "dns:///";

struct ClusterTierOptions {
  // Node names (host:port), or exactly one "dns:///name:port".
  std::vector<std::string> peers;
  int replication = 1;  // R; at most the number of nodes
  absl::Duration resolve_interval = absl::Seconds(30);
  // Extra attempts of a write to one node after UNAVAILABLE / DEADLINE_EXCEEDED before the node is
  // marked down (retrieval fails over at once instead).
  int retries = 1;
  // How long to wait for a node's connection when (re)connecting to it.
  absl::Duration connect_timeout = absl::Seconds(2);
  // A node marked down is not tried again until this much time passed on `clock`.
  absl::Duration down_interval = absl::Seconds(2);
  int affinity_tokens = placement::kAffinityTokens;
  // Transport and UCX settings of every node's RemoteTier (target is ignored).
  RemoteTierOptions remote;
  bool follow_redirects = true;
  Clock* clock = nullptr;  // null: the real clock
  // "name:port" -> node names; null: getaddrinfo. Tests inject a fake.
  std::function<absl::StatusOr<std::vector<std::string>>(const std::string&)> resolve;
};

struct ClusterCounters {
  int64_t failovers = 0;      // retrieve entries moved to another replica
  int64_t retries = 0;        // extra write attempts on one node
  int64_t nodes_down = 0;     // times a node was marked down or its connection rebuilt
  int64_t connects = 0;       // (re)connections to nodes
  int64_t substitutions = 0;  // replicas replaced by another node
  int64_t refills = 0;        // replicas refilled from another replica
  int64_t refilled_tokens = 0;
  int64_t redirects = 0;      // placements moved by a node's redirect
  int64_t drained_skips = 0;  // placements that skipped a draining node
  int64_t resolves = 0;       // DNS resolutions
};

class ClusterTier : public Tier {
 public:
  virtual ClusterCounters cluster_counters() const = 0;
  // The nodes holding `sequence_id`, the one reads go to first; empty when unknown.
  virtual std::vector<std::string> ReplicasOf(const std::string& sequence_id) const = 0;
  // The current node list.
  virtual std::vector<std::string> Nodes() const = 0;
};

// INVALID_ARGUMENT for an empty list, R < 1 or R above the number of nodes of a static list;
// UNAVAILABLE when a DNS name does not resolve. Connects to nothing yet.
absl::StatusOr<std::unique_ptr<ClusterTier>> CreateClusterTier(const ClusterTierOptions& cluster,
                                                               const TierOptions& options);

// "a:1,b:2" -> {"a:1", "b:2"}; "dns:///name:port" -> {"dns:///name:port"} (common/placement.h).
using placement::SplitPeers;

}  // namespace kvrecall::client

#endif  // KVRECALL_CLIENT_CLUSTER_TIER_H_
