// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors):
//   [8 bytes: N, little-endian u64][N bytes: JSON header][data region]
// The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end)} with offsets
// relative to the start of the data region; an optional "__metadata__" maps strings to strings.
//
// Error codes (what the caller should do about a bad file):
//   DATA_LOSS        the file contradicts itself or is truncated: header length beyond the file,
//                    malformed header JSON, missing/ill-typed fields, offsets outside the data
//                    region or reversed, shape x dtype size != offsets span, overlapping tensors,
//                    a shard that lacks a tensor its index promises. Re-download the file.
//   INVALID_ARGUMENT the file is self-consistent but asks for something unsupported: a dtype
//                    other than F32/BF16/F16, a header over kMaxSafetensorsHeaderBytes, more than
//                    kMaxSafetensorsRank dims, a hostile shard file name in an index.
//   NOT_FOUND        the file (or checkpoint) does not exist.
// Parsing never reads outside the mapping, whatever the header says.
#ifndef KVRECALL_GPU_WORKER_MODEL_SAFETENSORS_H_
#define KVRECALL_GPU_WORKER_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace kvrecall::worker {

inline constexpr uint64_t kMaxSafetensorsHeaderBytes = uint64_t{100} << 20;  // 100 MiB
inline constexpr int kMaxSafetensorsRank = 8;

struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // empty = scalar
  // The tensor's bytes (num_elements() * DTypeSize(dtype)), little-endian, row-major. Points into
  // the file's read-only mapping: valid while the owning SafetensorsFile lives. Not necessarily
  // aligned to the element size.
  absl::Span<const uint8_t> data;

  int64_t num_elements() const;
};

// Parses and validates a whole .safetensors image (length, header and data region), as
// SafetensorsFile::Open does for its mapping; error codes as above. On OK, *tensors (sorted by
// name) point into `image`, which must outlive them, and *metadata holds "__metadata__"; on
// error both hold unspecified contents.
[[nodiscard]] absl::Status ParseSafetensorsImage(absl::Span<const uint8_t> image,
                                                 std::vector<SafetensorsTensor>* tensors,
                                                 std::map<std::string, std::string>* metadata);

// One memory-mapped .safetensors file, validated at Open.
// Thread safety: immutable after Open; any number of threads may read it.
class SafetensorsFile {
 public:
  // Maps and validates `path` (see the error codes above).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent.
  const SafetensorsTensor* Find(absl::string_view name) const;
  // Sorted by name.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A Hugging Face checkpoint directory: `model.safetensors.index.json` ({"weight_map": {tensor:
// shard file}}) naming every shard, else a single `model.safetensors`. All shards are opened and
// validated; every tensor the index names must be in its shard, and no tensor may appear twice.
class SafetensorsCheckpoint {
 public:
  // NOT_FOUND when the directory has neither file.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  // nullptr when absent.
  const SafetensorsTensor* Find(absl::string_view name) const;
  // Every tensor of every shard, sorted by name.
  std::vector<const SafetensorsTensor*> tensors() const;

 private:
  SafetensorsCheckpoint() = default;

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsTensor*, std::less<>> by_name_;
};

// A tensor to write: `data` holds num_elements(shape) * DTypeSize(dtype) bytes, row-major.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> data;
};

// Writes a .safetensors file atomically (a temporary file in the same directory, fsync, rename).
// Tensors are laid out in the given order, the header padded with spaces to a multiple of 8 bytes
// (so tensors of any of our dtypes start aligned when the given order keeps them so).
// INVALID_ARGUMENT for duplicate/empty names or a data size that does not match the shape.
[[nodiscard]] absl::Status WriteSafetensors(const std::string& path,
                                            absl::Span<const TensorToWrite> tensors,
                                            const std::map<std::string, std::string>& metadata = {
                                                {"format", "pt"}});

// The safetensors dtype string ("F32", "BF16", "F16").
absl::string_view SafetensorsDTypeName(DType dtype);

}  // namespace kvrecall::worker

#endif  // KVRECALL_GPU_WORKER_MODEL_SAFETENSORS_H_
