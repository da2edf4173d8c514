// Little-endian byte writer/reader for the segment format (indexer/index.h SerializeSegment).
// The reader never reads out of bounds: a short or oversized field sets a sticky error, and
// array lengths are checked against the bytes left before anything is allocated.
#ifndef KVRECALL_INDEXER_INTERNAL_SERIAL_H_
#define KVRECALL_INDEXER_INTERNAL_SERIAL_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kvrecall::indexer::internal {

class ByteWriter {
 public:
  void U8(uint8_t v) { Put(v); }
  void U32(uint32_t v) { Put(v); }
  void U64(uint64_t v) { Put(v); }
  void I32(int32_t v) { Put(v); }
  void I64(int64_t v) { Put(v); }
  void F64(double v) { Put(v); }
  void Bytes(absl::string_view s) {
    U64(s.size());
    out_.append(s.data(), s.size());
  }
  // Arrays: u64 count, then the elements' bytes (little-endian hosts only: x86-64 / aarch64).
  template <typename T>
  void Array(const std::vector<T>& v) {
    U64(v.size());
    if (!v.empty()) Raw(v.data(), v.size() * sizeof(T));
  }
  std::string& out() { return out_; }

 private:
  template <class T>
  void Put(T v) {
    Raw(&v, sizeof(T));
  }
  void Raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

class ByteReader {
 public:
  explicit ByteReader(absl::string_view data) : data_(data) {}
  uint8_t U8() { return Get<uint8_t>(); }
  uint32_t U32() { return Get<uint32_t>(); }
  uint64_t U64() { return Get<uint64_t>(); }
  int32_t I32() { return Get<int32_t>(); }
  int64_t I64() { return Get<int64_t>(); }
  double F64() { return Get<double>(); }
  absl::string_view Bytes() {
    const uint64_t n = U64();
    if (!ok_ || n > remaining()) {
      ok_ = false;
      return {};
    }
    absl::string_view s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  template <typename T>
  std::vector<T> Array() {
    std::vector<T> v;
    const uint64_t n = U64();
    if (!ok_ || n > remaining() / sizeof(T)) {
      ok_ = false;
      return v;
    }
    v.resize(n);
    Raw(v.data(), n * sizeof(T));
    return v;
  }
  size_t remaining() const { return data_.size() - pos_; }
  bool ok() const { return ok_; }

 private:
  template <class T>
  T Get() {
    T v{};
    Raw(&v, sizeof(T));
    return v;
  }
  void Raw(void* p, size_t n) {
    if (!ok_ || n > remaining()) {
      ok_ = false;
      return;
    }
    if (n > 0) std::memcpy(p, data_.data() + pos_, n);
    pos_ += n;
  }
  absl::string_view data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace kvrecall::indexer::internal

#endif  // KVRECALL_INDEXER_INTERNAL_SERIAL_H_
