#include "tests/testing/process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

extern char** environ;

namespace kvrecall::testing {

std::string BinDir() {
  const char* d = std::getenv("KVRECALL_BIN_DIR");
  return d != nullptr ? d : "build/bin";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<Process> Process::Start(const std::vector<std::string>& argv, const std::string& log_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return absl::InternalError(absl::StrCat("spawn ", argv[0], ": ", strerror(rc)));
  return Process(pid);
}

Process::Process(Process&& other) noexcept : pid_(other.pid_), status_(other.status_) { other.pid_ = -1; }

Process::~Process() { Stop(); }

bool Process::running() {
  if (pid_ < 0) return false;
  int st;
  const pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = st;
    pid_ = -1;
    return false;
  }
  return true;
}

absl::StatusOr<int> Process::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (running()) {
    if (absl::Now() > deadline) return absl::DeadlineExceededError("process did not exit in time");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (WIFEXITED(status_)) return WEXITSTATUS(status_);
  return 128 + WTERMSIG(status_);
}

void Process::Stop() {
  if (!running()) return;
  kill(pid_, SIGTERM);
  if (!Wait(absl::Seconds(10)).ok() && pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, &status_, 0);
    pid_ = -1;
  }
}

std::string ServerProcess::address() const { return absl::StrCat("127.0.0.1:", port); }

absl::StatusOr<ServerProcess> StartServer(const std::string& dir, const std::vector<std::string>& extra_flags) {
  const std::string port_file = dir + "/server.port";
  std::remove(port_file.c_str());
  std::vector<std::string> argv = {BinDir() + "/kvrecall-server", "--listen=127.0.0.1:0", "--metrics-port=0",
                                   "--metrics-host=127.0.0.1", "--port-file=" + port_file, "--ucx-tls=tcp"};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  auto p = Process::Start(argv, dir + "/server.log");
  if (!p.ok()) return p.status();
  ServerProcess s{std::move(*p)};
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (true) {
    std::ifstream in(port_file);
    if (in >> s.port >> s.metrics_port) return s;
    if (!s.process.running()) {
      return absl::InternalError(absl::StrCat("server exited early: ", ReadFile(dir + "/server.log")));
    }
    if (absl::Now() > deadline) return absl::DeadlineExceededError("server did not start in 30 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace kvrecall::testing
