#include "indexer/qk_dump.h"

#include <algorithm>
#include <bit>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kvrecall::indexer {
namespace {

static_assert(std::endian::native == std::endian::little, "qk dumps are little-endian");

constexpr char kFormat[] = "kvrecall-qk-dump";

std::string LayerPath(const std::string& dir, int layer, const char* what) {
  return absl::StrCat(dir, "/layer_", layer, ".", what, ".bin");
}

absl::Status CheckHeader(const QkDumpHeader& h) {
  if (h.head_dim <= 0 || h.num_q_heads <= 0 || h.num_kv_heads <= 0 || h.tokens <= 0 ||
      h.num_q_heads % h.num_kv_heads != 0 || h.prompt_tokens < 0 || h.prompt_tokens > h.tokens) {
    return absl::InvalidArgumentError("qk dump header: inconsistent sizes");
  }
  for (int l : h.layers)
    if (l < 0) return absl::InvalidArgumentError("qk dump header: negative layer");
  return absl::OkStatus();
}

bool HasLayer(const QkDumpHeader& h, int layer) {
  for (int l : h.layers)
    if (l == layer) return true;
  return false;
}

absl::Status WriteArray(const std::string& path, DType dtype, absl::Span<const float> data) {
  std::vector<uint8_t> bytes(data.size() * DTypeSize(dtype));
  FromF32(dtype, data.data(), data.size(), bytes.data());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::Status ReadArray(const std::string& path, DType dtype, size_t elements,
                       std::vector<float>* out) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    return absl::NotFoundError(absl::StrCat(path, " is missing"));
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec || size != elements * DTypeSize(dtype)) {
    return absl::DataLossError(absl::StrCat(path, ": ",
                                            ec ? ec.message() : absl::StrCat(size, " bytes"),
                                            ", expected ", elements * DTypeSize(dtype)));
  }
  std::vector<uint8_t> bytes(size);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!f) return absl::DataLossError(absl::StrCat("cannot read ", path));
  out->resize(elements);
  ToF32(dtype, bytes.data(), elements, out->data());
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteQkDumpHeader(const std::string& dir, const QkDumpHeader& h) {
  if (absl::Status s = CheckHeader(h); !s.ok()) return s;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  nlohmann::json j = {{"format", kFormat},
                      {"version", 1},
                      {"dtype", std::string(DTypeName(h.dtype))},
                      {"head_dim", h.head_dim},
                      {"num_q_heads", h.num_q_heads},
                      {"num_kv_heads", h.num_kv_heads},
                      {"tokens", h.tokens},
                      {"prompt_tokens", h.prompt_tokens},
                      {"layers", h.layers},
                      {"has_values", h.has_values},
                      {"rope_theta", h.rope_theta},
                      {"model", h.model}};
  std::ofstream f(dir + "/header.json", std::ios::trunc);
  f << j.dump(2) << "\n";
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", dir, "/header.json"));
  return absl::OkStatus();
}

absl::Status WriteQkDumpLayer(const std::string& dir, const QkDumpHeader& h, int layer,
                              absl::Span<const float> q, absl::Span<const float> k,
                              absl::Span<const float> v) {
  if (absl::Status s = CheckHeader(h); !s.ok()) return s;
  if (!HasLayer(h, layer))
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " not in the header"));
  const size_t per_head = static_cast<size_t>(h.tokens) * h.head_dim;
  if (q.size() != per_head * h.num_q_heads || k.size() != per_head * h.num_kv_heads ||
      v.size() != (h.has_values ? per_head * h.num_kv_heads : 0)) {
    return absl::InvalidArgumentError("qk dump layer: array sizes do not match the header");
  }
  if (absl::Status s = WriteArray(LayerPath(dir, layer, "q"), h.dtype, q); !s.ok()) return s;
  if (absl::Status s = WriteArray(LayerPath(dir, layer, "k"), h.dtype, k); !s.ok()) return s;
  if (h.has_values) return WriteArray(LayerPath(dir, layer, "v"), h.dtype, v);
  return absl::OkStatus();
}

absl::StatusOr<QkDumpHeader> ReadQkDumpHeader(const std::string& dir) {
  const std::string path = dir + "/header.json";
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat(path, " is missing"));
  std::stringstream ss;
  ss << f.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::DataLossError(absl::StrCat(path, ": not JSON"));
  QkDumpHeader h;
  try {
    if (j.at("format").get<std::string>() != kFormat || j.at("version").get<int>() != 1) {
      return absl::DataLossError(absl::StrCat(path, ": not a version-1 ", kFormat, " header"));
    }
    absl::StatusOr<DType> dt = ParseDType(j.at("dtype").get<std::string>());
    if (!dt.ok()) return absl::DataLossError(absl::StrCat(path, ": ", dt.status().message()));
    h.dtype = *dt;
    h.head_dim = j.at("head_dim").get<int>();
    h.num_q_heads = j.at("num_q_heads").get<int>();
    h.num_kv_heads = j.at("num_kv_heads").get<int>();
    h.tokens = j.at("tokens").get<int64_t>();
    h.prompt_tokens = j.value("prompt_tokens", h.tokens);
    h.layers = j.at("layers").get<std::vector<int>>();
    h.has_values = j.value("has_values", false);
    h.rope_theta = j.value("rope_theta", 0.0);
    h.model = j.value("model", std::string());
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(absl::StrCat(path, ": ", e.what()));
  }
  if (absl::Status s = CheckHeader(h); !s.ok())
    return absl::DataLossError(absl::StrCat(path, ": ", s.message()));
  return h;
}

absl::StatusOr<QkDumpLayer> ReadQkDumpLayer(const std::string& dir, const QkDumpHeader& h,
                                            int layer) {
  if (!HasLayer(h, layer))
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " not in the header"));
  QkDumpLayer out;
  out.layer = layer;
  const size_t per_head = static_cast<size_t>(h.tokens) * h.head_dim;
  if (absl::Status s =
          ReadArray(LayerPath(dir, layer, "q"), h.dtype, per_head * h.num_q_heads, &out.q);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          ReadArray(LayerPath(dir, layer, "k"), h.dtype, per_head * h.num_kv_heads, &out.k);
      !s.ok()) {
    return s;
  }
  if (h.has_values) {
    if (absl::Status s =
            ReadArray(LayerPath(dir, layer, "v"), h.dtype, per_head * h.num_kv_heads, &out.v);
        !s.ok()) {
      return s;
    }
  }
  return out;
}

PagedRows DumpRows(const QkDumpHeader& h, const QkDumpLayer& layer, int kv_head, bool values) {
  const std::vector<float>& src = values ? layer.v : layer.k;
  PagedRows rows;
  rows.page_tokens = static_cast<int>(std::min<int64_t>(h.tokens, int64_t{1} << 30));
  rows.row_stride = static_cast<size_t>(h.head_dim) * sizeof(float);
  rows.head_dim = h.head_dim;
  rows.dtype = DType::kF32;
  rows.num_tokens = h.tokens;
  rows.SetPages({reinterpret_cast<const uint8_t*>(src.data() + static_cast<size_t>(kv_head) *
                                                                   h.tokens * h.head_dim)});
  return rows;
}

void DumpQueryGroup(const QkDumpHeader& h, const QkDumpLayer& layer, int kv_head, int64_t position,
                    std::vector<float>* out) {
  const int group = h.num_q_heads / h.num_kv_heads;
  out->resize(static_cast<size_t>(group) * h.head_dim);
  for (int g = 0; g < group; ++g) {
    const int qh = kv_head * group + g;
    const float* src =
        layer.q.data() + (static_cast<size_t>(qh) * h.tokens + position) * h.head_dim;
    std::copy(src, src + h.head_dim, out->begin() + static_cast<size_t>(g) * h.head_dim);
  }
}

}  // namespace kvrecall::indexer
