#include "kvstore/content_hash.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace kvrecall::kvstore {
namespace {

inline uint64_t Rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline void Store64(uint64_t v, uint8_t* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

struct SipState {
  uint64_t v0, v1, v2, v3;
  void Round() {
    v0 += v1;
    v1 = Rotl(v1, 13);
    v1 ^= v0;
    v0 = Rotl(v0, 32);
    v2 += v3;
    v3 = Rotl(v3, 16);
    v3 ^= v2;
    v0 += v3;
    v3 = Rotl(v3, 21);
    v3 ^= v0;
    v2 += v1;
    v1 = Rotl(v1, 17);
    v1 ^= v2;
    v2 = Rotl(v2, 32);
  }
};

void Append32(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}
void Append64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

constexpr std::array<uint8_t, 16> kBlockKey = {'k', 'v', 'r', 'e', 'c', 'a', 'l', 'l',
                                               '-', 'b', 'l', 'k', '-', 'v', '1', 0};

}  // namespace

std::string ContentKey::ToHex() const {
  uint8_t b[16];
  Store64(lo, b);
  Store64(hi, b + 8);
  std::string s;
  for (uint8_t c : b) s += absl::StrFormat("%02x", c);
  return s;
}

std::array<uint8_t, 16> SipHash24_128(const std::array<uint8_t, 16>& key, const void* data,
                                      size_t n) {
  const uint8_t* in = static_cast<const uint8_t*>(data);
  const uint64_t k0 = Load64(key.data()), k1 = Load64(key.data() + 8);
  SipState s{0x736f6d6570736575ULL ^ k0, 0x646f72616e646f6dULL ^ k1, 0x6c7967656e657261ULL ^ k0,
             0x7465646279746573ULL ^ k1};
  s.v1 ^= 0xee;  // 128-bit output variant
  const size_t full = n - n % 8;
  for (size_t i = 0; i < full; i += 8) {
    const uint64_t m = Load64(in + i);
    s.v3 ^= m;
    s.Round();
    s.Round();
    s.v0 ^= m;
  }
  uint64_t b = static_cast<uint64_t>(n) << 56;
  for (size_t i = 0; i < n % 8; ++i) b |= static_cast<uint64_t>(in[full + i]) << (8 * i);
  s.v3 ^= b;
  s.Round();
  s.Round();
  s.v0 ^= b;
  s.v2 ^= 0xee;
  for (int i = 0; i < 4; ++i) s.Round();
  std::array<uint8_t, 16> out;
  Store64(s.v0 ^ s.v1 ^ s.v2 ^ s.v3, out.data());
  s.v1 ^= 0xdd;
  for (int i = 0; i < 4; ++i) s.Round();
  Store64(s.v0 ^ s.v1 ^ s.v2 ^ s.v3, out.data() + 8);
  return out;
}

ContentKey BlockContentKey(const ContentKey& parent, absl::string_view share_namespace,
                           absl::string_view model_id, absl::Span<const int32_t> token_ids) {
  std::string msg;
  msg.reserve(16 + 12 + share_namespace.size() + model_id.size() + 4 * token_ids.size());
  Append64(parent.lo, &msg);
  Append64(parent.hi, &msg);
  Append32(static_cast<uint32_t>(share_namespace.size()), &msg);
  msg.append(share_namespace.data(), share_namespace.size());
  Append32(static_cast<uint32_t>(model_id.size()), &msg);
  msg.append(model_id.data(), model_id.size());
  Append32(static_cast<uint32_t>(token_ids.size()), &msg);
  for (int32_t t : token_ids) Append32(static_cast<uint32_t>(t), &msg);
  const std::array<uint8_t, 16> h = SipHash24_128(kBlockKey, msg.data(), msg.size());
  return ContentKey{Load64(h.data()), Load64(h.data() + 8)};
}

}  // namespace kvrecall::kvstore
