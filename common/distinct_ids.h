// One check shared by the batch APIs that take several sequences at once (AppendKVBatch on the
// client and on the server): no sequence may appear twice in one batch.
#ifndef KVRECALL_COMMON_DISTINCT_IDS_H_
#define KVRECALL_COMMON_DISTINCT_IDS_H_

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// INVALID_ARGUMENT naming the first sequence id (id_of(item), a string_view into the item) that
// appears twice among `items`; OK when they are distinct.
template <typename Range, typename IdOf>
absl::Status CheckDistinctSequenceIds(const Range& items, IdOf id_of) {
  absl::flat_hash_set<absl::string_view> seen;
  for (const auto& item : items) {
    const absl::string_view id = id_of(item);
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence '", id, "' appears twice in one batch"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_DISTINCT_IDS_H_
