#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "client/tier.h"

namespace kvrecall::client::internal {

absl::Status CheckRecallFits(const RetrieveBatch& batch, size_t row_pair_bytes, int64_t buffer_bytes) {
  if (batch.budget <= 0 || batch.budget > kvstore::kMaxBudget) {
    return absl::InvalidArgumentError(absl::StrCat("budget ", batch.budget, " not in [1, ", kvstore::kMaxBudget, "]"));
  }
  const uint64_t rows = static_cast<uint64_t>(buffer_bytes) / row_pair_bytes;
  if (batch.entries.size() * static_cast<uint64_t>(batch.budget) > rows) {
    return absl::InvalidArgumentError(absl::StrCat(batch.entries.size(), " entries x budget ", batch.budget,
                                                   " rows exceed the recall buffer of ", rows,
                                                   " rows; raise recall_buffer_bytes"));
  }
  return absl::OkStatus();
}

std::string DefaultWorkerId() {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return absl::StrCat(host, "-", ::getpid());
}

}  // namespace kvrecall::client::internal
