// The one converter from rocksdb::Status to absl::Status (CONVENTIONS.md: one per foreign error
// type, in the directory that wraps the dependency).
#ifndef KVRECALL_KVSTORE_INTERNAL_ROCKSDB_STATUS_H_
#define KVRECALL_KVSTORE_INTERNAL_ROCKSDB_STATUS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "rocksdb/status.h"

namespace kvrecall::kvstore::internal {

// Codes by what the caller should do: a full disk (NoSpace) is RESOURCE_EXHAUSTED, corruption is
// DATA_LOSS, a busy/timed-out/try-again store is UNAVAILABLE, NotFound is NOT_FOUND, an
// unsupported or invalid request is INVALID_ARGUMENT/UNIMPLEMENTED, other I/O errors are
// INTERNAL. `what` prefixes the message ("spill block", "open ...").
absl::Status FromRocksDb(const rocksdb::Status& s, absl::string_view what);

}  // namespace kvrecall::kvstore::internal

#endif  // KVRECALL_KVSTORE_INTERNAL_ROCKSDB_STATUS_H_
