// Framing for the opaque UCX blobs that travel inside a RemoteRegion (worker address, packed rkey).
//
// UCX trusts these bytes completely: ucp_ep_create and ucp_ep_rkey_unpack take no length and parse
// whatever they are given, so truncated or foreign bytes can crash the process. Every blob we hand
// out is therefore sealed with a magic, its kind, its length and a 64-bit checksum, and Connect
// opens (verifies) it before UCX sees it. This catches corruption, truncation, descriptors from
// another transport and rkeys paired with another region's base/length; it is not a defense
// against a deliberately forged descriptor (the control plane is trusted).
//
// Layout (host byte order; both ends run the same build):
//   [0,4) magic "KVRU" | [4] version=1 | [5] kind | [6,8) zero | [8,12) payload bytes |
//   [12,16) zero | [16,24) FNV-1a 64 over (kind, binding, payload) | [24, 24+n) payload
#ifndef KVRECALL_TRANSPORT_INTERNAL_ENVELOPE_H_
#define KVRECALL_TRANSPORT_INTERNAL_ENVELOPE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall::transport::internal {

enum class BlobKind : uint8_t { kWorkerAddress = 1, kRkey = 2 };

inline constexpr size_t kEnvelopeHeaderBytes = 24;
// Larger payloads are refused on both sides; UCX addresses and rkeys are a few hundred bytes.
inline constexpr size_t kMaxEnvelopePayloadBytes = 64 * 1024;

// Returns the sealed form of `payload`. `binding` is folded into the checksum and must be given
// again to OpenBlob (e.g. a hash of the region's base and length for an rkey, 0 for an address).
// REQUIRES: 0 < payload.size() <= kMaxEnvelopePayloadBytes.
std::string SealBlob(BlobKind kind, absl::string_view payload, uint64_t binding);

// Verifies `sealed` and returns its payload (a view into `sealed`). INVALID_ARGUMENT when the
// bytes are not a well-formed blob of `kind` sealed with `binding`.
absl::StatusOr<absl::string_view> OpenBlob(BlobKind kind, absl::string_view sealed,
                                           uint64_t binding);

// Binding for an rkey: ties it to the region (base, length) it was packed for.
uint64_t RegionBinding(uint64_t base, uint64_t length);

}  // namespace kvrecall::transport::internal

#endif  // KVRECALL_TRANSPORT_INTERNAL_ENVELOPE_H_
