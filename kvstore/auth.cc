#include "kvstore/auth.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/units.h"
#include "kvstore/node.h"

namespace kvrecall::kvstore {
namespace {

constexpr size_t kMinTokenLength = 16;
constexpr size_t kMaxTokenLength = 4096;

bool TokenChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '~' ||
         c == '+' || c == '/' || c == '=' || c == '-';
}

absl::Status CheckToken(absl::string_view token) {
  if (token.size() < kMinTokenLength || token.size() > kMaxTokenLength ||
      !std::all_of(token.begin(), token.end(), TokenChar)) {
    return absl::InvalidArgumentError(absl::StrCat("a token must be ", kMinTokenLength, "..",
                                                   kMaxTokenLength, " characters of [A-Za-z0-9._~+/=-]"));
  }
  return absl::OkStatus();
}

absl::Status CheckTenant(absl::string_view name) {
  if (name.empty() || name.size() > kMaxIdLength) {
    return absl::InvalidArgumentError(absl::StrCat("a tenant name must be 1..", kMaxIdLength, " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<TenantLimits> ParseLimits(const std::vector<absl::string_view>& fields) {
  TenantLimits l;
  for (size_t i = 2; i < fields.size(); ++i) {
    const std::vector<absl::string_view> kv = absl::StrSplit(fields[i], absl::MaxSplits('=', 1));
    if (kv.size() != 2 || kv[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("'", fields[i], "' is not KEY=VALUE"));
    }
    const absl::string_view key = kv[0], value = kv[1];
    bool ok = true;
    if (key == "stored_bytes") {
      absl::StatusOr<int64_t> b = ParseBytes(value);
      ok = b.ok() && *b > 0;
      if (ok) l.stored_bytes = *b;
    } else if (key == "sequences") {
      ok = absl::SimpleAtoi(value, &l.sequences) && l.sequences > 0;
    } else if (key == "requests_per_s") {
      ok = absl::SimpleAtod(value, &l.requests_per_s) && std::isfinite(l.requests_per_s) &&
           l.requests_per_s > 0;
    } else if (key == "arena_ingest") {
      ok = absl::SimpleAtob(value, &l.arena_ingest);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown limit '", key, "' (stored_bytes, sequences, requests_per_s, arena_ingest)"));
    }
    if (!ok) return absl::InvalidArgumentError(absl::StrCat("bad value for ", key, ": '", value, "'"));
  }
  return l;
}

// Equal without an early exit (the time depends on the lengths only).
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = static_cast<unsigned>(a.size() != b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<TokenTable> ParseTokenTable(absl::string_view text) {
  TokenTable t;
  std::map<std::string, int> seen;  // token -> line
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (const size_t hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    const std::vector<absl::string_view> f = absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (f.empty()) continue;
    auto bad = [&](const absl::Status& why) {
      return absl::InvalidArgumentError(absl::StrCat("token file line ", line_no, ": ", why.message()));
    };
    TokenTable::Entry e;
    if (f[0] == "tenant" && f.size() == 3) {
      if (absl::Status s = CheckTenant(f[1]); !s.ok()) return bad(s);
      e.token = std::string(f[2]);
      e.principal.tenant = std::string(f[1]);
    } else if (f[0] == "admin" && f.size() == 2) {
      e.token = std::string(f[1]);
      e.principal.admin = true;
    } else if (f[0] == "limits" && f.size() >= 2) {
      if (absl::Status s = CheckTenant(f[1]); !s.ok()) return bad(s);
      absl::StatusOr<TenantLimits> l = ParseLimits(f);
      if (!l.ok()) return bad(l.status());
      if (!t.limits.emplace(std::string(f[1]), *l).second) {
        return bad(absl::InvalidArgumentError(absl::StrCat("second limits line for tenant '", f[1], "'")));
      }
      continue;
    } else {
      return bad(absl::InvalidArgumentError(
          "want 'tenant NAME TOKEN', 'admin TOKEN' or 'limits NAME KEY=VALUE...'"));
    }
    if (absl::Status s = CheckToken(e.token); !s.ok()) return bad(s);
    if (auto [it, fresh] = seen.emplace(e.token, line_no); !fresh) {
      return bad(absl::InvalidArgumentError(absl::StrCat("the token of line ", it->second, " again")));
    }
    t.tokens.push_back(std::move(e));
  }
  for (const auto& entry : t.limits) {
    const std::string& tenant = entry.first;
    const bool has_token = std::any_of(t.tokens.begin(), t.tokens.end(),
                                       [&](const TokenTable::Entry& e) { return e.principal.tenant == tenant; });
    if (!has_token) {
      return absl::InvalidArgumentError(absl::StrCat("token file: limits for tenant '", tenant,
                                                     "', which has no token (a typo?)"));
    }
  }
  if (t.tokens.empty()) return absl::InvalidArgumentError("token file lists no token");
  return t;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Open(const std::string& path, Clock* clock,
                                                                   absl::Duration reload_every) {
  std::unique_ptr<Authenticator> a(new Authenticator(path, clock, reload_every));
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, "token file"));
  ASSIGN_OR_RETURN(TokenTable table, ParseTokenTable(text));
  absl::MutexLock lock(&a->mu_);
  a->table_ = std::make_shared<const TokenTable>(std::move(table));
  a->text_ = std::move(text);
  a->next_check_ = clock->Now() + reload_every;
  return a;
}

absl::Status Authenticator::Reload() {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path_, "token file"));
  {
    absl::MutexLock lock(&mu_);
    if (text == text_) return absl::OkStatus();
  }
  absl::StatusOr<TokenTable> table = ParseTokenTable(text);
  if (!table.ok()) return table.status();
  auto tenants = [](const TokenTable& t) {
    std::set<std::string> out;
    for (const TokenTable::Entry& e : t.tokens)
      if (!e.principal.admin) out.insert(e.principal.tenant);
    return out;
  };
  std::vector<std::string> revoked;
  {
    absl::MutexLock lock(&mu_);
    const std::set<std::string> after = tenants(*table);
    for (const std::string& t : tenants(*table_))
      if (after.count(t) == 0) revoked.push_back(t);
    table_ = std::make_shared<const TokenTable>(std::move(*table));
    text_ = std::move(text);
    reloads_.fetch_add(1);
    KV_LOG(INFO) << "token file " << path_ << " reloaded: " << table_->tokens.size() << " tokens, "
                 << revoked.size() << " tenants revoked";
  }
  if (revoke_hook_) {
    for (const std::string& t : revoked) revoke_hook_(t);
  }
  return absl::OkStatus();
}

std::shared_ptr<const TokenTable> Authenticator::CurrentTable() {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    if (checking_ || now < next_check_) return table_;
    checking_ = true;
    next_check_ = now + reload_every_;
  }
  if (absl::Status s = Reload(); !s.ok()) {
    KV_LOG(ERROR) << "token file " << path_ << " not reloaded, the previous tokens stay in force: " << s;
  }
  absl::MutexLock lock(&mu_);
  checking_ = false;
  return table_;
}

absl::StatusOr<Principal> Authenticator::Authenticate(absl::string_view authorization) {
  const std::shared_ptr<const TokenTable> table = CurrentTable();
  constexpr absl::string_view kBearer = "Bearer ";
  if (authorization.empty()) {
    return absl::UnauthenticatedError("this server requires a bearer token (authorization metadata)");
  }
  if (authorization.size() <= kBearer.size() || authorization.substr(0, kBearer.size()) != kBearer) {
    return absl::UnauthenticatedError("authorization metadata is not 'Bearer TOKEN'");
  }
  const absl::string_view token = authorization.substr(kBearer.size());
  const Principal* found = nullptr;
  for (const TokenTable::Entry& e : table->tokens) {
    if (ConstantTimeEquals(e.token, token) && found == nullptr) found = &e.principal;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  return *found;
}

TenantLimits Authenticator::LimitsOf(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = table_->limits.find(tenant);
  return it == table_->limits.end() ? TenantLimits{} : it->second;
}

absl::Status Authenticator::AdmitRequest(const std::string& tenant) {
  const absl::Time now = clock_->Now();
  absl::MutexLock lock(&mu_);
  auto limits = table_->limits.find(tenant);
  const double rate = limits == table_->limits.end() ? 0 : limits->second.requests_per_s;
  if (rate <= 0) return absl::OkStatus();
  const double burst = std::max(1.0, std::ceil(rate));
  auto [it, fresh] = buckets_.try_emplace(tenant);
  Bucket& b = it->second;
  if (fresh) {
    b.tokens = burst;
  } else {
    b.tokens = std::min(burst, b.tokens + absl::ToDoubleSeconds(now - b.last) * rate);
  }
  b.last = now;
  if (b.tokens < 1) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant '", tenant, "' is over its request rate (",
                                                     rate, " requests/s); retry with backoff"));
  }
  b.tokens -= 1;
  return absl::OkStatus();
}

}  // namespace kvrecall::kvstore
