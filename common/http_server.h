// A tiny HTTP/1.0 server for operational endpoints (/metrics, /healthz). One background thread,
// one request per connection, bounded request size; not for data traffic.
//
// Thread safety: Start/Stop from one thread; handlers run on the server thread.
#ifndef KVRECALL_COMMON_HTTP_SERVER_H_
#define KVRECALL_COMMON_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace kvrecall {

class HttpServer {
 public:
  // Returns the body; content type is text/plain (Prometheus text format 0.0.4).
  using Handler = std::function<std::string()>;

  HttpServer() = default;
  ~HttpServer();  // Stops the server.

  // Registers `path` (exact match). REQUIRES: before Start.
  void Handle(const std::string& path, Handler handler);

  // Binds host:port (port 0 = ephemeral) and starts serving. Returns the bound port.
  absl::StatusOr<int> Start(const std::string& host, int port);
  void Stop();

 private:
  void Loop();

  std::map<std::string, Handler> handlers_;
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_HTTP_SERVER_H_
