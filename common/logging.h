// Minimal structured-ish logging to stderr (Debian's Abseil predates absl/log).
//   KV_LOG(INFO) << "listening on " << addr;
// Lines look like: "I20261122 13:45:01.123 server.cc:42] listening on ...".
#ifndef KVRECALL_COMMON_LOGGING_H_
#define KVRECALL_COMMON_LOGGING_H_

#include <sstream>

namespace kvrecall::internal {

class LogMessage {
 public:
  LogMessage(char severity, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

}  // namespace kvrecall::internal

#define KV_LOG_SEVERITY_INFO 'I'
#define KV_LOG_SEVERITY_WARNING 'W'
#define KV_LOG_SEVERITY_ERROR 'E'
#define KV_LOG(sev) ::kvrecall::internal::LogMessage(KV_LOG_SEVERITY_##sev, __FILE__, __LINE__).stream()

#endif  // KVRECALL_COMMON_LOGGING_H_
