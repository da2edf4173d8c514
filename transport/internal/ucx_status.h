// The one converter from UCX's ucs_status_t to absl::Status (CONVENTIONS.md: one per foreign type).
#ifndef KVRECALL_TRANSPORT_INTERNAL_UCX_STATUS_H_
#define KVRECALL_TRANSPORT_INTERNAL_UCX_STATUS_H_

#include <ucs/type/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvrecall::transport::internal {

// Maps `status` to the code that tells the caller what to do: connection-level failures
// (unreachable, reset, timed out, canceled by a failed endpoint) become UNAVAILABLE, bad
// arguments INVALID_ARGUMENT, allocation failures RESOURCE_EXHAUSTED, anything unexpected
// INTERNAL. The message is "<context>: <UCX's own string>". UCS_OK maps to OK.
// REQUIRES: status != UCS_INPROGRESS (a pending request is not a result).
absl::Status UcsToStatus(ucs_status_t status, absl::string_view context);

}  // namespace kvrecall::transport::internal

#endif  // KVRECALL_TRANSPORT_INTERNAL_UCX_STATUS_H_
