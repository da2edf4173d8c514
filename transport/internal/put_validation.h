// Checks shared by every RemoteWriter implementation, run before anything is sent or read.
#ifndef KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_
#define KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace kvrecall::transport::internal {

inline const void* LocalBuffer(const PutOp& op) { return op.src; }
inline const void* LocalBuffer(const GetOp& op) { return op.dst; }

// OK when every op lies within [0, region_length) of the remote region (overflow-safe).
// OUT_OF_RANGE names the first op that does not; INVALID_ARGUMENT for a null local buffer (`src`
// of a put, `dst` of a get) with a nonzero length. Zero-length ops are always valid.
template <typename Op>
absl::Status ValidateOps(absl::Span<const Op> ops, uint64_t region_length) {
  constexpr const char* kKind = std::is_same_v<Op, PutOp> ? "put" : "get";
  for (size_t i = 0; i < ops.size(); ++i) {
    const Op& op = ops[i];
    if (op.length == 0) continue;
    if (LocalBuffer(op) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(kKind, " op ", i, ": null local buffer"));
    }
    if (op.remote_offset > region_length || op.length > region_length - op.remote_offset) {
      return absl::OutOfRangeError(absl::StrCat(kKind, " op ", i, ": [", op.remote_offset, ", +",
                                                op.length, ") outside remote region of ",
                                                region_length, " bytes"));
    }
  }
  return absl::OkStatus();
}

inline absl::Status ValidatePutOps(absl::Span<const PutOp> ops, uint64_t region_length) {
  return ValidateOps(ops, region_length);
}
inline absl::Status ValidateGetOps(absl::Span<const GetOp> ops, uint64_t region_length) {
  return ValidateOps(ops, region_length);
}

}  // namespace kvrecall::transport::internal

#endif  // KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_
