// Conversions between the wire types of kvrecall/v1 and domain types. The only place that maps
// grpc::Status <-> absl::Status (both directions keep the canonical code and the message).
#ifndef KVRECALL_PROTO_CONVERT_H_
#define KVRECALL_PROTO_CONVERT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/model_spec.h"
#include "indexer/index.h"
#include "grpcpp/support/status.h"
#include "proto/kvrecall/v1/kvrecall.pb.h"

namespace kvrecall::proto {

grpc::Status ToGrpc(const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

kvrecall::v1::DType ToProto(DType t);
// INVALID_ARGUMENT for DTYPE_UNSPECIFIED or an unknown value.
absl::StatusOr<DType> FromProto(kvrecall::v1::DType t);

kvrecall::v1::Method ToProto(indexer::Method m);
// METHOD_UNSPECIFIED means exact; INVALID_ARGUMENT for an unknown value.
absl::StatusOr<indexer::Method> FromProto(kvrecall::v1::Method m);

void ToProto(const ModelSpec& spec, kvrecall::v1::ModelSpec* out);
// Converts and validates (ModelSpec::Validate).
absl::StatusOr<ModelSpec> FromProto(const kvrecall::v1::ModelSpec& spec);

// RetrieveResult's packed little-endian arrays: int32 token ids, uint16 slots.
// REQUIRES (PackSlots): every value in [0, 65535] (slots are below the budget, <= kMaxBudget).
void PackInt32s(absl::Span<const int32_t> v, std::string* out);
void PackSlots(absl::Span<const int32_t> v, std::string* out);
// DATA_LOSS when the byte count is not a whole number of elements.
absl::Status UnpackInt32s(const std::string& in, std::vector<int32_t>* out);
absl::Status UnpackSlots(const std::string& in, std::vector<int32_t>* out);

// RetrieveEntry.queries_bf16. When every value of `v` is exactly a bf16 (its low 16 bits are
// zero), packs the upper halves little-endian into *out and returns true; otherwise returns false
// (and *out is unspecified).
bool PackExactBf16(absl::Span<const float> v, std::string* out);
// Appends the fp32 values of packed bf16 `in` to *out. INVALID_ARGUMENT for an odd byte count.
absl::Status AppendBf16AsF32(const std::string& in, std::vector<float>* out);

}  // namespace kvrecall::proto

#endif  // KVRECALL_PROTO_CONVERT_H_
