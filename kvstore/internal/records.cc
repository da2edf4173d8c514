#include "kvstore/internal/records.h"

#include <cstring>

#include "kvstore/internal/crc32c.h"

namespace kvrecall::kvstore::internal {

void RecordWriter::F64(double v) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  U64(u);
}

std::string RecordWriter::Finish() {
  const uint32_t crc = Crc32c(out_.data(), out_.size());
  U32(crc);
  return std::move(out_);
}

RecordReader::RecordReader(absl::string_view record) {
  if (record.size() < 4) {
    ok_ = false;
    return;
  }
  data_ = record.substr(0, record.size() - 4);
  uint32_t crc = 0;
  for (int i = 0; i < 4; ++i) {
    crc |= uint32_t{static_cast<uint8_t>(record[record.size() - 4 + static_cast<size_t>(i)])}
           << (8 * i);
  }
  ok_ = crc == Crc32c(data_.data(), data_.size());
}

uint64_t RecordReader::Raw(int n) {
  if (!ok_ || remaining() < static_cast<size_t>(n)) {
    ok_ = false;
    return 0;
  }
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) {
    v |= uint64_t{static_cast<uint8_t>(data_[pos_ + static_cast<size_t>(i)])} << (8 * i);
  }
  pos_ += static_cast<size_t>(n);
  return v;
}

double RecordReader::F64() {
  const uint64_t u = U64();
  double v;
  std::memcpy(&v, &u, 8);
  return v;
}

std::string RecordReader::Str() {
  const uint32_t n = U32();
  if (!ok_ || remaining() < n) {
    ok_ = false;
    return {};
  }
  std::string s(data_.substr(pos_, n));
  pos_ += n;
  return s;
}

absl::Status RecordReader::status() const {
  if (!ok_ || remaining() != 0) {
    return absl::DataLossError("metadata record is corrupt (checksum or length mismatch)");
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::kvstore::internal
