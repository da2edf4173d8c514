// "--name=value" arguments of a kvrecall-bench subcommand, parsed once; each benchmark reads the
// flags it knows and then asks whether any were left unread (a typo is an error, not a default).
#ifndef KVRECALL_BENCH_FLAG_MAP_H_
#define KVRECALL_BENCH_FLAG_MAP_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"

namespace kvrecall::bench {

class FlagMap {
 public:
  // Arguments that are not "--" flags, and "--json", are skipped. INVALID_ARGUMENT for "--name".
  static absl::StatusOr<FlagMap> Parse(const std::vector<std::string>& args) {
    FlagMap m;
    for (const std::string& arg : args) {
      absl::string_view a = arg;
      if (!absl::ConsumePrefix(&a, "--") || a == "json") continue;
      const size_t eq = a.find('=');
      if (eq == absl::string_view::npos) {
        return absl::InvalidArgumentError(absl::StrCat("expected --name=value, got ", arg));
      }
      std::string name(a.substr(0, eq));
      for (char& c : name) c = c == '-' ? '_' : c;
      m.values_[name] = std::string(a.substr(eq + 1));
    }
    return m;
  }

  // Leaves *out unchanged when the flag is absent. INVALID_ARGUMENT for a malformed number.
  absl::Status Get(const std::string& name, std::string* out) {
    if (auto it = Find(name); it != values_.end()) *out = it->second;
    return absl::OkStatus();
  }
  // "true" / "false".
  absl::Status Get(const std::string& name, bool* out) {
    auto it = Find(name);
    if (it == values_.end()) return absl::OkStatus();
    if (it->second != "true" && it->second != "false") {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be true or false"));
    }
    *out = it->second == "true";
    return absl::OkStatus();
  }
  template <typename T>
  absl::Status Get(const std::string& name, T* out) {
    auto it = Find(name);
    if (it == values_.end()) return absl::OkStatus();
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      double v;
      ok = absl::SimpleAtod(it->second, &v);
      *out = static_cast<T>(v);
    } else {
      ok = absl::SimpleAtoi(it->second, out);
    }
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("--", name, "=", it->second, " is not a number"));
    return absl::OkStatus();
  }

  // INVALID_ARGUMENT naming every flag no Get asked for.
  absl::Status CheckAllUsed() const {
    std::vector<std::string> unknown;
    for (const auto& [name, value] : values_) {
      if (!used_.count(name)) unknown.push_back("--" + name);
    }
    if (unknown.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("unknown flag(s): ", absl::StrJoin(unknown, ", ")));
  }

 private:
  std::map<std::string, std::string>::const_iterator Find(const std::string& name) {
    used_.insert(name);
    return values_.find(name);
  }
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

}  // namespace kvrecall::bench

#endif  // KVRECALL_BENCH_FLAG_MAP_H_
