#include "kvstore/content_hash.h"

#include <array>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"

namespace kvrecall::kvstore {
namespace {

std::string Hex(const std::array<uint8_t, 16>& b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t c : b) {
    s += d[c >> 4];
    s += d[c & 15];
  }
  return s;
}

// Reference vectors of SipHash-2-4 with 128-bit output (veorq/SipHash vectors_sip128):
// key = 00 01 .. 0f, message = 00 01 .. (len - 1).
TEST(ContentHashTest, SipHash128MatchesReferenceVectors) {
  std::array<uint8_t, 16> key;
  std::iota(key.begin(), key.end(), 0);
  std::vector<uint8_t> msg(16);
  std::iota(msg.begin(), msg.end(), 0);
  EXPECT_EQ(Hex(SipHash24_128(key, msg.data(), 0)), "a3817f04ba25a8e66df67214c7550293");
  EXPECT_EQ(Hex(SipHash24_128(key, msg.data(), 1)), "da87c1d86b99af44347659119b22fc45");
  EXPECT_EQ(Hex(SipHash24_128(key, msg.data(), 2)), "8177228da4a45dc7fca38bdef60affe4");
  EXPECT_EQ(Hex(SipHash24_128(key, msg.data(), 3)), "9c70b60c5267a94e5f33b6b02985ed51");
}

// Pinned vectors of the block key: a change here changes every stored key (and, once spill and
// durability exist, invalidates what is on disk), so it must be a deliberate format bump.
TEST(ContentHashTest, BlockKeyVectors) {
  const std::vector<int32_t> tokens = {1, 2, 3, 4};
  const ContentKey k0 = BlockContentKey(ContentKey{}, "t:acme", "llama-3-8b", tokens);
  EXPECT_EQ(k0.ToHex(), "fbeff1abc81110cc1ca5cdb8dcd21a0f");
  const ContentKey k1 = BlockContentKey(k0, "t:acme", "llama-3-8b", tokens);
  EXPECT_EQ(k1.ToHex(), "6e6e322e73fa7576d18bef52e2ad8256");
  const ContentKey shared = BlockContentKey(ContentKey{}, "s:shared", "llama-3-8b", tokens);
  EXPECT_EQ(shared.ToHex(), "369faf8c10923ffdcb272fe62d0a3eae");
}

TEST(ContentHashTest, EveryInputChangesTheKey) {
  const std::vector<int32_t> a = {1, 2, 3, 4}, b = {1, 2, 3, 5};
  const ContentKey base = BlockContentKey(ContentKey{}, "t:x", "m", a);
  EXPECT_EQ(base, BlockContentKey(ContentKey{}, "t:x", "m", a)) << "deterministic";
  EXPECT_NE(base, BlockContentKey(ContentKey{}, "t:x", "m", b));
  EXPECT_NE(base, BlockContentKey(ContentKey{}, "t:y", "m", a));
  EXPECT_NE(base, BlockContentKey(ContentKey{}, "t:x", "n", a));
  EXPECT_NE(base, BlockContentKey(ContentKey{1, 0}, "t:x", "m", a));
  // Length prefixes keep field boundaries apart.
  EXPECT_NE(BlockContentKey(ContentKey{}, "t:xm", "", a),
            BlockContentKey(ContentKey{}, "t:x", "m", a));
}

}  // namespace
}  // namespace kvrecall::kvstore
