// A read-only view of one (layer, kv-head)'s rows stored in fixed-size pages (the tier's blocks).
//
// Row t (token t) starts at pages[t / page_tokens] + page_offset + (t % page_tokens) * row_stride
// and holds head_dim elements of `dtype`. The page memory is owned elsewhere and must outlive the
// view; the table of page pointers is shared: a tier read gives every kv-head's K and V of one
// layer of a sequence the same table (the layer's slot in each block) at different offsets, so a
// decode step's read builds one table per sequence instead of one per (kv-head, K/V).
#ifndef KVRECALL_INDEXER_PAGED_ROWS_H_
#define KVRECALL_INDEXER_PAGED_ROWS_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common/dtype.h"

namespace kvrecall::indexer {

struct PagedRows {
  std::shared_ptr<const std::vector<const uint8_t*>> pages;
  size_t page_offset = 0;  // bytes from each page pointer to the page's row 0
  int page_tokens = 0;
  size_t row_stride = 0;  // bytes between consecutive rows of a page
  int head_dim = 0;
  DType dtype = DType::kBF16;
  int64_t num_tokens = 0;  // rows [0, num_tokens) are valid

  // Gives the view a table of its own.
  void SetPages(std::vector<const uint8_t*> table) {
    pages = std::make_shared<const std::vector<const uint8_t*>>(std::move(table));
  }
  int64_t num_pages() const { return pages == nullptr ? 0 : static_cast<int64_t>(pages->size()); }

  size_t row_bytes() const { return static_cast<size_t>(head_dim) * DTypeSize(dtype); }

  // REQUIRES: 0 <= t < num_tokens and a table of enough pages (indexer::Search validates views).
  const uint8_t* row(int64_t t) const {
    return (*pages)[static_cast<size_t>(t / page_tokens)] + page_offset +
           static_cast<size_t>(t % page_tokens) * row_stride;
  }
};

// Copies rows tokens[0, n) of `rows` to dst + j * dst_stride, j < n (row_bytes() each).
// REQUIRES: every token in [0, rows.num_tokens).
// out[j * out_stride] = rows.row(tokens[j]) for j < n: one shift instead of a division per row
// where page_tokens is a power of two (the block stores': a division by a value the compiler
// cannot see costs tens of cycles, and a decode step locates millions of rows).
// REQUIRES: as row().
inline void RowAddresses(const PagedRows& rows, const int32_t* tokens, size_t n,
                         const uint8_t** out, size_t out_stride) {
  const std::vector<const uint8_t*>& pages = *rows.pages;
  const uint32_t pt = static_cast<uint32_t>(rows.page_tokens);
  if ((pt & (pt - 1)) != 0) {
    for (size_t j = 0; j < n; ++j) out[j * out_stride] = rows.row(tokens[j]);
    return;
  }
  const int shift = std::countr_zero(pt);
  const int64_t mask = static_cast<int64_t>(pt) - 1;
  for (size_t j = 0; j < n; ++j) {
    const int64_t t = tokens[j];
    out[j * out_stride] = pages[static_cast<size_t>(t >> shift)] + rows.page_offset +
                          static_cast<size_t>(t & mask) * rows.row_stride;
  }
}

inline void GatherRows(const PagedRows& rows, const int32_t* tokens, size_t n, uint8_t* dst,
                       size_t dst_stride) {
  const size_t bytes = rows.row_bytes();
  for (size_t j = 0; j < n; ++j) std::memcpy(dst + j * dst_stride, rows.row(tokens[j]), bytes);
}

}  // namespace kvrecall::indexer

#endif  // KVRECALL_INDEXER_PAGED_ROWS_H_
