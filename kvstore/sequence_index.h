// The retrieval index of one sequence: one segment per (sparse layer, kv-head), built over the
// committed tokens [token_begin, token_end) by BuildIndex. Immutable once built; a rebuild
// replaces the whole object, and searches keep the shared_ptr they started with.
//
// Tokens committed after the build (decode tokens) are not in any segment: indexer::Search scans
// them exactly, so they are never missed, only not accelerated.
#ifndef KVRECALL_KVSTORE_SEQUENCE_INDEX_H_
#define KVRECALL_KVSTORE_SEQUENCE_INDEX_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "indexer/index.h"

namespace kvrecall::kvstore {

struct SequenceIndex {
  indexer::Method method = indexer::Method::kExact;
  int first_layer = 0;   // layers [first_layer, num_layers) have segments
  int num_kv_heads = 0;
  int64_t token_begin = 0;
  int64_t token_end = 0;
  double build_seconds = 0;
  // [(layer - first_layer) * num_kv_heads + kv_head]
  std::vector<std::unique_ptr<indexer::Segment>> segments;

  const indexer::Segment* segment(int layer, int kv_head) const {
    if (layer < first_layer) return nullptr;
    return segments[static_cast<size_t>(layer - first_layer) * num_kv_heads + kv_head].get();
  }
  size_t MemoryBytes() const {
    size_t n = 0;
    for (const auto& s : segments) n += s->MemoryBytes();
    return n;
  }
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SEQUENCE_INDEX_H_
