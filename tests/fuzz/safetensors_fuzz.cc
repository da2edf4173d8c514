// Fuzz target: the safetensors header parser (gpu-worker/model/safetensors.h).
//
// Input: a whole .safetensors file image. ParseSafetensorsImage (what SafetensorsFile::Open runs
// over its mapping) must answer OK or an error, never read outside the image; on OK every tensor
// must lie inside the image with its declared size, and what a caller does next with a tensor
// (num_elements, reading its bytes) must be defined behaviour.
//
// KVRECALL_FUZZ_WRITE_SEEDS=DIR: writes seed files (made by WriteSafetensors) into DIR and exits.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "common/dtype.h"
#include "gpu-worker/model/safetensors.h"

namespace kvrecall::worker {
namespace {

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
  std::abort();
}

void Check(absl::Span<const uint8_t> image) {
  std::vector<SafetensorsTensor> tensors;
  std::map<std::string, std::string> metadata;
  if (!ParseSafetensorsImage(image, &tensors, &metadata).ok()) return;
  const uint8_t* const end = image.data() + image.size();
  uint8_t sum = 0;
  for (const SafetensorsTensor& t : tensors) {
    if (t.data.data() < image.data() || t.data.size() > static_cast<size_t>(end - t.data.data())) {
      Fail("a tensor's data lies outside the image");
    }
    const int64_t n = t.num_elements();
    if (n < 0 || static_cast<uint64_t>(n) * DTypeSize(t.dtype) != t.data.size()) {
      Fail("num_elements() x dtype size differs from the tensor's bytes");
    }
    for (uint8_t b : t.data) sum ^= b;  // every byte is readable (ASan checks)
  }
  for (size_t i = 1; i < tensors.size(); ++i) {
    if (!(tensors[i - 1].name < tensors[i].name)) Fail("tensors are not sorted by unique name");
  }
  volatile uint8_t sink = sum;
  (void)sink;
}

void WriteSeeds(const std::string& dir) {
  const std::vector<uint8_t> bytes(96, 0x3c);
  auto span = [&bytes](size_t n) { return absl::Span<const uint8_t>(bytes.data(), n); };
  const std::vector<std::vector<TensorToWrite>> files = {
      {},
      {{"w", DType::kF32, {2, 3}, span(24)}},
      {{"model.layers.0.self_attn.q_proj.weight", DType::kBF16, {4, 4}, span(32)},
       {"model.norm.weight", DType::kF16, {4}, span(8)},
       {"scalar", DType::kF32, {}, span(4)},
       {"empty", DType::kBF16, {0, 7}, span(0)},
       {"lm_head.weight", DType::kF32, {1, 2, 1, 2}, span(16)}},
  };
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string path = dir + "/seed_" + std::to_string(i) + ".safetensors";
    if (!WriteSafetensors(path, files[i], i == 1 ? std::map<std::string, std::string>{}
                                                  : std::map<std::string, std::string>{
                                                        {"format", "pt"}, {"note", "seed"}})
             .ok()) {
      Fail("cannot write a seed");
    }
  }
}

}  // namespace
}  // namespace kvrecall::worker

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVRECALL_FUZZ_WRITE_SEEDS")) {
    kvrecall::worker::WriteSeeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvrecall::worker::Check(absl::Span<const uint8_t>(data, size));
  return 0;
}
