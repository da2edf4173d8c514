#include "common/pem.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvrecall {

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot read '", path, "'"));
  std::ostringstream s;
  s << in.rdbuf();
  if (!absl::StrContains(s.str(), "-----BEGIN")) {
    return absl::DataLossError(absl::StrCat(what, ": '", path, "' holds no PEM block"));
  }
  return s.str();
}

}  // namespace kvrecall
