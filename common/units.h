// Parsing of human byte sizes for flags: "1073741824", "512MiB", "8GiB", "64M", "2G", "1TiB".
// Suffixes K/M/G/T with or without "iB"/"B" are powers of 1024.
#ifndef KVRECALL_COMMON_UNITS_H_
#define KVRECALL_COMMON_UNITS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// INVALID_ARGUMENT for anything else, zero, or overflow.
absl::StatusOr<int64_t> ParseBytes(absl::string_view text);
std::string FormatBytes(int64_t bytes);  // "1.50 GiB"

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_UNITS_H_
