// Whole small files (keys, tokens, configs) read into memory.
#ifndef KVRECALL_COMMON_FILE_H_
#define KVRECALL_COMMON_FILE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// The bytes of `path`: NOT_FOUND when it cannot be opened, DATA_LOSS on a read error. `what`
// names the file in messages (e.g. "--tls-cert", "token file").
absl::StatusOr<std::string> ReadFileToString(const std::string& path, absl::string_view what);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_FILE_H_
