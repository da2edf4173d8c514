#include "common/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvrecall {

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Handle(const std::string& path, Handler handler) { handlers_[path] = std::move(handler); }

absl::StatusOr<int> HttpServer::Start(const std::string& host, int port) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  int one = 1;
  ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    ::close(fd_);
    fd_ = -1;
    return absl::InvalidArgumentError(absl::StrCat("bad IPv4 address '", host, "'"));
  }
  if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd_, 64) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd_);
    fd_ = -1;
    return absl::UnavailableError(absl::StrCat("metrics listen on ", host, ":", port, ": ", err));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  thread_ = std::thread([this] { Loop(); });
  return static_cast<int>(ntohs(addr.sin_port));
}

void HttpServer::Stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void HttpServer::Loop() {
  while (!stop_) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    timeval tv{2, 0};
    ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    char buf[4096];
    size_t n = 0;
    while (n < sizeof(buf) - 1) {
      const ssize_t r = ::recv(c, buf + n, sizeof(buf) - 1 - n, 0);
      if (r <= 0) break;
      n += static_cast<size_t>(r);
      buf[n] = 0;
      if (std::strstr(buf, "\r\n\r\n") || std::strstr(buf, "\n\n")) break;
    }
    buf[n] = 0;
    std::string status = "404 Not Found", body = "not found\n";
    char method[8] = {0}, path[1024] = {0};
    if (std::sscanf(buf, "%7s %1023s", method, path) == 2) {
      std::string p(path);
      if (const size_t q = p.find('?'); q != std::string::npos) p.resize(q);
      if (std::strcmp(method, "GET") != 0) {
        status = "405 Method Not Allowed";
        body = "only GET\n";
      } else if (auto it = handlers_.find(p); it != handlers_.end()) {
        status = "200 OK";
        body = it->second();
      }
    } else {
      status = "400 Bad Request";
      body = "bad request\n";
    }
    const std::string resp = absl::StrCat("HTTP/1.0 ", status,
                                          "\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: ",
                                          body.size(), "\r\nConnection: close\r\n\r\n", body);
    size_t off = 0;
    while (off < resp.size()) {
      const ssize_t w = ::send(c, resp.data() + off, resp.size() - off, MSG_NOSIGNAL);
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    ::close(c);
  }
}

}  // namespace kvrecall
