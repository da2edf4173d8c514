// Tenant authentication for kvrecall-server (--tenant-tokens FILE): bearer tokens, the tenant each
// one stands for, per-tenant quotas, and the request-rate limiter.
//
// The token file (typically a Kubernetes Secret mounted into the pod), one directive per line,
// '#' starts a comment:
//
//   tenant  NAME  TOKEN            a credential of tenant NAME (several lines: several tokens,
//                                  e.g. while rotating)
//   admin   TOKEN                  an operator credential: Stats of every tenant, Drain
//   limits  NAME  KEY=VALUE ...    quotas of tenant NAME (tenant_account.h), each optional:
//             stored_bytes=SIZE    logical KV bytes on one node (e.g. 64GiB)
//             sequences=N          sequences held on one node
//             requests_per_s=R     RPCs per second over all of the tenant's connections to one
//                                  node; bursts of up to max(1, ceil(R)) requests
//             arena_ingest=true    may put rows straight into the node's arena (AllocateBlocks);
//                                  the arena's transport key reaches every tenant's blocks, so
//                                  grant it only to tenants trusted with all of them
//
// Tokens are at least 16 characters of [A-Za-z0-9._~+/=-] (what fits an HTTP bearer token);
// tenant names follow the request id rules (1-256 bytes). A token listed twice, a `limits` line
// for a tenant without a token, or any unknown directive or key is an error: the server refuses
// to start on it, and a reload that fails keeps the previous table (logged).
//
// Requests carry "authorization: Bearer TOKEN" metadata (client/channel.h adds it). Tokens are
// compared in constant time against every listed token, so the answer's timing does not depend
// on how much of a guess was right.
//
// Thread safety: all methods are thread-safe.
#ifndef KVRECALL_KVSTORE_AUTH_H_
#define KVRECALL_KVSTORE_AUTH_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "kvstore/tenant_account.h"

namespace kvrecall::kvstore {

struct Principal {
  std::string tenant;  // empty for an admin
  bool admin = false;
};

// A parsed token file.
struct TokenTable {
  struct Entry {
    std::string token;
    Principal principal;
  };
  std::vector<Entry> tokens;
  std::map<std::string, TenantLimits> limits;  // tenants without a line: unlimited
};

// INVALID_ARGUMENT naming the line for anything malformed (see the file comment).
absl::StatusOr<TokenTable> ParseTokenTable(absl::string_view text);

class Authenticator {
 public:
  // Reads and parses `path` (NOT_FOUND when unreadable, INVALID_ARGUMENT when malformed). The
  // file is re-read at most every `reload_every` (on the injected clock), by the first request
  // after that; it is re-parsed only when its bytes changed.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Open(const std::string& path, Clock* clock,
                                                             absl::Duration reload_every);

  // `authorization`: the request's "authorization" metadata value (empty when absent).
  // UNAUTHENTICATED when it is missing, not "Bearer TOKEN", or no listed token.
  absl::StatusOr<Principal> Authenticate(absl::string_view authorization);

  // Takes one request from the tenant's rate budget: RESOURCE_EXHAUSTED when it is spent.
  absl::Status AdmitRequest(const std::string& tenant);

  // The tenant's current limits (unlimited when it has no `limits` line).
  TenantLimits LimitsOf(const std::string& tenant) const;

  // Re-reads the file now; on an error the previous table stays in force.
  absl::Status Reload();

  // Called (on the reloading thread, no lock held) for each tenant that had a token before a
  // reload and has none after: its sessions end (kvrecall-server: Node::RevokeTenant). Tokens
  // rotated within a tenant end nothing. REQUIRES: set before the first Authenticate.
  void SetRevokeHook(std::function<void(const std::string& tenant)> hook) { revoke_hook_ = std::move(hook); }

  // How many reloads changed the table (for tests and the log).
  int64_t reloads() const { return reloads_.load(); }

 private:
  Authenticator(std::string path, Clock* clock, absl::Duration reload_every)
      : path_(std::move(path)), clock_(clock), reload_every_(reload_every) {}
  // The table in force, after re-reading the file when it is due (one lock on the way).
  std::shared_ptr<const TokenTable> CurrentTable();

  struct Bucket {
    double tokens = 0;
    absl::Time last;
  };

  const std::string path_;
  Clock* const clock_;
  const absl::Duration reload_every_;
  std::atomic<int64_t> reloads_{0};
  std::function<void(const std::string&)> revoke_hook_;

  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenTable> table_ ABSL_GUARDED_BY(mu_);
  std::string text_ ABSL_GUARDED_BY(mu_);  // the file's bytes the table was parsed from
  absl::Time next_check_ ABSL_GUARDED_BY(mu_);
  bool checking_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_AUTH_H_
