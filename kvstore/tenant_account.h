// One tenant's usage on a node, checked against its quotas (kvstore/auth.h reads them from the
// server's --tenant-tokens file; without one every tenant is unlimited).
//
// What is counted, per node (each node of a cluster enforces its own):
//   - sequences: the tenant's sequences the node holds, open or closed-but-kept (a dropped one
//     stops counting once its last reader lets go of it);
//   - stored bytes: the *logical* KV bytes of those sequences, committed tokens × the model's
//     K+V bytes per token over every layer, shared prefix blocks included. Logical, not physical:
//     the charge of a write never depends on what else is stored (so a quota cannot be used to
//     probe whether a prefix is already there), and it trips at exactly the same point however
//     the tenant's sequences share blocks.
// Acknowledged data is never taken back: recovery charges what it restores even beyond a limit
// that was lowered meanwhile (Force*), and later writes then fail until usage is under it again.
//
// Thread safety: all methods are thread-safe (one mutex, a leaf: callers may hold a Sequence's
// lock).
#ifndef KVRECALL_KVSTORE_TENANT_ACCOUNT_H_
#define KVRECALL_KVSTORE_TENANT_ACCOUNT_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace kvrecall::kvstore {

// A tenant's quotas; 0 means unlimited.
struct TenantLimits {
  int64_t stored_bytes = 0;   // logical KV bytes on one node
  int64_t sequences = 0;      // sequences held on one node
  double requests_per_s = 0;  // RPCs per second (the server's authenticator enforces it)
  // Bulk ingest puts rows straight into the node's arena with its transport key (AllocateBlocks):
  // under authentication only tenants trusted with that key may use it; the others stream
  // AppendKV over the authenticated channel.
  bool arena_ingest = false;
};

// Looks up a tenant's current limits (they may change while the node runs: a reloaded token
// file). Must be thread-safe and fast; null means every tenant is unlimited.
using TenantLimitsFn = std::function<TenantLimits(const std::string& tenant)>;

class TenantAccount {
 public:
  TenantAccount(std::string tenant, TenantLimitsFn limits)
      : tenant_(std::move(tenant)), limits_(std::move(limits)) {}

  const std::string& tenant() const { return tenant_; }

  // Adds `bytes` (> 0) to the stored bytes; RESOURCE_EXHAUSTED (and nothing added) when that
  // would exceed the limit. Exactly at the limit is allowed.
  absl::Status ChargeBytes(int64_t bytes);
  // Adds a sequence; RESOURCE_EXHAUSTED at the limit.
  absl::Status AddSequence();
  // Recovery of acknowledged data: adds without checking.
  void ForceChargeBytes(int64_t bytes);
  void ForceAddSequence();
  void RefundBytes(int64_t bytes);
  void RemoveSequence();

  int64_t bytes() const;
  int64_t sequences() const;
  TenantLimits limits() const { return limits_ ? limits_(tenant_) : TenantLimits{}; }

 private:
  const std::string tenant_;
  const TenantLimitsFn limits_;
  mutable absl::Mutex mu_;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sequences_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_TENANT_ACCOUNT_H_
