// Checks shared by every RemoteWriter implementation, run before anything is sent.
#ifndef KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_
#define KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transport/transport.h"

namespace kvrecall::transport::internal {

// OK when every op lies within [0, region_length) of the remote region (overflow-safe).
// OUT_OF_RANGE names the first op that does not; INVALID_ARGUMENT for a null `src` with a nonzero
// length. Zero-length ops are always valid.
inline absl::Status ValidatePutOps(absl::Span<const PutOp> ops, uint64_t region_length) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const PutOp& op = ops[i];
    if (op.length == 0) continue;
    if (op.src == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("put op ", i, ": null src"));
    }
    if (op.remote_offset > region_length || op.length > region_length - op.remote_offset) {
      return absl::OutOfRangeError(absl::StrCat("put op ", i, ": [", op.remote_offset, ", +",
                                                op.length, ") outside remote region of ",
                                                region_length, " bytes"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::transport::internal

#endif  // KVRECALL_TRANSPORT_INTERNAL_PUT_VALIDATION_H_
