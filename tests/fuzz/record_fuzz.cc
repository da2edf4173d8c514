// Fuzz target: the decoders of what the tier node reads back from RocksDB (--data-dir) on bytes
// alone: block records and index segment records (indexer::ParseSegment). fuzz_recovery covers
// the metadata records through a real node's recovery.
//
// Input: byte 0 picks the decoder (byte0 % 2):
//   0  block record (kvstore/internal/block_record.h): byte 1 gives the expected shape
//      (1 + (b & 3) layers of 2 * (b >> 2) bytes each), byte 2 bit 0 recomputes the record's
//      CRC-32C (so that mutations reach the shape checks), the rest is the record.
//   1  index segment (indexer::ParseSegment): the rest. A segment that parses must search, grow
//      (Append), clone and re-serialise like a real one (searched over synthetic keys).
// An error status is the expected answer to damage; crashes, sanitizer reports, hangs and broken
// invariants are findings.
//
// KVRECALL_FUZZ_WRITE_SEEDS=DIR: writes seeds (segments of each method, a block record) into DIR
// and exits.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "indexer/index.h"
#include "indexer/paged_rows.h"
#include "kvstore/block_store.h"
#include "kvstore/internal/block_record.h"
#include "kvstore/internal/crc32c.h"

namespace kvrecall::kvstore {
namespace {

constexpr int64_t kMaxSearchTokens = 4096;  // larger parsed segments are not searched

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "fuzz_record: %s\n", what);
  std::abort();
}

void PutLe32(std::string* s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*s)[at + i] = static_cast<char>(v >> (8 * i));
}

// --- 0: block records -------------------------------------------------------------------------

void FuzzBlockRecord(const uint8_t* data, size_t size) {
  if (size < 2) return;
  const size_t num_layers = 1 + (data[0] & 3);
  const size_t layer_bytes = 2 * static_cast<size_t>(data[0] >> 2);
  const bool fix_crc = (data[1] & 1) != 0;
  std::string record(reinterpret_cast<const char*>(data) + 2, size - 2);
  if (fix_crc && record.size() >= kBlockRecordHeaderBytes) {
    uint32_t crc = internal::Crc32c(record.data(), 16);
    crc = internal::Crc32cExtend(crc, record.data() + kBlockRecordHeaderBytes,
                                 record.size() - kBlockRecordHeaderBytes);
    PutLe32(&record, 16, crc);
  }
  std::vector<std::vector<uint8_t>> bufs(num_layers, std::vector<uint8_t>(layer_bytes, 0xee));
  std::vector<uint8_t*> layers;
  for (auto& b : bufs) layers.push_back(b.data());
  if (!internal::DecodeBlockRecord(record, layers, layer_bytes).ok()) return;
  for (size_t l = 0; l < num_layers; ++l) {
    if (layer_bytes > 0 &&
        std::memcmp(bufs[l].data(), record.data() + kBlockRecordHeaderBytes + l * layer_bytes,
                    layer_bytes) != 0) {
      Fail("a decoded layer differs from the record's payload");
    }
  }
  // An accepted record is what the encoder writes for that payload.
  std::string header(kBlockRecordHeaderBytes, '\0');
  std::vector<const uint8_t*> payload(layers.begin(), layers.end());
  internal::EncodeBlockRecordHeader(payload, layer_bytes, reinterpret_cast<uint8_t*>(header.data()));
  if (record.compare(0, kBlockRecordHeaderBytes, header) != 0) {
    Fail("an accepted block record's header is not the encoder's");
  }
}

// --- 1: index segments ------------------------------------------------------------------------

// Deterministic finite keys: `tokens` rows of head_dim elements of `dtype`, in one page.
struct Keys {
  std::vector<uint8_t> bytes;
  indexer::PagedRows rows;
  Keys(int64_t tokens, int head_dim, DType dtype) {
    std::vector<float> f(static_cast<size_t>(tokens) * head_dim);
    uint32_t x = 12345;
    for (float& v : f) {
      x = x * 1664525u + 1013904223u;
      v = static_cast<float>(static_cast<int32_t>(x >> 8) % 2001 - 1000) / 500.0f;
    }
    bytes.resize(f.size() * DTypeSize(dtype) + 1);
    FromF32(dtype, f.data(), f.size(), bytes.data());
    rows.SetPages({bytes.data()});
    rows.page_tokens = static_cast<int>(std::max<int64_t>(tokens, 1));
    rows.row_stride = static_cast<size_t>(head_dim) * DTypeSize(dtype);
    rows.head_dim = head_dim;
    rows.dtype = dtype;
    rows.num_tokens = tokens;
  }
};

absl::Status SearchOnce(const indexer::Segment& seg, const indexer::PagedRows& keys, int group,
                        int k) {
  std::vector<float> q(static_cast<size_t>(group) * seg.head_dim(), 0.25f);
  for (size_t i = 0; i < q.size(); i += 3) q[i] = -0.5f;
  indexer::SearchEntry e;
  e.queries = q.data();
  e.group = group;
  e.keys = &keys;
  e.segments = {&seg};
  e.token_begin = seg.token_begin();
  e.token_end = keys.num_tokens;
  e.k = k;
  std::vector<std::vector<int32_t>> out;
  RETURN_IF_ERROR(indexer::Search({e}, {}, nullptr, &out));
  const int64_t range = e.token_end - e.token_begin;
  if (static_cast<int64_t>(out[0].size()) != std::min<int64_t>(k, range)) {
    Fail("Search over a parsed segment selected the wrong number of tokens");
  }
  for (size_t i = 0; i < out[0].size(); ++i) {
    if (out[0][i] < e.token_begin || out[0][i] >= e.token_end ||
        (i > 0 && out[0][i] <= out[0][i - 1])) {
      Fail("Search over a parsed segment selected ids outside its range or out of order");
    }
  }
  return absl::OkStatus();
}

void FuzzSegment(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<std::unique_ptr<indexer::Segment>> seg = indexer::ParseSegment(bytes);
  if (!seg.ok()) return;
  const indexer::Segment& s = **seg;
  (void)s.MemoryBytes();
  const std::string again = indexer::SerializeSegment(s);
  if (!indexer::ParseSegment(again).ok()) Fail("a parsed segment does not re-parse");
  if (s.token_begin() < 0 || s.token_end() < s.token_begin() || s.head_dim() <= 0) {
    Fail("a parsed segment has a bad range or head_dim");
  }
  if (s.token_end() > kMaxSearchTokens || s.head_dim() > 256) return;
  // Keys for the segment's range plus a few decode tokens, then search, grow and search again.
  const int64_t grown = s.token_end() + 5;
  const Keys keys(grown, s.head_dim(), s.dtype());
  indexer::PagedRows built_on = keys.rows;  // the rows the segment covers
  built_on.num_tokens = s.token_end();
  for (int group : {1, 3}) {
    if (s.token_end() > s.token_begin()) (void)SearchOnce(s, built_on, group, 4);
  }
  // A search may have changed the segment (ctkvr adds novel queries as centroids): compare the
  // clone with the segment as it is now.
  const std::string before_clone = indexer::SerializeSegment(s);
  std::unique_ptr<indexer::Segment> clone = s.Clone();
  if (indexer::SerializeSegment(*clone) != before_clone) Fail("a clone serialises differently");
  if (clone->Append(keys.rows, grown, nullptr).ok()) {
    (void)SearchOnce(*clone, keys.rows, 2, 8);
    if (!indexer::ParseSegment(indexer::SerializeSegment(*clone)).ok()) {
      Fail("a parsed and grown segment does not re-parse");
    }
  }
}

void WriteSeeds(const std::string& dir) {
  // A block record of 2 layers of 64 bytes, as the store writes it.
  std::vector<uint8_t> l0(64, 0x3f), l1(64, 0xbf);
  const std::vector<const uint8_t*> layers = {l0.data(), l1.data()};
  std::string record(kBlockRecordHeaderBytes, '\0');
  internal::EncodeBlockRecordHeader(layers, 64, reinterpret_cast<uint8_t*>(record.data()));
  record.append(l0.begin(), l0.end());
  record.append(l1.begin(), l1.end());
  std::ofstream(dir + "/block_record", std::ios::binary)
      << '\0' << static_cast<char>(1 | (32 << 2)) << '\1' << record;
  // Segments of each method, built by the indexer and grown by decode tokens.
  Keys keys(300, 8, DType::kBF16);
  std::vector<float> prompt(4 * 2 * 8, 0.3f);
  indexer::BuildInput in;
  in.keys = &keys.rows;
  in.token_begin = 3;
  in.token_end = 240;
  in.prompt_queries = prompt.data();
  in.num_prompt_queries = 4;
  in.group = 2;
  indexer::IndexOptions io;
  io.ctkvr.list_size = 16;
  io.cluster.tokens_per_cluster = 16;
  io.cluster.append_every = 32;
  io.cluster.segment_tokens = 128;
  for (indexer::Method m : {indexer::Method::kExact, indexer::Method::kCtkvr,
                            indexer::Method::kCluster}) {
    absl::StatusOr<std::unique_ptr<indexer::Segment>> seg = indexer::BuildSegment(m, in, io, nullptr);
    if (!seg.ok() || !(*seg)->Append(keys.rows, 290, nullptr).ok()) Fail("seed: BuildSegment");
    std::ofstream(dir + "/segment_" + std::string(indexer::MethodName(m)), std::ios::binary)
        << '\1' << indexer::SerializeSegment(**seg);
  }
}

}  // namespace
}  // namespace kvrecall::kvstore

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVRECALL_FUZZ_WRITE_SEEDS")) {
    kvrecall::kvstore::WriteSeeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvrecall::kvstore;
  if (size < 1) return 0;
  if (data[0] % 2 == 0) {
    FuzzBlockRecord(data + 1, size - 1);
  } else {
    FuzzSegment(data + 1, size - 1);
  }
  return 0;
}
