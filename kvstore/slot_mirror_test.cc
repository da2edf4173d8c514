#include "kvstore/slot_mirror.h"

#include <algorithm>
#include <random>
#include <set>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::kvrecall::testing::StatusIs;

const SlotKey kKey{"t", "s", 3, 1};

TEST(SlotMirrorTest, EpochZeroIsFreshEveryTime) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  for (int round = 0; round < 2; ++round) {
    ASSERT_OK_AND_ASSIGN(SlotPlan plan, mirror.Plan(kKey, owner, 0, 4, {5, 9, 12}));
    EXPECT_THAT(plan.slots, ElementsAre(0, 1, 2));
    EXPECT_THAT(plan.fill_slots, ElementsAre(0, 1, 2));
    EXPECT_THAT(plan.fill_tokens, ElementsAre(5, 9, 12));
  }
  EXPECT_EQ(mirror.entries(), 0);
}

TEST(SlotMirrorTest, SendsOnlyNewTokensIntoFreedSlots) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  ASSERT_OK_AND_ASSIGN(SlotPlan first, mirror.Plan(kKey, owner, 7, 4, {10, 20, 30, 40}));
  EXPECT_THAT(first.slots, ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(first.fill_tokens, ElementsAre(10, 20, 30, 40));

  // 20 and 40 leave (slots 1 and 3 free up); 5 and 35 arrive and take them, lowest slot first.
  ASSERT_OK_AND_ASSIGN(SlotPlan second, mirror.Plan(kKey, owner, 7, 4, {5, 10, 30, 35}));
  EXPECT_THAT(second.slots, ElementsAre(1, 0, 2, 3));
  EXPECT_THAT(second.fill_slots, ElementsAre(1, 3));
  EXPECT_THAT(second.fill_tokens, ElementsAre(5, 35));

  // The same selection again: nothing to send.
  ASSERT_OK_AND_ASSIGN(SlotPlan third, mirror.Plan(kKey, owner, 7, 4, {5, 10, 30, 35}));
  EXPECT_THAT(third.slots, ElementsAre(1, 0, 2, 3));
  EXPECT_THAT(third.fill_slots, IsEmpty());
}

TEST(SlotMirrorTest, NewerEpochResetsAndOlderEpochIsAborted) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  ASSERT_OK(mirror.Plan(kKey, owner, 5, 4, {1, 2}).status());
  ASSERT_OK_AND_ASSIGN(SlotPlan reset, mirror.Plan(kKey, owner, 6, 4, {1, 2}));
  EXPECT_THAT(reset.fill_tokens, ElementsAre(1, 2));
  EXPECT_THAT(mirror.Plan(kKey, owner, 5, 4, {1, 2}).status(), StatusIs(absl::StatusCode::kAborted));
  // The stale call changed nothing.
  ASSERT_OK_AND_ASSIGN(SlotPlan same, mirror.Plan(kKey, owner, 6, 4, {1, 2}));
  EXPECT_THAT(same.fill_slots, IsEmpty());
}

TEST(SlotMirrorTest, OtherIncarnationOrBudgetResets) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  ASSERT_OK(mirror.Plan(kKey, owner, 1, 4, {1, 2}).status());
  auto recreated = std::make_shared<int>(0);  // the sequence was dropped and opened again
  ASSERT_OK_AND_ASSIGN(SlotPlan a, mirror.Plan(kKey, recreated, 1, 4, {1, 2}));
  EXPECT_THAT(a.fill_tokens, ElementsAre(1, 2));
  ASSERT_OK_AND_ASSIGN(SlotPlan b, mirror.Plan(kKey, recreated, 1, 8, {1, 2}));
  EXPECT_THAT(b.fill_tokens, ElementsAre(1, 2));
  owner.reset();
  recreated.reset();  // an expired incarnation never matches
  auto third = std::make_shared<int>(0);
  ASSERT_OK_AND_ASSIGN(SlotPlan c, mirror.Plan(kKey, third, 1, 8, {1, 2}));
  EXPECT_THAT(c.fill_tokens, ElementsAre(1, 2));
}

TEST(SlotMirrorTest, ForgetResends) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  const SlotKey other{"t", "s", 4, 1};
  ASSERT_OK(mirror.Plan(kKey, owner, 1, 4, {1, 2}).status());
  ASSERT_OK(mirror.Plan(other, owner, 1, 4, {1, 2}).status());
  mirror.Forget(kKey);
  EXPECT_THAT(mirror.Plan(kKey, owner, 1, 4, {1, 2})->fill_tokens, ElementsAre(1, 2));
  EXPECT_THAT(mirror.Plan(other, owner, 1, 4, {1, 2})->fill_tokens, IsEmpty());
  mirror.ForgetSequence("t", "s");
  EXPECT_EQ(mirror.entries(), 0);
  mirror.ForgetSequence("t", "absent");  // harmless
}

TEST(SlotMirrorTest, SelectionLargerThanBudgetIsInvalid) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  EXPECT_THAT(mirror.Plan(kKey, owner, 1, 2, {1, 2, 3}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(mirror.Plan(kKey, owner, 1, 0, {}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

// A worker that applies every plan to its slots holds exactly the selection, step after step.
TEST(SlotMirrorTest, WorkerSlotsAlwaysHoldTheSelection) {
  SlotMirror mirror;
  auto owner = std::make_shared<int>(0);
  constexpr int kBudget = 64, kTokens = 400;
  std::mt19937 rng(42);
  std::vector<int32_t> worker_slots(kBudget, -1);  // token each slot holds
  std::set<int32_t> current;
  int64_t sent = 0, selected = 0;
  for (int step = 0; step < 300; ++step) {
    // Drift: replace a few tokens of the last selection; sometimes shrink or grow it.
    std::uniform_int_distribution<int> token(0, kTokens - 1);
    if (current.empty()) {
      while (current.size() < kBudget) current.insert(token(rng));
    } else {
      for (int r = 0; r < 6 && !current.empty(); ++r) current.erase(std::next(current.begin(), rng() % current.size()));
      const size_t want = step % 50 == 0 ? kBudget / 2 : kBudget;
      while (current.size() < want) current.insert(token(rng));
    }
    std::vector<int32_t> selection(current.begin(), current.end());
    ASSERT_OK_AND_ASSIGN(SlotPlan plan, mirror.Plan(kKey, owner, 1, kBudget, selection));
    ASSERT_EQ(plan.fill_slots.size(), plan.fill_tokens.size());
    for (size_t j = 0; j < plan.fill_slots.size(); ++j) worker_slots[plan.fill_slots[j]] = plan.fill_tokens[j];
    std::set<int32_t> distinct(plan.slots.begin(), plan.slots.end());
    ASSERT_EQ(distinct.size(), selection.size());
    for (size_t j = 0; j < selection.size(); ++j) {
      ASSERT_EQ(worker_slots[plan.slots[j]], selection[j]) << "step " << step << " token " << selection[j];
    }
    sent += static_cast<int64_t>(plan.fill_slots.size());
    selected += static_cast<int64_t>(selection.size());
  }
  EXPECT_LT(sent, selected / 4);  // drift of ~6 of 64 per step: most rows stay resident
}

// Plans of the same selections with every id shifted by `shift`, step after step.
void ExpectShiftedIdsPlanTheSame(int32_t shift) {
  SlotMirror plain, shifted_mirror;
  auto owner = std::make_shared<int>(0);
  constexpr int kBudget = 96;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, 1999);
  std::set<int32_t> current;
  for (int step = 0; step < 200; ++step) {
    for (int r = 0; r < 20 && !current.empty(); ++r) current.erase(std::next(current.begin(), rng() % current.size()));
    while (current.size() < (step % 40 == 0 ? kBudget / 3 : kBudget)) current.insert(token(rng));
    std::vector<int32_t> selection(current.begin(), current.end()), shifted = selection;
    for (int32_t& t : shifted) t += shift;
    ASSERT_OK_AND_ASSIGN(SlotPlan a, plain.Plan(kKey, owner, 1, kBudget, selection));
    ASSERT_OK_AND_ASSIGN(SlotPlan b, shifted_mirror.Plan(kKey, owner, 1, kBudget, shifted));
    ASSERT_EQ(a.slots, b.slots) << "shift " << shift << " step " << step;
    ASSERT_EQ(a.fill_slots, b.fill_slots) << "shift " << shift << " step " << step;
    for (int32_t& t : a.fill_tokens) t += shift;
    ASSERT_EQ(a.fill_tokens, b.fill_tokens) << "shift " << shift << " step " << step;
  }
}

TEST(SlotMirrorTest, IdsOutsideTheTableGetTheSamePlans) {
  // Ids outside [0, kDirectTokens) take the merge instead of the lookup table.
  ExpectShiftedIdsPlanTheSame(SlotMirror::kDirectTokens - 300);  // most ids above
  ExpectShiftedIdsPlanTheSame(-1000);                             // some ids negative
}

}  // namespace
}  // namespace kvrecall::kvstore
