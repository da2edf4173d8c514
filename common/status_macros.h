// RETURN_IF_ERROR / ASSIGN_OR_RETURN: Debian's Abseil (20220623) ships neither.
#ifndef KVRECALL_COMMON_STATUS_MACROS_H_
#define KVRECALL_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVRECALL_CONCAT_INNER_(a, b) a##b
#define KVRECALL_CONCAT_(a, b) KVRECALL_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if not OK.
#define RETURN_IF_ERROR(expr)                                   \
  do {                                                          \
    ::absl::Status _kvrecall_status = (expr);                   \
    if (!_kvrecall_status.ok()) return _kvrecall_status;        \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on error returns its
// status, otherwise moves the value into `lhs` (which may be a declaration: `auto x`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  KVRECALL_ASSIGN_OR_RETURN_IMPL_(KVRECALL_CONCAT_(_kvrecall_statusor_, __LINE__), lhs, expr)
#define KVRECALL_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                     \
  if (!tmp.ok()) return std::move(tmp).status();         \
  lhs = std::move(tmp).value()

#endif  // KVRECALL_COMMON_STATUS_MACROS_H_
