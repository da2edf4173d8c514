#include "common/logging.h"

#include <cstdio>
#include <cstring>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvrecall::internal {

LogMessage::LogMessage(char severity, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  stream_ << severity << absl::FormatTime("%Y%m%d %H:%M:%E3S", absl::Now(), absl::LocalTimeZone())
          << ' ' << (base ? base + 1 : file) << ':' << line << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  const std::string s = stream_.str();
  std::fwrite(s.data(), 1, s.size(), stderr);
}

}  // namespace kvrecall::internal
