// A read-only view of one (layer, kv-head)'s rows stored in fixed-size pages (the tier's blocks).
//
// Row t (token t) starts at pages[t / page_tokens] + (t % page_tokens) * row_stride and holds
// head_dim elements of `dtype`. Pages are owned elsewhere and must outlive the view.
#ifndef KVRECALL_INDEXER_PAGED_ROWS_H_
#define KVRECALL_INDEXER_PAGED_ROWS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace kvrecall::indexer {

struct PagedRows {
  std::vector<const uint8_t*> pages;
  int page_tokens = 0;
  size_t row_stride = 0;  // bytes between consecutive rows of a page
  int head_dim = 0;
  DType dtype = DType::kBF16;
  int64_t num_tokens = 0;  // rows [0, num_tokens) are valid

  const uint8_t* row(int64_t t) const {
    return pages[static_cast<size_t>(t / page_tokens)] +
           static_cast<size_t>(t % page_tokens) * row_stride;
  }
};

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_PAGED_ROWS_H_
