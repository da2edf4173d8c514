#include "proto/convert.h"

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "indexer/kernels.h"

namespace kvrecall::proto {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

kvrecall::v1::DType ToProto(DType t) {
  switch (t) {
    case DType::kF32:
      return kvrecall::v1::DTYPE_F32;
    case DType::kBF16:
      return kvrecall::v1::DTYPE_BF16;
    case DType::kF16:
      return kvrecall::v1::DTYPE_F16;
  }
  return kvrecall::v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> FromProto(kvrecall::v1::DType t) {
  switch (t) {
    case kvrecall::v1::DTYPE_F32:
      return DType::kF32;
    case kvrecall::v1::DTYPE_BF16:
      return DType::kBF16;
    case kvrecall::v1::DTYPE_F16:
      return DType::kF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unsupported kv dtype ", static_cast<int>(t)));
  }
}

kvrecall::v1::Method ToProto(indexer::Method m) {
  switch (m) {
    case indexer::Method::kExact:
      return kvrecall::v1::METHOD_EXACT;
    case indexer::Method::kCtkvr:
      return kvrecall::v1::METHOD_CTKVR;
    case indexer::Method::kCluster:
      return kvrecall::v1::METHOD_CLUSTER;
    case indexer::Method::kMerged:
      return kvrecall::v1::METHOD_MERGED;
  }
  return kvrecall::v1::METHOD_UNSPECIFIED;
}

absl::StatusOr<indexer::Method> FromProto(kvrecall::v1::Method m) {
  switch (m) {
    case kvrecall::v1::METHOD_UNSPECIFIED:
    case kvrecall::v1::METHOD_EXACT:
      return indexer::Method::kExact;
    case kvrecall::v1::METHOD_CTKVR:
      return indexer::Method::kCtkvr;
    case kvrecall::v1::METHOD_CLUSTER:
      return indexer::Method::kCluster;
    case kvrecall::v1::METHOD_MERGED:
      return indexer::Method::kMerged;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown method ", static_cast<int>(m)));
  }
}

void ToProto(const ModelSpec& spec, kvrecall::v1::ModelSpec* out) {
  out->set_model_id(spec.model_id);
  out->set_num_layers(spec.num_layers);
  out->set_num_q_heads(spec.num_q_heads);
  out->set_num_kv_heads(spec.num_kv_heads);
  out->set_head_dim(spec.head_dim);
  out->set_kv_dtype(ToProto(spec.kv_dtype));
  out->set_vocab_size(spec.vocab_size);
  out->set_rope_theta(spec.rope_theta);
}

absl::StatusOr<ModelSpec> FromProto(const kvrecall::v1::ModelSpec& p) {
  ModelSpec spec;
  spec.model_id = p.model_id();
  spec.num_layers = p.num_layers();
  spec.num_q_heads = p.num_q_heads();
  spec.num_kv_heads = p.num_kv_heads();
  spec.head_dim = p.head_dim();
  auto dtype = FromProto(p.kv_dtype());
  if (!dtype.ok()) return dtype.status();
  spec.kv_dtype = *dtype;
  spec.vocab_size = p.vocab_size();
  spec.rope_theta = p.rope_theta();
  if (absl::Status s = spec.Validate(); !s.ok()) return s;
  return spec;
}

static_assert(std::endian::native == std::endian::little, "packed arrays are little-endian");

void PackInt32s(absl::Span<const int32_t> v, std::string* out) {
  out->resize(v.size() * 4);
  if (!v.empty()) std::memcpy(out->data(), v.data(), out->size());
}

void PackSlots(absl::Span<const int32_t> v, std::string* out) {
  out->resize(v.size() * 2);
  indexer::kernels::NarrowU16(v.data(), static_cast<int64_t>(v.size()),
                              reinterpret_cast<uint8_t*>(out->data()));
}

absl::Status UnpackInt32s(const std::string& in, std::vector<int32_t>* out) {
  if (in.size() % 4 != 0) return absl::DataLossError(absl::StrCat("packed int32 array of ", in.size(), " bytes"));
  out->resize(in.size() / 4);
  if (!in.empty()) std::memcpy(out->data(), in.data(), in.size());
  return absl::OkStatus();
}

absl::Status UnpackSlots(const std::string& in, std::vector<int32_t>* out) {
  if (in.size() % 2 != 0) return absl::DataLossError(absl::StrCat("packed uint16 array of ", in.size(), " bytes"));
  out->resize(in.size() / 2);
  indexer::kernels::WidenU16(reinterpret_cast<const uint8_t*>(in.data()),
                             static_cast<int64_t>(out->size()), out->data());
  return absl::OkStatus();
}

// Both conversions are branch-free loops over whole arrays, so that they vectorise: a decode
// step's Retrieve carries hundreds of KiB of queries.
bool PackExactBf16(absl::Span<const float> v, std::string* out) {
  uint32_t low = 0;
  for (float x : v) low |= std::bit_cast<uint32_t>(x) & 0xffffu;
  if (low != 0) return false;
  out->resize(v.size() * 2);
  auto* p = reinterpret_cast<uint8_t*>(out->data());
  for (size_t i = 0; i < v.size(); ++i) {
    const auto hi = static_cast<uint16_t>(std::bit_cast<uint32_t>(v[i]) >> 16);
    std::memcpy(p + 2 * i, &hi, 2);
  }
  return true;
}

absl::Status AppendBf16AsF32(const std::string& in, std::vector<float>* out) {
  if (in.size() % 2 != 0) return absl::InvalidArgumentError(absl::StrCat("bf16 array of ", in.size(), " bytes"));
  const size_t n = in.size() / 2, first = out->size();
  out->resize(first + n);
  const auto* p = reinterpret_cast<const uint8_t*>(in.data());
  float* o = out->data() + first;
  for (size_t i = 0; i < n; ++i) {
    uint16_t hi;
    std::memcpy(&hi, p + 2 * i, 2);
    o[i] = std::bit_cast<float>(static_cast<uint32_t>(hi) << 16);
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::proto
