#include "tests/testing/process.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

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
  ASSIGN_OR_RETURN(std::vector<int> ports,
                   WaitForPorts(s.process, port_file, 2, dir + "/server.log", absl::Seconds(30)));
  s.port = ports[0];
  s.metrics_port = ports[1];
  return s;
}

}  // namespace kvrecall::testing
