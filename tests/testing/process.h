// Child processes for multi-process tests: start a kvrecall binary, wait for the port it bound,
// and always stop it (SIGTERM, then SIGKILL) when the handle goes away.
#ifndef KVRECALL_TESTS_TESTING_PROCESS_H_
#define KVRECALL_TESTS_TESTING_PROCESS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvrecall::testing {

// Directory of the built binaries: $KVRECALL_BIN_DIR (set by CTest), else "build/bin".
std::string BinDir();

class Process {
 public:
  // Starts `argv` (argv[0] = path) with stdout+stderr appended to `log_path`.
  static absl::StatusOr<Process> Start(const std::vector<std::string>& argv, const std::string& log_path);
  Process(Process&& other) noexcept;
  Process& operator=(Process&&) = delete;
  ~Process();  // Stop()

  // Waits up to `timeout` for exit; returns the exit code (or 128 + signal). DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  void Stop();
  pid_t pid() const { return pid_; }
  bool running();

 private:
  explicit Process(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  int status_ = -1;
};

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
