#include "gpu-worker/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvrecall::worker {
namespace {

using json = nlohmann::json;

absl::Status ErrnoStatus(absl::string_view what, const std::string& path, int err) {
  const std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

absl::StatusOr<DType> ParseSafetensorsDType(const std::string& s) {
  if (s == "F32") return DType::kF32;
  if (s == "BF16") return DType::kBF16;
  if (s == "F16") return DType::kF16;
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype '", s, "'"));
}

}  // namespace

absl::Status ParseSafetensorsImage(absl::Span<const uint8_t> file,
                                   std::vector<SafetensorsTensor>* tensors,
                                   std::map<std::string, std::string>* metadata) {
  if (file.size() < 8) return absl::DataLossError("file shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];
  if (n > file.size() - 8) {
    return absl::DataLossError(
        absl::StrCat("header length ", n, " exceeds the file (", file.size(), " bytes)"));
  }
  if (n > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("header length ", n, " exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  const auto* hdr = reinterpret_cast<const char*>(file.data() + 8);
  const uint64_t data_size = file.size() - 8 - n;
  const uint8_t* data = file.data() + 8 + n;

  json j = json::parse(hdr, hdr + n, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::DataLossError("header is not well-formed JSON");
  if (!j.is_object()) return absl::DataLossError("header is not a JSON object");

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  tensors->clear();
  metadata->clear();
  tensors->reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return absl::DataLossError("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return absl::DataLossError(absl::StrCat("__metadata__.", m.key(), " is not a string"));
        }
        (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto bad = [&name](absl::string_view why) {
      return absl::DataLossError(absl::StrCat("tensor '", name, "': ", why));
    };
    if (!v.is_object()) return bad("entry is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) return bad("missing or non-string dtype");
    if (sh == v.end() || !sh->is_array()) return bad("missing or non-array shape");
    if (off == v.end() || !off->is_array() || off->size() != 2) {
      return bad("data_offsets is not a [begin, end] pair");
    }
    SafetensorsTensor t;
    t.name = name;
    auto dtype = ParseSafetensorsDType(dt->get<std::string>());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': ", dtype.status().message()));
    }
    t.dtype = *dtype;
    if (sh->size() > static_cast<size_t>(kMaxSafetensorsRank)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': rank ", sh->size(), " > ", kMaxSafetensorsRank));
    }
    // Element count with overflow checks; bytes must fit the data region anyway. Every prefix
    // product must fit int64 too, or num_elements() would overflow on a shape like [3, 2^62, 0].
    int64_t elements = 1;
    for (const json& d : *sh) {
      if (!d.is_number_unsigned()) return bad("shape entry is not a non-negative integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (uint64_t{1} << 62)) return bad("shape entry too large");
      t.shape.push_back(static_cast<int64_t>(dim));
      if (__builtin_mul_overflow(elements, static_cast<int64_t>(dim), &elements)) {
        return bad("shape overflows");
      }
    }
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(elements), uint64_t{DTypeSize(t.dtype)},
                               &bytes)) {
      return bad("shape overflows");
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
      return bad("data_offsets are not non-negative integers");
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end) return bad(absl::StrCat("data_offsets [", begin, ", ", end, ") reversed"));
    if (end > data_size) {
      return bad(absl::StrCat("data_offsets end ", end, " is past the data region (", data_size,
                              " bytes)"));
    }
    if (end - begin != bytes) {
      return bad(
          absl::StrCat("shape x dtype is ", bytes, " bytes but data_offsets span ", end - begin));
    }
    t.data = absl::Span<const uint8_t>(data + begin, static_cast<size_t>(bytes));
    tensors->push_back(std::move(t));
  }
  for (const SafetensorsTensor& t : *tensors) {
    const uint64_t begin = static_cast<uint64_t>(t.data.data() - data);
    ranges.push_back({begin, begin + t.data.size(), &t.name});
  }
  // Overlap check (gaps are allowed; empty tensors overlap nothing).
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Range* prev = nullptr;
  for (const Range& r : ranges) {
    if (r.begin == r.end) continue;
    if (prev != nullptr && r.begin < prev->end) {
      return absl::DataLossError(absl::StrCat("tensors '", *prev->name, "' and '", *r.name,
                                              "' overlap in the data region"));
    }
    prev = &r;
  }
  std::sort(tensors->begin(), tensors->end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.name < b.name; });
  return absl::OkStatus();
}

namespace {

// Shard names in an index must be plain file names inside the checkpoint directory.
bool IsPlainFileName(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\0') == std::string::npos;
}

}  // namespace

int64_t SafetensorsTensor::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::string_view SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
  }
  return "?";
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_size_ = static_cast<size_t>(st.st_size);
  if (f->map_size_ < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": file shorter than 8 bytes"));
  }
  void* m = ::mmap(nullptr, f->map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (m == MAP_FAILED) return ErrnoStatus("cannot mmap", path, err);
  f->map_ = m;
  absl::Status s = ParseSafetensorsImage(
      absl::Span<const uint8_t>(static_cast<const uint8_t*>(m), f->map_size_), &f->tensors_,
      &f->metadata_);
  if (!s.ok()) return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const SafetensorsTensor* SafetensorsFile::Find(absl::string_view name) const {
  auto it =
      std::lower_bound(tensors_.begin(), tensors_.end(), name,
                       [](const SafetensorsTensor& t, absl::string_view n) { return t.name < n; });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::ifstream in(index_path, std::ios::binary);
  if (!in) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir + "/model.safetensors"));
    for (const SafetensorsTensor& t : file->tensors()) ckpt->by_name_[t.name] = &t;
    ckpt->files_.push_back(std::move(file));
    return ckpt;
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": too large"));
  }
  json j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError(absl::StrCat(index_path, ": malformed JSON"));
  }
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) {
    return absl::DataLossError(absl::StrCat(index_path, ": no 'weight_map' object"));
  }
  std::map<std::string, std::vector<std::string>> by_shard;  // shard -> tensor names
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string()) {
      return absl::DataLossError(
          absl::StrCat(index_path, ": weight_map['", it.key(), "'] is not a string"));
    }
    const std::string shard = it.value().get<std::string>();
    if (!IsPlainFileName(shard)) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": shard name '", shard, "' is not a plain file name"));
    }
    by_shard[shard].push_back(it.key());
  }
  for (auto& [shard, names] : by_shard) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir + "/" + shard));
    for (const std::string& name : names) {
      if (file->Find(name) == nullptr) {
        return absl::DataLossError(
            absl::StrCat(file->path(), ": lacks tensor '", name, "' named by the index"));
      }
    }
    for (const SafetensorsTensor& t : file->tensors()) {
      if (!ckpt->by_name_.emplace(t.name, &t).second) {
        return absl::DataLossError(
            absl::StrCat("tensor '", t.name, "' appears in more than one shard"));
      }
    }
    ckpt->files_.push_back(std::move(file));
  }
  return ckpt;
}

const SafetensorsTensor* SafetensorsCheckpoint::Find(absl::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::vector<const SafetensorsTensor*> SafetensorsCheckpoint::tensors() const {
  std::vector<const SafetensorsTensor*> out;
  out.reserve(by_name_.size());
  for (const auto& [name, t] : by_name_) out.push_back(t);
  return out;
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad or duplicate tensor name '", t.name, "'"));
    }
    uint64_t elements = 1;
    for (int64_t d : t.shape) {
      if (d < 0) return absl::InvalidArgumentError(absl::StrCat(t.name, ": negative dim"));
      elements *= static_cast<uint64_t>(d);
    }
    if (elements * DTypeSize(t.dtype) != t.data.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(t.name, ": ", t.data.size(), " bytes do not match the shape"));
    }
    header[t.name] = {{"dtype", std::string(SafetensorsDTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{h.size()} >> (8 * i));

  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("cannot create", tmp, errno);
  auto write_all = [fd](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd, b, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      b += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  };
  bool ok = write_all(len, 8) && write_all(h.data(), h.size());
  for (const TensorToWrite& t : tensors) ok = ok && write_all(t.data.data(), t.data.size());
  ok = ok && ::fsync(fd) == 0;
  const int err = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = ok ? errno : err;
    ::unlink(tmp.c_str());
    return ErrnoStatus("cannot write", path, e);
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::worker
