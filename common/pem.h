// PEM files (TLS certificates, keys and CA bundles) as gRPC's credentials take them.
#ifndef KVRECALL_COMMON_PEM_H_
#define KVRECALL_COMMON_PEM_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// The contents of a PEM file: NOT_FOUND when it cannot be read, DATA_LOSS when it holds no
// "-----BEGIN" block. `what` names the file in messages (e.g. "--tls-cert").
absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view what);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_PEM_H_
