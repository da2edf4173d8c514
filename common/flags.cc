#include "common/flags.h"

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/synchronization/mutex.h"

ABSL_FLAG(bool, mutex_deadlock_detection, false,
          "Track the lock order of every absl::Mutex and abort on a cycle. Debian's Abseil is a "
          "debug build, where this is on by default and every lock updates one process-wide "
          "graph under one spinlock; kvrecall binaries leave it off unless asked.");

namespace kvrecall {

std::vector<std::string> ParseFlags(int argc, char** argv) {
  // Rewrite "--a-b-c[=v]" to "--a_b_c[=v]" (names only; values and positionals untouched).
  std::vector<std::string> storage(argv, argv + argc);
  bool flags_done = false;
  for (size_t i = 1; i < storage.size(); ++i) {
    std::string& a = storage[i];
    if (a == "--") flags_done = true;
    if (flags_done || a.size() < 3 || a[0] != '-') continue;
    const size_t start = a[1] == '-' ? 2 : 1;
    const size_t end = a.find('=') == std::string::npos ? a.size() : a.find('=');
    for (size_t j = start; j < end; ++j) {
      if (a[j] == '-') a[j] = '_';
    }
  }
  std::vector<char*> ptrs;
  for (auto& s : storage) ptrs.push_back(s.data());
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(ptrs.size()), ptrs.data());
  SetMutexDeadlockDetection(absl::GetFlag(FLAGS_mutex_deadlock_detection));
  return std::vector<std::string>(rest.begin(), rest.end());
}

void SetMutexDeadlockDetection(bool on) {
  absl::SetMutexDeadlockDetectionMode(on ? absl::OnDeadlockCycle::kAbort
                                         : absl::OnDeadlockCycle::kIgnore);
}

}  // namespace kvrecall
