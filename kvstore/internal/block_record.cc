#include "kvstore/internal/block_record.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstore/block_store.h"
#include "kvstore/internal/crc32c.h"

namespace kvrecall::kvstore::internal {
namespace {

constexpr char kMagic[4] = {'K', 'V', 'B', '1'};

void PutLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutLe64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetLe32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{p[i]} << (8 * i);
  return v;
}
uint64_t GetLe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}

}  // namespace

void EncodeBlockRecordHeader(absl::Span<const uint8_t* const> layers, size_t layer_bytes,
                             uint8_t* header) {
  std::memcpy(header, kMagic, 4);
  PutLe32(header + 4, static_cast<uint32_t>(layers.size()));
  PutLe64(header + 8, layer_bytes);
  uint32_t crc = Crc32c(header, 16);
  for (const uint8_t* l : layers) crc = Crc32cExtend(crc, l, layer_bytes);
  PutLe32(header + 16, crc);
}

absl::Status DecodeBlockRecord(absl::string_view record, absl::Span<uint8_t* const> layers,
                               size_t layer_bytes) {
  const auto* p = reinterpret_cast<const uint8_t*>(record.data());
  const size_t want = kBlockRecordHeaderBytes + layers.size() * layer_bytes;
  if (record.size() != want || std::memcmp(p, kMagic, 4) != 0 || GetLe32(p + 4) != layers.size() ||
      GetLe64(p + 8) != layer_bytes) {
    return absl::DataLossError(absl::StrCat("block record of ", record.size(),
                                            " bytes is malformed (expected ", want, " bytes, ",
                                            layers.size(), " layers of ", layer_bytes, ")"));
  }
  uint32_t crc = Crc32c(p, 16);
  crc = Crc32cExtend(crc, p + kBlockRecordHeaderBytes, record.size() - kBlockRecordHeaderBytes);
  if (crc != GetLe32(p + 16)) {
    return absl::DataLossError("block record fails its CRC-32C: the spilled KV is corrupt");
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    std::memcpy(layers[l], p + kBlockRecordHeaderBytes + l * layer_bytes, layer_bytes);
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::kvstore::internal
