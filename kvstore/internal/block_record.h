// Block records of the "blocks" column family (layout: block_store.h). Kept apart from the
// RocksDB code so that the decoder can be tested and fuzzed on bytes alone (tests/fuzz).
#ifndef KVRECALL_KVSTORE_INTERNAL_BLOCK_RECORD_H_
#define KVRECALL_KVSTORE_INTERNAL_BLOCK_RECORD_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvrecall::kvstore::internal {

// Writes the kBlockRecordHeaderBytes-byte header (magic, shape, CRC-32C) of the record of
// `layers` (num_layers pointers to layer_bytes bytes each) into `header`; the record is the
// header followed by the layers in order.
void EncodeBlockRecordHeader(absl::Span<const uint8_t* const> layers, size_t layer_bytes,
                             uint8_t* header);

// Copies the payload of `record` into layers[l] (layer_bytes each). DATA_LOSS, with `layers`
// untouched, when the record's size, magic or shape differs from layers.size() x layer_bytes or
// its CRC-32C does not match.
[[nodiscard]] absl::Status DecodeBlockRecord(absl::string_view record,
                                             absl::Span<uint8_t* const> layers,
                                             size_t layer_bytes);

}  // namespace kvrecall::kvstore::internal

#endif  // KVRECALL_KVSTORE_INTERNAL_BLOCK_RECORD_H_
