#include "common/pem.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status_macros.h"

namespace kvrecall {

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view what) {
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path, what));
  if (!absl::StrContains(pem, "-----BEGIN")) {
    return absl::DataLossError(absl::StrCat(what, ": '", path, "' holds no PEM block"));
  }
  return pem;
}

}  // namespace kvrecall
