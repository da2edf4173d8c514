// Binary records of durable metadata (block_store.h's meta column family). Little-endian fields;
// every record ends with the CRC-32C of everything before it, so a damaged record is DATA_LOSS
// on decode, never a wrong value.
#ifndef KVRECALL_KVSTORE_INTERNAL_RECORDS_H_
#define KVRECALL_KVSTORE_INTERNAL_RECORDS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvrecall::kvstore::internal {

class RecordWriter {
 public:
  void U32(uint32_t v) { Raw(v, 4); }
  void U64(uint64_t v) { Raw(v, 8); }
  void I32(int32_t v) { U32(static_cast<uint32_t>(v)); }
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F64(double v);
  void Str(absl::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s.data(), s.size());
  }
  // The record: the fields followed by their CRC-32C.
  std::string Finish();

 private:
  void Raw(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
  }
  std::string out_;
};

// Reads fields in the order they were written. Any read past the end sets a sticky error;
// status() reports it (DATA_LOSS).
class RecordReader {
 public:
  // Checks and strips the trailing CRC (DATA_LOSS in status() when it does not match).
  explicit RecordReader(absl::string_view record);
  uint32_t U32() { return static_cast<uint32_t>(Raw(4)); }
  uint64_t U64() { return Raw(8); }
  int32_t I32() { return static_cast<int32_t>(U32()); }
  int64_t I64() { return static_cast<int64_t>(U64()); }
  double F64();
  std::string Str();
  size_t remaining() const { return data_.size() - pos_; }
  // OK when the CRC matched and every read was in bounds and everything was read.
  absl::Status status() const;

 private:
  uint64_t Raw(int n);
  absl::string_view data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace kvrecall::kvstore::internal

#endif  // KVRECALL_KVSTORE_INTERNAL_RECORDS_H_
