// Element types of KV and weights, and conversions to/from fp32.
//
// bf16 and fp16 are carried as raw uint16_t bit patterns. Conversions to fp32 are exact;
// conversions from fp32 round to nearest even (NaN stays NaN).
#ifndef KVRECALL_COMMON_DTYPE_H_
#define KVRECALL_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace kvrecall {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Bytes per element.
constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }
absl::string_view DTypeName(DType t);  // "f32" | "bf16" | "f16"
absl::StatusOr<DType> ParseDType(absl::string_view name);  // accepts the names above

inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Rounds `f` through `t` and back (the value a tensor of dtype `t` would hold).
float RoundTrip(DType t, float f);

// Converts `n` elements of type `src_type` at `src` to fp32 into `dst`.
void ToF32(DType src_type, const void* src, size_t n, float* dst);
// Converts `n` fp32 values into `n` elements of type `dst_type` at `dst`.
void FromF32(DType dst_type, const float* src, size_t n, void* dst);

}  // namespace kvrecall

#endif  // KVRECALL_COMMON_DTYPE_H_
