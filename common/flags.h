// Command-line parsing shared by every kvrecall binary: absl flags, with flag names accepted in
// either spelling (--metrics-port or --metrics_port). Returns the positional arguments
// (argv[0] first), as absl::ParseCommandLine does.
#ifndef KVRECALL_COMMON_FLAGS_H_
#define KVRECALL_COMMON_FLAGS_H_

#include <string>
#include <vector>

namespace kvrecall {

std::vector<std::string> ParseFlags(int argc, char** argv);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_FLAGS_H_
