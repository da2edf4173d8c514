// Child processes for multi-process tests: kvrecall binaries from the build, a kvrecall-server on
// an ephemeral port (common/subprocess.h starts and stops them).
#ifndef KVRECALL_TESTS_TESTING_PROCESS_H_
#define KVRECALL_TESTS_TESTING_PROCESS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/subprocess.h"

namespace kvrecall::testing {

// Directory of the built binaries: $KVRECALL_BIN_DIR (set by CTest), else "build/bin".
std::string BinDir();

using Process = ::kvrecall::Subprocess;

// A kvrecall-server on an ephemeral loopback port.
struct ServerProcess {
  Process process;
  int port = 0;
  int metrics_port = 0;
  std::string address() const;  // "127.0.0.1:<port>"
};
absl::StatusOr<ServerProcess> StartServer(const std::string& dir, const std::vector<std::string>& extra_flags = {});

std::string ReadFile(const std::string& path);

}  // namespace kvrecall::testing

#endif  // KVRECALL_TESTS_TESTING_PROCESS_H_
