#include "transport/internal/envelope.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvrecall::transport::internal {
namespace {

constexpr uint32_t kMagic = 0x5552564B;  // "KVRU" read as little-endian bytes
constexpr uint8_t kVersion = 1;

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;

uint64_t Fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= kFnvPrime;
  }
  return h;
}

uint64_t Checksum(BlobKind kind, uint64_t binding, absl::string_view payload) {
  uint64_t h = kFnvOffset;
  const uint8_t k = static_cast<uint8_t>(kind);
  h = Fnv1a(h, &k, sizeof(k));
  h = Fnv1a(h, &binding, sizeof(binding));
  return Fnv1a(h, payload.data(), payload.size());
}

}  // namespace

std::string SealBlob(BlobKind kind, absl::string_view payload, uint64_t binding) {
  std::string out(kEnvelopeHeaderBytes + payload.size(), '\0');
  char* p = out.data();
  const uint32_t magic = kMagic;
  const uint32_t size = static_cast<uint32_t>(payload.size());
  const uint64_t sum = Checksum(kind, binding, payload);
  std::memcpy(p + 0, &magic, 4);
  p[4] = static_cast<char>(kVersion);
  p[5] = static_cast<char>(kind);
  std::memcpy(p + 8, &size, 4);
  std::memcpy(p + 16, &sum, 8);
  std::memcpy(p + kEnvelopeHeaderBytes, payload.data(), payload.size());
  return out;
}

absl::StatusOr<absl::string_view> OpenBlob(BlobKind kind, absl::string_view sealed,
                                           uint64_t binding) {
  const char* what = kind == BlobKind::kRkey ? "rkey" : "peer address";
  if (sealed.size() <= kEnvelopeHeaderBytes ||
      sealed.size() > kEnvelopeHeaderBytes + kMaxEnvelopePayloadBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", what, ": ", sealed.size(), " bytes"));
  }
  const char* p = sealed.data();
  uint32_t magic, size;
  uint64_t sum;
  std::memcpy(&magic, p + 0, 4);
  std::memcpy(&size, p + 8, 4);
  std::memcpy(&sum, p + 16, 8);
  const bool reserved_zero =
      p[6] == 0 && p[7] == 0 && p[12] == 0 && p[13] == 0 && p[14] == 0 && p[15] == 0;
  if (magic != kMagic || static_cast<uint8_t>(p[4]) != kVersion ||
      static_cast<uint8_t>(p[5]) != static_cast<uint8_t>(kind) || !reserved_zero) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", what, ": not a kvrecall UCX descriptor"));
  }
  if (size != sealed.size() - kEnvelopeHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("malformed ", what, ": length mismatch"));
  }
  const absl::string_view payload = sealed.substr(kEnvelopeHeaderBytes);
  if (Checksum(kind, binding, payload) != sum) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", what, ": checksum mismatch (corrupt, or not for this region)"));
  }
  return payload;
}

uint64_t RegionBinding(uint64_t base, uint64_t length) {
  uint64_t h = Fnv1a(kFnvOffset, &base, sizeof(base));
  return Fnv1a(h, &length, sizeof(length));
}

}  // namespace kvrecall::transport::internal
