#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tier.h"
#include "common/distinct_ids.h"
#include "common/status_macros.h"
#include "indexer/kernels.h"

namespace kvrecall::client::internal {

namespace {
// Slots distinct, and fills distinct and among the slots. REQUIRES: every slot and fill in
// [0, budget). A bitmap of the slots has as many bits set as there are slots iff none repeats;
// the slots are spread over four bitmaps (OR-ed at the end) so that consecutive slots in one
// 64-slot word do not wait on each other's stores.
absl::Status CheckSlotsDistinct(const std::vector<int32_t>& slots,
                                const std::vector<int32_t>& fills, int budget) {
  const size_t words = (static_cast<size_t>(budget) + 63) / 64;
  thread_local std::vector<uint64_t> bits;  // [4 partial + 1 fill][words], kept per thread
  bits.assign(5 * words, 0);
  uint64_t* b = bits.data();
  const int32_t* s = slots.data();
  const size_t n = slots.size();
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (size_t k = 0; k < 4; ++k) {
      const auto v = static_cast<uint32_t>(s[j + k]);
      b[k * words + (v >> 6)] |= uint64_t{1} << (v & 63);
    }
  }
  for (; j < n; ++j) b[s[j] >> 6] |= uint64_t{1} << (s[j] & 63);
  size_t set = 0;
  for (size_t w = 0; w < words; ++w) {
    b[w] |= b[words + w] | b[2 * words + w] | b[3 * words + w];
    set += static_cast<size_t>(__builtin_popcountll(b[w]));
  }
  if (set != n) return absl::InternalError("tier returned a slot twice");
  uint64_t* f = b + 4 * words;
  uint64_t outside = 0;
  for (int32_t v : fills) {
    const uint64_t bit = uint64_t{1} << (v & 63);
    outside |= bit & ~b[v >> 6];
    f[v >> 6] |= bit;
  }
  size_t filled = 0;
  for (size_t w = 0; w < words; ++w) filled += static_cast<size_t>(__builtin_popcountll(f[w]));
  if (outside != 0 || filled != fills.size()) {
    return absl::InternalError("tier filled a slot that is not in the selection, or one twice");
  }
  return absl::OkStatus();
}

// A staging area's bytes and rows: the recall buffer split evenly, each area a whole number of
// rows.
uint64_t AreaRows(const TierOptions& options, size_t row_pair_bytes) {
  return static_cast<uint64_t>(options.recall_buffer_bytes) / static_cast<uint64_t>(options.staging_areas) /
         row_pair_bytes;
}
uint64_t ResultsBytes(size_t entries, int budget) {
  return static_cast<uint64_t>(entries) * kvstore::RetrieveResultBytes(budget);
}
}  // namespace

absl::Status CheckRecallFits(size_t entries, int budget, int successors, int staging_area,
                             size_t row_pair_bytes, const TierOptions& options,
                             uint64_t* area_first_row, uint64_t* results_offset,
                             uint64_t query_bytes, uint64_t* queries_offset) {
  RETURN_IF_ERROR(kvstore::ValidateSelection(budget, successors));
  if (options.staging_areas < 1 || static_cast<uint32_t>(options.staging_areas) > kvstore::kMaxStagingAreas) {
    return absl::InvalidArgumentError(absl::StrCat("staging_areas ", options.staging_areas, " not in [1, ",
                                                   kvstore::kMaxStagingAreas, "]"));
  }
  if (staging_area < 0 || staging_area >= options.staging_areas) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging_area ", staging_area, " not in [0, ", options.staging_areas, ")"));
  }
  const uint64_t area_rows = AreaRows(options, row_pair_bytes);
  const uint64_t area_bytes = area_rows * row_pair_bytes;
  const uint64_t results = ResultsBytes(entries, budget);
  const uint64_t rows_bytes = entries * static_cast<uint64_t>(budget) * row_pair_bytes;
  const uint64_t area_start = area_bytes * static_cast<uint64_t>(staging_area);
  // The results sit at the area's end, 8-byte aligned.
  const uint64_t results_at = results > area_bytes ? 0 : (area_start + area_bytes - results) & ~uint64_t{7};
  if (results + 8 > area_bytes || results_at < area_start + rows_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(entries, " entries x budget ", budget,
                     " rows (and their results) exceed a staging area of ", area_bytes,
                     " bytes; raise recall_buffer_bytes (RecallBufferBytes)"));
  }
  *area_first_row = area_rows * static_cast<uint64_t>(staging_area);
  if (results_offset != nullptr) *results_offset = results_at;
  if (queries_offset != nullptr) {
    const uint64_t rows_end = area_start + rows_bytes;
    const uint64_t at =
        results_at - rows_end >= query_bytes ? (results_at - query_bytes) & ~uint64_t{63} : 0;
    *queries_offset = query_bytes > 0 && at >= rows_end ? at : kNoQueryRoom;
  }
  return absl::OkStatus();
}

absl::Status CheckRecallFits(const RetrieveBatch& batch, size_t row_pair_bytes,
                             const TierOptions& options, uint64_t* area_first_row,
                             uint64_t* results_offset, uint64_t query_bytes,
                             uint64_t* queries_offset) {
  return CheckRecallFits(batch.entries.size(), batch.budget, batch.successors, batch.staging_area,
                         row_pair_bytes, options, area_first_row, results_offset, query_bytes,
                         queries_offset);
}

absl::Status UnpackRecalledFromRegion(const uint8_t* p, int budget, Recalled* r) {
  uint32_t counts[2];
  std::memcpy(counts, p, 8);
  if (counts[0] > static_cast<uint32_t>(budget) || counts[1] > counts[0]) {
    return absl::InternalError(absl::StrCat("tier wrote a result of ", counts[0], " tokens and ", counts[1],
                                            " fills for a budget of ", budget));
  }
  const size_t n = counts[0], m = counts[1];
  r->token_ids.resize(n);
  if (n > 0) std::memcpy(r->token_ids.data(), p + 8, n * 4);
  r->slots.resize(n);
  r->fill_slots.resize(m);
  // Slots and fills are little-endian uint16s after the ids.
  indexer::kernels::WidenU16(p + 8 + n * 4, static_cast<int64_t>(n), r->slots.data());
  indexer::kernels::WidenU16(p + 8 + n * 6, static_cast<int64_t>(m), r->fill_slots.data());
  return CheckRecalled(*r, budget);
}

absl::Status CheckDistinctSequences(absl::Span<const SequenceAppend> appends) {
  return CheckDistinctSequenceIds(
      appends, [](const SequenceAppend& a) -> absl::string_view { return a.sequence_id; });
}

absl::Status CheckAppendBatch(const ModelSpec& spec, const AppendBatch& batch) {
  if (static_cast<int>(batch.keys.size()) != spec.num_layers ||
      static_cast<int>(batch.values.size()) != spec.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch has KV for ", batch.keys.size(), " layers; model has ", spec.num_layers));
  }
  if (batch.num_tokens < 0 || batch.token_start < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("append of ", batch.num_tokens, " tokens at ", batch.token_start));
  }
  const size_t want = static_cast<size_t>(spec.num_kv_heads) * static_cast<size_t>(batch.num_tokens) * spec.row_bytes();
  for (int l = 0; l < spec.num_layers; ++l) {
    if (batch.keys[l].size() != want || batch.values[l].size() != want) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": keys/values must be ", want, " bytes"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRecalled(const Recalled& r, int budget) {
  const size_t n = r.token_ids.size();
  if (n > static_cast<size_t>(budget)) {
    return absl::InternalError(absl::StrCat("tier returned ", n, " tokens for a budget of ", budget));
  }
  if (r.slots.size() != n || r.fill_slots.size() > n) {
    return absl::InternalError(absl::StrCat("tier returned ", r.slots.size(), " slots and ", r.fill_slots.size(),
                                            " fills for ", n, " tokens"));
  }
  if (!indexer::kernels::StrictlyAscending(r.token_ids.data(), static_cast<int64_t>(n)))
    return absl::InternalError("tier returned unsorted token ids");
  // As unsigned, a negative slot is out of range too.
  const uint32_t top =
      std::max(indexer::kernels::MaxUnsigned(r.slots.data(), static_cast<int64_t>(n)),
               indexer::kernels::MaxUnsigned(r.fill_slots.data(),
                                             static_cast<int64_t>(r.fill_slots.size())));
  if (n > 0 && top >= static_cast<uint32_t>(budget)) {
    return absl::InternalError(absl::StrCat("tier returned slot ", static_cast<int32_t>(top),
                                            " out of range [0, ", budget, ")"));
  }
  return CheckSlotsDistinct(r.slots, r.fill_slots, budget);
}

std::vector<int32_t> FillTokens(const Recalled& r) {
  if (r.fill_slots == r.slots) return r.token_ids;  // everything sent, in selection order
  std::vector<int32_t> token_of_slot(r.slots.empty() ? 0 : *std::max_element(r.slots.begin(), r.slots.end()) + 1);
  for (size_t j = 0; j < r.slots.size(); ++j) token_of_slot[static_cast<size_t>(r.slots[j])] = r.token_ids[j];
  std::vector<int32_t> tokens;
  tokens.reserve(r.fill_slots.size());
  for (int32_t s : r.fill_slots) tokens.push_back(token_of_slot[static_cast<size_t>(s)]);
  return tokens;
}

void ApplyFills(const Recalled& r, size_t row_pair_bytes, uint8_t* slot_rows) {
  const size_t row = row_pair_bytes / 2;
  for (size_t j = 0; j < r.fill_slots.size(); ++j) {
    uint8_t* dst = slot_rows + static_cast<size_t>(r.fill_slots[j]) * row_pair_bytes;
    if (r.rows != nullptr) {
      std::memcpy(dst, r.rows + j * row_pair_bytes, row_pair_bytes);
    } else {
      std::memcpy(dst, r.row_addresses[2 * j], row);
      std::memcpy(dst + row, r.row_addresses[2 * j + 1], row);
    }
  }
}

std::string DefaultWorkerId() {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return absl::StrCat(host, "-", ::getpid());
}

RegionPin::~RegionPin() {
  if (data_ != nullptr && unpin_) unpin_(data_);
}

absl::Status RegionPin::Pin(const TierOptions& options, uint8_t* data, size_t bytes) {
  if (!options.pin_region) return absl::OkStatus();
  RETURN_IF_ERROR(options.pin_region(data, bytes));
  unpin_ = options.unpin_region;
  data_ = data;
  return absl::OkStatus();
}

}  // namespace kvrecall::client::internal

namespace kvrecall::client {

absl::Status Tier::AppendKVBatch(absl::Span<const SequenceAppend> appends,
                                 std::vector<bool>* stored) {
  RETURN_IF_ERROR(internal::CheckDistinctSequences(appends));
  if (stored != nullptr) stored->assign(appends.size(), false);
  absl::Status first;
  for (size_t i = 0; i < appends.size(); ++i) {
    absl::Status s = AppendKV(appends[i].sequence_id, appends[i].batch);
    if (s.ok() && stored != nullptr) (*stored)[i] = true;
    first.Update(s);
  }
  return first;
}

int64_t RecallBufferBytes(int64_t entries, int budget, size_t row_pair_bytes, int staging_areas,
                          int64_t query_floats_per_entry) {
  const uint64_t rows_bytes = static_cast<uint64_t>(entries) * static_cast<uint64_t>(budget) * row_pair_bytes;
  const uint64_t results = static_cast<uint64_t>(entries) * kvstore::RetrieveResultBytes(budget);
  const uint64_t queries =
      query_floats_per_entry > 0
          ? static_cast<uint64_t>(entries * query_floats_per_entry) * sizeof(float) + 64
          : 0;
  // Rounded up to whole rows, plus the 8-byte alignment of the results (and the queries' 64).
  const uint64_t area =
      (rows_bytes + queries + results + 8 + row_pair_bytes - 1) / row_pair_bytes * row_pair_bytes;
  return static_cast<int64_t>(area) * staging_areas;
}

}  // namespace kvrecall::client
