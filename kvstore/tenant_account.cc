#include "kvstore/tenant_account.h"

#include "absl/strings/str_cat.h"

namespace kvrecall::kvstore {

absl::Status TenantAccount::ChargeBytes(int64_t bytes) {
  const int64_t limit = limits().stored_bytes;
  absl::MutexLock lock(&mu_);
  if (limit > 0 && bytes_ + bytes > limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", tenant_, "' would store ", bytes_ + bytes,
                     " bytes on this node, over its quota of ", limit,
                     " (stored_bytes); drop sequences or ask for a larger quota"));
  }
  bytes_ += bytes;
  return absl::OkStatus();
}

absl::Status TenantAccount::AddSequence() {
  const int64_t limit = limits().sequences;
  absl::MutexLock lock(&mu_);
  if (limit > 0 && sequences_ >= limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", tenant_, "' holds ", sequences_,
                     " sequences on this node, its quota (sequences); drop one first"));
  }
  ++sequences_;
  return absl::OkStatus();
}

void TenantAccount::ForceChargeBytes(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  bytes_ += bytes;
}

void TenantAccount::ForceAddSequence() {
  absl::MutexLock lock(&mu_);
  ++sequences_;
}

void TenantAccount::RefundBytes(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  bytes_ -= bytes;
}

void TenantAccount::RemoveSequence() {
  absl::MutexLock lock(&mu_);
  --sequences_;
}

int64_t TenantAccount::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

int64_t TenantAccount::sequences() const {
  absl::MutexLock lock(&mu_);
  return sequences_;
}

}  // namespace kvrecall::kvstore
