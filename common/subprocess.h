// Child processes: start a binary with its output in a log file, wait for it, and always stop it
// (SIGTERM, then SIGKILL) when the handle goes away. Used by the multi-process tests and by the
// benchmarks that run a kvrecall-server beside themselves.
#ifndef KVRECALL_COMMON_SUBPROCESS_H_
#define KVRECALL_COMMON_SUBPROCESS_H_

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvrecall {

class Subprocess {
 public:
  // Starts `argv` (argv[0] = path) with stdout+stderr appended to `log_path`. INTERNAL when it
  // cannot be spawned.
  static absl::StatusOr<Subprocess> Start(const std::vector<std::string>& argv,
                                          const std::string& log_path);
  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&&) = delete;
  ~Subprocess();  // Stop()

  // Waits up to `timeout` for exit; returns the exit code (or 128 + signal). DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  // SIGTERM; SIGKILL when it has not exited 10 s later.
  void Stop();
  pid_t pid() const { return pid_; }
  bool running();

 private:
  explicit Subprocess(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  int status_ = -1;
};

// Waits until `port_file` holds `count` whitespace-separated ports (what a kvrecall binary's
// --port_file writes once it serves) and returns them. INTERNAL with the log's text when the
// process exits first; DEADLINE_EXCEEDED after `timeout`.
absl::StatusOr<std::vector<int>> WaitForPorts(Subprocess& process, const std::string& port_file,
                                              int count, const std::string& log_path,
                                              absl::Duration timeout);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_SUBPROCESS_H_
