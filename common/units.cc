#include "common/units.h"

#include <cctype>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvrecall {

absl::StatusOr<int64_t> ParseBytes(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t i = 0;
  while (i < t.size() && std::isdigit(static_cast<unsigned char>(t[i]))) ++i;
  uint64_t n = 0;
  if (i == 0 || i > 18 || !absl::SimpleAtoi(t.substr(0, i), &n) || n == 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad size '", text, "' (want e.g. 512MiB, 8GiB)"));
  }
  std::string unit = absl::AsciiStrToUpper(t.substr(i));
  int shift = 0;
  if (unit.empty() || unit == "B") {
    shift = 0;
  } else if (unit == "K" || unit == "KB" || unit == "KIB") {
    shift = 10;
  } else if (unit == "M" || unit == "MB" || unit == "MIB") {
    shift = 20;
  } else if (unit == "G" || unit == "GB" || unit == "GIB") {
    shift = 30;
  } else if (unit == "T" || unit == "TB" || unit == "TIB") {
    shift = 40;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("bad size unit in '", text, "'"));
  }
  if (n > (uint64_t{1} << (62 - shift))) return absl::InvalidArgumentError(absl::StrCat("size '", text, "' too large"));
  return static_cast<int64_t>(n << shift);
}

std::string FormatBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.2f %s", v, units[u]);
}

}  // namespace kvrecall
