// The server's side of placement over many nodes: a node started with --peers and --advertise
// knows the cluster's node list and its own name in it, and refuses OpenSequence from a client
// that placed the sequence on it by a different node list although this node is not an owner
// (common/placement.h computes the owners). The refusal is FAILED_PRECONDITION with
// placement::RedirectMessage naming the owners this node computes, so a client with a wrong or
// stale list gets a clear error or follows the redirect, never a silently misplaced sequence.
#ifndef KVRECALL_KVSTORE_PLACEMENT_CHECK_H_
#define KVRECALL_KVSTORE_PLACEMENT_CHECK_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "proto/kvrecall/v1/kvrecall.pb.h"

namespace kvrecall::kvstore {

struct PeerConfig {
  std::vector<std::string> peers;  // every node's name (host:port as clients dial it); empty: no check
  std::string self;                // this node's name in `peers`
};

// INVALID_ARGUMENT when peers are set but self is empty or not among them.
absl::Status ValidatePeerConfig(const PeerConfig& config);

// OK when `config` has no peers, the request carries no placement, the request's peers_hash
// equals this node's (the client sees the same cluster; it may place on a substitute for a down
// owner), or this node is among the first max(1, replication) owners of the key by its own list.
// Otherwise FAILED_PRECONDITION with a redirect message. With peers and a placement, fills
// resp->peers_hash and resp->owners whatever the outcome.
absl::Status CheckPlacement(const PeerConfig& config, const v1::OpenSequenceRequest& req,
                            v1::OpenSequenceResponse* resp);

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_PLACEMENT_CHECK_H_
