#include "common/placement.h"

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::placement {
namespace {

using ::testing::ElementsAre;
using ::testing::UnorderedElementsAreArray;

std::vector<std::string> Nodes(int n) {
  std::vector<std::string> v;
  for (int i = 0; i < n; ++i) v.push_back(absl::StrCat("10.0.0.", i + 1, ":7070"));
  return v;
}

std::vector<int32_t> Prompt(int seed, int len) {
  std::vector<int32_t> t;
  for (int i = 0; i < len; ++i) t.push_back((seed * 7919 + i * 31) % 32000);
  return t;
}

TEST(PlacementTest, HashesAreFixed) {
  // Pinned values: changing the hash moves every sequence of a running cluster.
  EXPECT_EQ(Hash64(""), Fmix64(0xcbf29ce484222325ULL));
  EXPECT_EQ(Hash64("a"), Fmix64(0xaf63dc4c8601ec8cULL));  // FNV-1a-64("a")
  const std::vector<int32_t> p = Prompt(1, 100);
  EXPECT_EQ(PrefixAffinityKey("t", "m", p), PrefixAffinityKey("t", "m", p));
  EXPECT_NE(PrefixAffinityKey("t", "m", p), PrefixAffinityKey("u", "m", p));
  EXPECT_NE(PrefixAffinityKey("t", "m", p), PrefixAffinityKey("t", "n", p));
}

TEST(PlacementTest, AffinityCoversBlockAlignedPrefix) {
  EXPECT_EQ(AffinityTokens(10), 10);
  EXPECT_EQ(AffinityTokens(64), 64);
  EXPECT_EQ(AffinityTokens(100), 64);
  EXPECT_EQ(AffinityTokens(1000), 960);
  EXPECT_EQ(AffinityTokens(5000), 1024);
  EXPECT_EQ(AffinityTokens(5000, 256, 16), 256);
}

TEST(PlacementTest, SharedPrefixesCoLocate) {
  const std::vector<std::string> nodes = Nodes(5);
  std::vector<int32_t> base = Prompt(3, 1024);
  const std::vector<std::string> owners = Owners(nodes, PrefixAffinityKey("t", "m", base), 2);
  for (int s = 0; s < 20; ++s) {
    std::vector<int32_t> p = base;
    for (int i = 0; i < 50 + s * 13; ++i) p.push_back(s * 1000 + i);  // distinct suffixes
    EXPECT_EQ(Owners(nodes, PrefixAffinityKey("t", "m", p), 2), owners) << s;
  }
}

TEST(PlacementTest, SpreadIsBalanced) {
  const std::vector<std::string> nodes = Nodes(4);
  std::map<std::string, int> first;
  constexpr int kKeys = 20000;
  for (int i = 0; i < kKeys; ++i) first[RankNodes(nodes, PrefixAffinityKey("t", "m", Prompt(i, 70)))[0]]++;
  ASSERT_EQ(first.size(), nodes.size());
  for (const auto& [node, n] : first) {
    EXPECT_NEAR(n, kKeys / 4, kKeys / 4 * 0.08) << node;  // within 8% of the mean
  }
}

TEST(PlacementTest, AddingANodeMovesAboutOneNth) {
  std::vector<std::string> nodes = Nodes(4);
  constexpr int kKeys = 20000;
  std::vector<std::string> before;
  for (int i = 0; i < kKeys; ++i) before.push_back(RankNodes(nodes, Fmix64(i))[0]);
  nodes.push_back("10.0.0.99:7070");
  int moved = 0;
  for (int i = 0; i < kKeys; ++i) {
    const std::string now = RankNodes(nodes, Fmix64(i))[0];
    if (now != before[i]) {
      ++moved;
      EXPECT_EQ(now, "10.0.0.99:7070");  // keys only move to the new node
    }
  }
  EXPECT_NEAR(moved, kKeys / 5, kKeys / 5 * 0.1);
}

TEST(PlacementTest, RankingIgnoresOrderAndDuplicates) {
  std::vector<std::string> a = Nodes(3);
  std::vector<std::string> b = {a[2], a[0], a[1], a[0]};
  EXPECT_EQ(RankNodes(a, 42), RankNodes(b, 42));
  EXPECT_EQ(PeersHash(a), PeersHash(b));
  EXPECT_THAT(RankNodes(a, 42), UnorderedElementsAreArray(a));
  EXPECT_EQ(Owners(a, 42, 5).size(), 3u);
  EXPECT_NE(PeersHash(a), PeersHash(Nodes(4)));
}

TEST(PlacementTest, RedirectRoundTrips) {
  const std::string m = RedirectMessage("n1:1", 7, {"n2:1", "n3:1"}, 9);
  EXPECT_THAT(*ParseRedirect(m), ElementsAre("n2:1", "n3:1"));
  EXPECT_FALSE(ParseRedirect("sequence 'x' belongs to model 'y'").has_value());
}

}  // namespace
}  // namespace kvrecall::placement
