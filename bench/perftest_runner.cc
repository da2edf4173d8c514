#include "bench/perftest_runner.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/logging.h"
#include "common/status_macros.h"

extern char** environ;

namespace kvrecall::bench {
namespace {

using SteadyClock = std::chrono::steady_clock;

std::string Tail(const std::string& s, size_t n = 2000) { return s.size() <= n ? s : s.substr(s.size() - n); }

// A port nobody listens on right now (the kernel's pick for an ephemeral bind).
absl::StatusOr<int> FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  if (port <= 0) return absl::UnavailableError("no free TCP port");
  return port;
}

// True when some socket listens on `port` (any address), per /proc/net/tcp{,6}. A probe
// connection is not an option: ucx_perftest's server would take it for its client.
bool Listening(int port) {
  for (const char* file : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(file);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (f.size() < 4 || f[3] != "0A") continue;  // 0A = LISTEN
      const size_t colon = f[1].rfind(':');
      if (colon == absl::string_view::npos) continue;
      int p = 0;
      if (absl::SimpleHexAtoi(f[1].substr(colon + 1), &p) && p == port) return true;
    }
  }
  return false;
}

struct Child {
  pid_t pid = -1;
  int out_fd = -1;  // read end of its stdout + stderr when captured
};

absl::StatusOr<Child> Spawn(const std::string& path, const std::vector<std::string>& args,
                            const std::vector<std::string>& env, bool capture) {
  std::vector<char*> argv, envp;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  int pipe_fds[2] = {-1, -1};
  if (capture && ::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    return absl::UnavailableError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  if (capture) {
    posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], 2);
  } else {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
  // Our UCX sockets and other descriptors stay with us.
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);
#endif
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Its own process group, so that a kill reaches nothing of ours.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  Child child;
  const int rc = ::posix_spawn(&child.pid, path.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (capture) ::close(pipe_fds[1]);
  if (rc != 0) {
    if (capture) ::close(pipe_fds[0]);
    return absl::UnavailableError(absl::StrCat("posix_spawn ", path, ": ", std::strerror(rc)));
  }
  child.out_fd = capture ? pipe_fds[0] : -1;
  return child;
}

// Waits for the child until `deadline`; kills it (SIGKILL) after. Returns its wait status, or
// nullopt when it had to be killed.
std::optional<int> WaitUntil(pid_t pid, SteadyClock::time_point deadline) {
  int status = 0;
  while (true) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return std::nullopt;
    if (SteadyClock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return std::nullopt;
}

// Reads everything from fd until EOF or the deadline.
std::string ReadAll(int fd, SteadyClock::time_point deadline, bool* timed_out) {
  std::string out;
  char buf[4096];
  *timed_out = false;
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now()).count();
    if (left <= 0) {
      *timed_out = true;
      break;
    }
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

std::vector<std::string> ChildEnv(const PerftestOptions& o) {
  const std::string devices = ResolveNetDevices(o.tls, o.net_devices);
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    absl::string_view v = *e;
    if (!o.tls.empty() && absl::StartsWith(v, "UCX_TLS=")) continue;
    if (absl::StartsWith(v, "UCX_NET_DEVICES=")) continue;
    env.emplace_back(v);
  }
  if (!o.tls.empty()) env.push_back("UCX_TLS=" + o.tls);
  if (!devices.empty()) env.push_back("UCX_NET_DEVICES=" + devices);
  return env;
}

absl::StatusOr<PerftestResult> RunOnce(const std::string& path, const PerftestOptions& o) {
  ASSIGN_OR_RETURN(const int port, FreePort());
  const std::vector<std::string> env = ChildEnv(o);
  const int64_t warmup = o.warmup >= 0 ? o.warmup : std::max<int64_t>(1, o.iterations / 10);
  const auto timeout = absl::ToChronoMilliseconds(o.timeout);
  const auto server_deadline = SteadyClock::now() + timeout;
  ASSIGN_OR_RETURN(Child server, Spawn(path, {"-p", std::to_string(port)}, env, /*capture=*/false));
  // Every way out below reaps the server (killing it if needed) exactly once.
  absl::Cleanup reap_server = [&] { WaitUntil(server.pid, SteadyClock::now()); };
  // The server prints nothing until a client connects; wait until it listens.
  const auto listen_deadline = SteadyClock::now() + std::chrono::seconds(10);
  while (!Listening(port) && SteadyClock::now() < listen_deadline) {
    int st;
    if (::waitpid(server.pid, &st, WNOHANG) == server.pid) {
      std::move(reap_server).Cancel();  // already reaped
      return absl::UnavailableError(absl::StrCat("ucx_perftest server on port ", port, " exited before listening"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!Listening(port)) {
    return absl::UnavailableError(absl::StrCat("ucx_perftest server did not listen on port ", port, " within 10 s"));
  }
  const auto client_deadline = SteadyClock::now() + timeout;
  ASSIGN_OR_RETURN(Child client,
                   Spawn(path,
                         {"127.0.0.1", "-p", std::to_string(port), "-t", "ucp_put_bw", "-s",
                          std::to_string(o.message_bytes), "-n", std::to_string(o.iterations), "-w",
                          std::to_string(warmup)},
                         env, /*capture=*/true));
  bool timed_out = false;
  const std::string output = ReadAll(client.out_fd, client_deadline, &timed_out);
  ::close(client.out_fd);
  const std::optional<int> client_status = WaitUntil(client.pid, timed_out ? SteadyClock::now() : client_deadline);
  // The server exits after its one client; give it a few seconds, then kill it.
  std::move(reap_server).Cancel();
  WaitUntil(server.pid, std::min(server_deadline, SteadyClock::now() + std::chrono::seconds(5)));
  if (timed_out || !client_status.has_value()) {
    return absl::DeadlineExceededError(absl::StrCat("ucx_perftest -s ", o.message_bytes, " -n ", o.iterations,
                                                    " did not finish within ", absl::FormatDuration(o.timeout)));
  }
  if (!WIFEXITED(*client_status) || WEXITSTATUS(*client_status) != 0) {
    return absl::UnavailableError(absl::StrCat("ucx_perftest client failed (wait status ", *client_status,
                                               "):\n", Tail(output)));
  }
  absl::StatusOr<PerftestResult> r = ParsePerftestFinal(output);
  if (!r.ok()) return absl::InvalidArgumentError(absl::StrCat(r.status().message(), "; output:\n", Tail(output)));
  return r;
}

}  // namespace

bool ContainsTcp(const std::string& tls) {
  for (absl::string_view t : absl::StrSplit(tls, ',')) {
    if (absl::StripAsciiWhitespace(t) == "tcp") return true;
  }
  return false;
}

std::string ResolveNetDevices(const std::string& tls, const std::string& net_devices) {
  if (net_devices != "auto") return net_devices;
  return ContainsTcp(tls) ? "lo" : "";
}

absl::StatusOr<PerftestResult> ParsePerftestFinal(absl::string_view output) {
  absl::string_view final_line;
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    absl::string_view l = absl::StripLeadingAsciiWhitespace(line);
    if (absl::ConsumePrefix(&l, "Final:")) final_line = l;
  }
  if (final_line.empty()) return absl::InvalidArgumentError("no \"Final:\" line in ucx_perftest's output");
  std::vector<absl::string_view> f = absl::StrSplit(final_line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
  double v[8];
  if (f.size() != 8) {
    return absl::InvalidArgumentError(absl::StrCat("\"Final:\" line has ", f.size(), " columns, expected 8"));
  }
  for (int i = 0; i < 8; ++i) {
    if (!absl::SimpleAtod(f[i], &v[i])) {
      return absl::InvalidArgumentError(absl::StrCat("\"Final:\" column ", i + 1, " is not a number: ", f[i]));
    }
  }
  PerftestResult r;
  r.iterations = static_cast<int64_t>(v[0]);
  r.latency_p50_us = v[1];
  r.latency_avg_us = v[3];  // lat_overall, as scripts/bench-transport.sh ($5)
  r.mib_per_s = v[5];  // bw_overall, as scripts/bench-transport.sh ($7 of the awk line)
  r.gb_per_s = v[5] * 1048576.0 / 1e9;
  r.msgs_per_s = v[7];
  return r;
}

absl::StatusOr<std::string> FindPerftest(const std::string& binary) {
  auto executable = [](const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
  };
  if (binary.find('/') != std::string::npos) {
    if (executable(binary)) return binary;
    return absl::NotFoundError(absl::StrCat(binary, " is not an executable file"));
  }
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path != nullptr ? path : "/usr/bin:/bin", ':', absl::SkipEmpty())) {
    std::string p = absl::StrCat(dir, "/", binary);
    if (executable(p)) return p;
  }
  return absl::NotFoundError(absl::StrCat(binary, " not found in PATH (Debian package ucx-utils)"));
}

absl::StatusOr<PerftestResult> RunUcxPerftest(const PerftestOptions& options) {
  if (options.message_bytes == 0 || options.iterations < 1 || options.attempts < 1) {
    return absl::InvalidArgumentError("ucx_perftest needs message_bytes > 0, iterations >= 1, attempts >= 1");
  }
  ASSIGN_OR_RETURN(const std::string path, FindPerftest(options.binary));
  absl::Status last;
  for (int attempt = 0; attempt < options.attempts; ++attempt) {
    absl::StatusOr<PerftestResult> r = RunOnce(path, options);
    if (r.ok() || r.status().code() != absl::StatusCode::kUnavailable) return r;
    last = r.status();
    KV_LOG(WARNING) << "ucx_perftest attempt " << attempt + 1 << " failed: " << last;
  }
  return last;
}

}  // namespace kvrecall::bench
