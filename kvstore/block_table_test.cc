#include "kvstore/block_table.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

class BlockTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(arena_, Arena::Create({64 * 8, false}, nullptr));
    ASSERT_OK(arena_->EnsureSlotBytes(64));  // 8 slots
    table_ = std::make_unique<BlockTable>(arena_.get());
  }
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<BlockTable> table_;
};

TEST_F(BlockTableTest, RefcountsFreeSlotsAtZero) {
  ASSERT_OK_AND_ASSIGN(Block * a, table_->Allocate(3));
  EXPECT_EQ(arena_->used_slots(), 3);
  table_->Ref(a);
  EXPECT_EQ(table_->stats().shared, 1);
  table_->Unref(a);
  EXPECT_EQ(table_->stats().shared, 0);
  EXPECT_EQ(arena_->used_slots(), 3);
  table_->Unref(a);
  EXPECT_EQ(arena_->used_slots(), 0);
  EXPECT_EQ(table_->stats().blocks, 0);
}

TEST_F(BlockTableTest, AllocationIsAllOrNothing) {
  ASSERT_OK_AND_ASSIGN(Block * a, table_->Allocate(6));
  EXPECT_THAT(table_->Allocate(3), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(arena_->used_slots(), 6);
  table_->Unref(a);
}

TEST_F(BlockTableTest, AcquirePrefixChecksEverythingNotJustTheKey) {
  const std::vector<int32_t> tokens = {1, 2, 3, 4};
  const ContentKey k0 = BlockContentKey({}, "t:a", "m", {tokens.data(), 2});
  const ContentKey k1 = BlockContentKey(k0, "t:a", "m", {tokens.data() + 2, 2});
  ASSERT_OK_AND_ASSIGN(Block * b0, table_->Allocate(1));
  ASSERT_OK_AND_ASSIGN(Block * b1, table_->Allocate(1));
  table_->Publish(b0, {}, k0, "t:a", "m", {tokens.data(), 2});
  table_->Publish(b1, k0, k1, "t:a", "m", {tokens.data() + 2, 2});
  EXPECT_TRUE(b0->immutable());

  std::vector<Block*> got;
  EXPECT_EQ(table_->AcquirePrefix({k0, k1}, "t:a", "m", tokens, 2, &got), 2);
  EXPECT_EQ(got, (std::vector<Block*>{b0, b1}));
  for (Block* b : got) table_->Unref(b);
  got.clear();
  // Same keys, different namespace, model or tokens: nothing is shared.
  EXPECT_EQ(table_->AcquirePrefix({k0, k1}, "t:b", "m", tokens, 2, &got), 0);
  EXPECT_EQ(table_->AcquirePrefix({k0, k1}, "t:a", "n", tokens, 2, &got), 0);
  const std::vector<int32_t> other = {1, 2, 3, 5};
  EXPECT_EQ(table_->AcquirePrefix({k0, k1}, "t:a", "m", other, 2, &got), 1);
  ASSERT_EQ(got.size(), 1u);
  table_->Unref(got[0]);
  // A second block under a taken key stays private.
  ASSERT_OK_AND_ASSIGN(Block * dup, table_->Allocate(1));
  table_->Publish(dup, {}, k0, "t:a", "m", {tokens.data(), 2});
  EXPECT_EQ(table_->stats().published, 2);
  table_->Unref(dup);
  table_->Unref(b0);  // unpublished when freed
  got.clear();
  EXPECT_EQ(table_->AcquirePrefix({k0, k1}, "t:a", "m", tokens, 2, &got), 0);
  table_->Unref(b1);
  EXPECT_EQ(arena_->used_slots(), 0);
}

}  // namespace
}  // namespace kvrecall::kvstore
