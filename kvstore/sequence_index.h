// The retrieval index of one sequence: one segment per (sparse layer, kv-head) over the
// committed tokens [token_begin, token_end), built by BuildIndex or automatically at prefill
// commit, and grown with decode tokens (index_manager.h). Immutable once made: growth and
// rebuilds make a new object (sharing unchanged segments and chain parts, indexer/index.h
// NewSegmentChain) and swap it in; searches keep the shared_ptr they started with.
//
// Tokens committed after token_end (the decode tail, shorter than the growth step) are in no
// segment: indexer::Search scans them exactly, so they are never missed, only not accelerated.
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
  // False for a placeholder: a build is pending or in flight (or, for ctkvr, waits for the
  // prompt queries of BuildIndex). Its segments are unindexed ones (indexer::NewUnindexedSegment),
  // so a search over it scans the whole range exactly: correct, just not accelerated.
  bool complete = true;
  // True for a stub whose segments are in the store (spilled with the sequence, or recovered
  // after a restart); it has no segments. Sequence::index() never returns one: it loads it.
  bool on_disk = false;
  // Made by an explicit BuildIndex (an automatic build never replaces it).
  bool explicit_build = false;
  // Sharing (index_manager.h): segments built once for every sequence over one document and
  // charged to the arena once. `shared` holds that charge (it is released with the last index
  // that holds it); shared_bytes of MemoryBytes() are charged there, not to this sequence.
  std::shared_ptr<const void> shared;
  int64_t shared_bytes = 0;
  // [(layer - first_layer) * num_kv_heads + kv_head]; a segment may be a chain (prompt segment
  // plus suffix parts of decode tokens).
  std::vector<std::shared_ptr<const indexer::Segment>> segments;

  const indexer::Segment* segment(int layer, int kv_head) const {
    const size_t at = static_cast<size_t>(layer - first_layer) * num_kv_heads + kv_head;
    if (layer < first_layer || kv_head < 0 || kv_head >= num_kv_heads || at >= segments.size()) {
      return nullptr;
    }
    return segments[at].get();
  }
  size_t MemoryBytes() const {
    size_t n = 0;
    for (const auto& s : segments) n += s->MemoryBytes();
    return n;
  }
};

}  // namespace kvrecall::kvstore

#endif  // KVRECALL_KVSTORE_SEQUENCE_INDEX_H_
