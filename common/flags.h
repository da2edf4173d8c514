// Command-line parsing shared by every kvrecall binary: absl flags, with flag names accepted in
// either spelling (--metrics-port or --metrics_port). Returns the positional arguments
// (argv[0] first), as absl::ParseCommandLine does. It also applies --mutex_deadlock_detection
// (default off; SetMutexDeadlockDetection).
#ifndef KVRECALL_COMMON_FLAGS_H_
#define KVRECALL_COMMON_FLAGS_H_

#include <string>
#include <vector>

namespace kvrecall {

std::vector<std::string> ParseFlags(int argc, char** argv);

// Abseil's mutex deadlock detection on (abort on a lock-order cycle) or off. Debian's Abseil is
// a debug build, where it is on by default: every Mutex lock then updates one process-wide graph
// under one spinlock, which serialises a node's threads (~5 % of a decode step's samples on the
// H100 host). Binaries call this at start; tests keep the library default.
void SetMutexDeadlockDetection(bool on);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_FLAGS_H_
