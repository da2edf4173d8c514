#include "kvstore/placement_check.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/placement.h"

namespace kvrecall::kvstore {

absl::Status ValidatePeerConfig(const PeerConfig& config) {
  if (config.peers.empty()) return absl::OkStatus();
  if (config.self.empty()) return absl::InvalidArgumentError("--peers needs --advertise (this node's name in the list)");
  if (std::find(config.peers.begin(), config.peers.end(), config.self) == config.peers.end()) {
    return absl::InvalidArgumentError(absl::StrCat("--advertise=", config.self, " is not in --peers"));
  }
  return absl::OkStatus();
}

absl::Status CheckPlacement(const PeerConfig& config, const v1::OpenSequenceRequest& req,
                            v1::OpenSequenceResponse* resp) {
  if (config.peers.empty() || !req.has_placement()) return absl::OkStatus();
  const v1::Placement& p = req.placement();
  const uint64_t ours = placement::PeersHash(config.peers);
  const int r = std::max<int>(1, static_cast<int>(std::min<uint32_t>(p.replication(), 1024)));
  const std::vector<std::string> owners = placement::Owners(config.peers, p.key(), r);
  resp->set_peers_hash(ours);
  resp->mutable_owners()->Assign(owners.begin(), owners.end());
  if (p.peers_hash() == ours || std::find(owners.begin(), owners.end(), config.self) != owners.end()) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(placement::RedirectMessage(config.self, p.key(), owners, ours));
}

}  // namespace kvrecall::kvstore
