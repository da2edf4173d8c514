#include "kvstore/arena.h"

#include <cstring>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(ArenaTest, CarvesFixedSlotsAndNeverGrows) {
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create({1 << 16, true}, nullptr));
  EXPECT_EQ(arena->capacity_bytes(), 1 << 16);
  std::vector<uint8_t*> slots;
  EXPECT_THAT(arena->Allocate(1, &slots), StatusIs(absl::StatusCode::kFailedPrecondition))
      << "no slot size yet";
  ASSERT_OK(arena->EnsureSlotBytes(1000));  // rounded up to 1024
  EXPECT_EQ(arena->slot_bytes(), 1024u);
  EXPECT_EQ(arena->total_slots(), 64);
  ASSERT_OK(arena->EnsureSlotBytes(512));  // smaller fits
  EXPECT_THAT(arena->EnsureSlotBytes(2048), StatusIs(absl::StatusCode::kFailedPrecondition));

  ASSERT_OK(arena->Allocate(60, &slots));
  EXPECT_THAT(arena->Allocate(5, &slots), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(slots.size(), 60u) << "all or nothing";
  ASSERT_OK(arena->Allocate(4, &slots));
  for (uint8_t* s : slots) {
    ASSERT_GE(s, arena->base());
    ASSERT_LE(s + 1024, arena->base() + (1 << 16));
    std::memset(s, 0xab, 1024);  // writable, inside the mapping
  }
  EXPECT_EQ(arena->used_bytes(), 1 << 16);
  arena->Free(absl::MakeConstSpan(slots).subspan(10, 3));
  EXPECT_EQ(arena->used_slots(), 61);
  std::vector<uint8_t*> again;
  ASSERT_OK(arena->Allocate(3, &again));  // reuses the freed slots
  EXPECT_EQ(arena->used_slots(), 64);
  arena->Free(again);
  arena->Free(absl::MakeConstSpan(slots).subspan(0, 10));
  arena->Free(absl::MakeConstSpan(slots).subspan(13));
  EXPECT_EQ(arena->used_bytes(), 0);
}

TEST(ArenaTest, RegistersWithTheTransportOnce) {
  auto transport = transport::CreateInProcessTransport();
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create({4 << 20, true}, transport.get()));
  EXPECT_TRUE(arena->registered());
  EXPECT_TRUE(arena->hugepages() == "hugetlb" || arena->hugepages() == "thp" ||
              arena->hugepages() == "none");
  ASSERT_OK_AND_ASSIGN(auto plain, Arena::Create({1 << 20, false}, nullptr));
  EXPECT_FALSE(plain->registered());
  EXPECT_EQ(plain->hugepages(), "none");
}

TEST(ArenaTest, EmptyArenaHoldsNothing) {
  ASSERT_OK_AND_ASSIGN(auto arena, Arena::Create({0, true}, nullptr));
  ASSERT_OK(arena->EnsureSlotBytes(64));
  std::vector<uint8_t*> slots;
  EXPECT_THAT(arena->Allocate(1, &slots), StatusIs(absl::StatusCode::kResourceExhausted));
}

}  // namespace
}  // namespace kvrecall::kvstore
