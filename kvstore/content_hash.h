// Content keys of KV blocks: the fixed, documented hash behind prefix sharing.
//
// A full block of `block_tokens` tokens is keyed by
//   key(i) = SipHash-2-4-128(K, enc(key(i-1), namespace, model_id, token_ids of block i))
// with key(-1) = 0 (both halves), K = the 16 ASCII bytes "kvrecall-blk-v1\0", and
//   enc = parent.lo (u64 LE) | parent.hi (u64 LE)
//       | len(namespace) (u32 LE) | namespace bytes
//       | len(model_id) (u32 LE) | model_id bytes
//       | n_tokens (u32 LE) | token ids (each i32 as u32 LE)
// SipHash-2-4 with 128-bit output is the reference algorithm of Aumasson & Bernstein
// (github.com/veorq/SipHash, vectors_sip128); the key is a constant, never a per-process seed,
// so keys are stable across processes, restarts and machines (spill/durability can store them).
// The namespace is "t:<tenant>" for an isolated tenant and "s:shared" for the operator-configured
// shared namespace, so equal prompts of different tenants get unrelated keys.
//
// Keys are not trusted alone: the block table also compares namespace, model and token ids of a
// candidate block before sharing it (block_table.h), so a collision costs a cache miss at worst.
#ifndef KVRECALL_KVSTORE_CONTENT_HASH_H_
#define KVRECALL_KVSTORE_CONTENT_HASH_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvrecall::kvstore {

struct ContentKey {
  uint64_t lo = 0;  // bytes 0..7 of the SipHash-128 output, little-endian
  uint64_t hi = 0;  // bytes 8..15

  friend bool operator==(const ContentKey& a, const ContentKey& b) {
    return a.lo == b.lo && a.hi == b.hi;
  }
  friend bool operator!=(const ContentKey& a, const ContentKey& b) { return !(a == b); }
  template <typename H>
  friend H AbslHashValue(H h, const ContentKey& k) {
    return H::combine(std::move(h), k.lo, k.hi);
  }
  // 32 lowercase hex digits of the 16 output bytes in order.
  std::string ToHex() const;
};

// SipHash-2-4 with 128-bit output over data[0, n) under a 16-byte key.
std::array<uint8_t, 16> SipHash24_128(const std::array<uint8_t, 16>& key, const void* data,
                                      size_t n);

// key(i) from key(i-1) (ContentKey{} for the first block); see the header comment.
ContentKey BlockContentKey(const ContentKey& parent, absl::string_view share_namespace,
                           absl::string_view model_id, absl::Span<const int32_t> token_ids);

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_CONTENT_HASH_H_
