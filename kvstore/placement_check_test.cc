#include "kvstore/placement_check.h"

#include "common/placement.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

const std::vector<std::string> kPeers = {"a:1", "b:1", "c:1"};

v1::OpenSequenceRequest Request(uint64_t key, uint64_t peers_hash, int r) {
  v1::OpenSequenceRequest req;
  req.mutable_placement()->set_key(key);
  req.mutable_placement()->set_peers_hash(peers_hash);
  req.mutable_placement()->set_replication(r);
  return req;
}

TEST(PlacementCheckTest, ConfigNeedsSelfAmongPeers) {
  EXPECT_OK(ValidatePeerConfig({}));
  EXPECT_OK(ValidatePeerConfig({kPeers, "b:1"}));
  EXPECT_THAT(ValidatePeerConfig({kPeers, ""}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePeerConfig({kPeers, "d:1"}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PlacementCheckTest, OwnersAndSameListPassOthersAreRedirected) {
  const uint64_t key = 12345;
  const std::vector<std::string> ranked = placement::RankNodes(kPeers, key);
  const uint64_t ours = placement::PeersHash(kPeers);
  const uint64_t theirs = placement::PeersHash(std::vector<std::string>{"a:1", "b:1"});
  v1::OpenSequenceResponse resp;
  // No peers configured, or no placement: no check.
  EXPECT_OK(CheckPlacement({}, Request(key, theirs, 1), &resp));
  EXPECT_OK(CheckPlacement({kPeers, ranked[2]}, v1::OpenSequenceRequest(), &resp));
  // An owner accepts whatever the client's list.
  EXPECT_OK(CheckPlacement({kPeers, ranked[0]}, Request(key, theirs, 1), &resp));
  EXPECT_THAT(resp.owners(), ElementsAreArray({ranked[0]}));
  EXPECT_EQ(resp.peers_hash(), ours);
  EXPECT_OK(CheckPlacement({kPeers, ranked[1]}, Request(key, theirs, 2), &resp));
  // A client with the same list may use a non-owner (a substitute for a down owner).
  EXPECT_OK(CheckPlacement({kPeers, ranked[2]}, Request(key, ours, 1), &resp));
  // A different list and not an owner: refused, naming the owners.
  absl::Status s = CheckPlacement({kPeers, ranked[2]}, Request(key, theirs, 2), &resp);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(std::string(s.message()), HasSubstr("owners=[" + ranked[0] + "," + ranked[1] + "]"));
  EXPECT_THAT(*placement::ParseRedirect(s.message()), ElementsAreArray({ranked[0], ranked[1]}));
}

}  // namespace
}  // namespace kvrecall::kvstore
