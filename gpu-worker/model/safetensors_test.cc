#include "gpu-worker/model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;

std::string NewDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/st_", name, "_", ::getpid());
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string Le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// [length][header][data].
std::string File(const std::string& header, const std::string& data) {
  return Le64(header.size()) + header + data;
}

std::string F32Bytes(std::vector<float> v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

absl::Status OpenStatus(const std::string& name, const std::string& bytes) {
  const std::string path = NewDir(name) + "/x.safetensors";
  WriteBytes(path, bytes);
  return SafetensorsFile::Open(path).status();
}

TEST(SafetensorsTest, ReadsHandBuiltFile) {
  // Two tensors: "a" F32 [2] = {1, 2} at [0, 8); "b" BF16 [1, 2] = {1.0, -2.0} at [8, 12).
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]},)"
                             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data = F32Bytes({1.0f, 2.0f}) + std::string("\x80\x3f\x00\xc0", 4);
  const std::string path = NewDir("hand") + "/model.safetensors";
  WriteBytes(path, File(header, data));

  ASSERT_OK_AND_ASSIGN(auto f, SafetensorsFile::Open(path));
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  const SafetensorsTensor* a = f->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2}));
  ASSERT_EQ(a->data.size(), 8u);
  float av[2];
  std::memcpy(av, a->data.data(), 8);
  EXPECT_EQ(av[0], 1.0f);
  EXPECT_EQ(av[1], 2.0f);
  const SafetensorsTensor* b = f->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kBF16);
  EXPECT_EQ(b->num_elements(), 2);
  float bv[2];
  ToF32(DType::kBF16, b->data.data(), 2, bv);
  EXPECT_EQ(bv[0], 1.0f);
  EXPECT_EQ(bv[1], -2.0f);
  EXPECT_EQ(f->Find("c"), nullptr);
}

TEST(SafetensorsTest, WriterProducesExactBytes) {
  const std::string data = F32Bytes({1.0f, 2.0f});
  const TensorToWrite t{
      "a",
      DType::kF32,
      {2},
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size())};
  const std::string path = NewDir("writer") + "/w.safetensors";
  ASSERT_OK(WriteSafetensors(path, {t}));
  // JSON (keys sorted) padded with spaces to a multiple of 8 bytes: 85 + 3 = 88 = 0x58.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}})";
  ASSERT_EQ(header.size(), 85u);
  const std::string expected = std::string("\x58\0\0\0\0\0\0\0", 8) + header + "   " +
                               std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);
  EXPECT_EQ(ReadBytes(path), expected);
}

TEST(SafetensorsTest, RoundTripsAllDtypes) {
  std::vector<float> f32 = {0.5f, -1.25f, 3.0f, 1e-3f, 7.0f, -0.0f};
  std::vector<uint16_t> bf16(6), f16(6);
  FromF32(DType::kBF16, f32.data(), 6, bf16.data());
  FromF32(DType::kF16, f32.data(), 6, f16.data());
  auto span = [](const void* p, size_t n) {
    return absl::Span<const uint8_t>(static_cast<const uint8_t*>(p), n);
  };
  std::vector<TensorToWrite> tensors = {
      {"w.f32", DType::kF32, {2, 3}, span(f32.data(), 24)},
      {"w.bf16", DType::kBF16, {3, 2}, span(bf16.data(), 12)},
      {"w.f16", DType::kF16, {6}, span(f16.data(), 12)},
      {"empty", DType::kF32, {0, 4}, span(nullptr, 0)},
      {"scalar", DType::kF32, {}, span(f32.data(), 4)},
  };
  const std::string path = NewDir("roundtrip") + "/r.safetensors";
  ASSERT_OK(WriteSafetensors(path, tensors, {{"format", "pt"}, {"who", "kvrecall"}}));
  ASSERT_OK_AND_ASSIGN(auto f, SafetensorsFile::Open(path));
  EXPECT_EQ(f->metadata().at("who"), "kvrecall");
  ASSERT_EQ(f->tensors().size(), tensors.size());
  for (const TensorToWrite& t : tensors) {
    const SafetensorsTensor* r = f->Find(t.name);
    ASSERT_NE(r, nullptr) << t.name;
    EXPECT_EQ(r->dtype, t.dtype);
    EXPECT_EQ(r->shape, t.shape);
    ASSERT_EQ(r->data.size(), t.data.size());
    if (!t.data.empty()) {
      EXPECT_EQ(std::memcmp(r->data.data(), t.data.data(), t.data.size()), 0);
    }
  }
  // The writer is atomic: no temporary is left behind.
  EXPECT_EQ(::access((path + ".tmp." + std::to_string(::getpid())).c_str(), F_OK), -1);
  // Bad input to the writer.
  EXPECT_THAT(WriteSafetensors(path, {tensors[0], tensors[0]}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  TensorToWrite wrong = tensors[0];
  wrong.shape = {7};
  EXPECT_THAT(WriteSafetensors(path, {wrong}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SafetensorsTest, LyingHeadersAreRejectedWithCanonicalCodes) {
  const std::string d8 = F32Bytes({1.0f, 2.0f});
  auto one = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return absl::StrCat(R"({"t":{"dtype":")", dtype, R"(","shape":)", shape, R"(,"data_offsets":)",
                        offsets, "}}");
  };
  ASSERT_OK(OpenStatus("ok", File(one("F32", "[2]", "[0,8]"), d8)));

  const absl::StatusCode kLoss = absl::StatusCode::kDataLoss;
  const absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  struct Case {
    const char* what;
    std::string bytes;
    absl::StatusCode code;
  };
  const std::string good = File(one("F32", "[2]", "[0,8]"), d8);
  const Case cases[] = {
      {"empty file", "", kLoss},
      {"shorter than the length", "\x10\0\0", kLoss},
      {"length beyond file", Le64(1000) + one("F32", "[2]", "[0,8]") + d8, kLoss},
      {"huge length", Le64(~uint64_t{0}) + "{}", kLoss},
      {"length 2^63", Le64(uint64_t{1} << 63) + "{}", kLoss},
      {"truncated data", good.substr(0, good.size() - 3), kLoss},
      {"truncated header", good.substr(0, 20), kLoss},
      {"offsets past end", File(one("F32", "[2]", "[8,16]"), d8), kLoss},
      {"end past data", File(one("F32", "[3]", "[0,12]"), d8), kLoss},
      {"reversed offsets", File(one("F32", "[0]", "[8,0]"), d8), kLoss},
      {"shape/offset mismatch", File(one("F32", "[1]", "[0,8]"), d8), kLoss},
      {"dtype/offset mismatch", File(one("BF16", "[2]", "[0,8]"), d8), kLoss},
      {"shape overflow", File(one("F32", "[4294967296,4294967296,16]", "[0,8]"), d8), kLoss},
      // Found by tests/fuzz: an empty tensor whose leading dims overflow int64 (not uint64)
      // made num_elements() overflow.
      {"shape overflow before a zero dim",
       File(one("F32", "[3,4611686018427387904,0]", "[0,0]"), d8), kLoss},
      {"negative dim", File(one("F32", "[-2]", "[0,8]"), d8), kLoss},
      {"float dim", File(one("F32", "[2.0]", "[0,8]"), d8), kLoss},
      {"one offset", File(one("F32", "[2]", "[8]"), d8), kLoss},
      {"negative offset", File(one("F32", "[2]", "[-8,0]"), d8), kLoss},
      {"missing shape", File(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", d8), kLoss},
      {"entry not object", File(R"({"t":[1,2]})", d8), kLoss},
      {"metadata not strings", File(R"({"__metadata__":{"a":1}})", d8), kLoss},
      {"overlap",
       File(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            d8),
       kLoss},
      {"malformed JSON", File(R"({"t":{"dtype":"F32",)", d8), kLoss},
      {"header not an object", File("[1,2,3]", d8), kLoss},
      {"deeply nested", File(std::string(100000, '[') + std::string(100000, ']'), d8), kLoss},
      {"unknown dtype", File(one("Q7", "[2]", "[0,8]"), d8), kInvalid},
      {"unsupported dtype", File(one("F64", "[1]", "[0,8]"), d8), kInvalid},
      {"rank too high", File(one("F32", "[1,1,1,1,1,1,1,1,2]", "[0,8]"), d8), kInvalid},
  };
  int i = 0;
  for (const Case& c : cases) {
    EXPECT_THAT(OpenStatus(absl::StrCat("lie", i++), c.bytes), StatusIs(c.code)) << c.what;
  }
}

TEST(SafetensorsTest, HeaderOverTheCapIsInvalidArgument) {
  // A sparse file large enough to hold the claimed header: the cap, not the file size, trips.
  const std::string path = NewDir("cap") + "/big.safetensors";
  const uint64_t n = kMaxSafetensorsHeaderBytes + 1;
  WriteBytes(path, Le64(n));
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(8 + n)), 0);
  EXPECT_THAT(SafetensorsFile::Open(path), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  EXPECT_THAT(SafetensorsFile::Open(NewDir("missing") + "/nope.safetensors"),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(SafetensorsCheckpoint::Open(NewDir("missing2")),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(SafetensorsTest, OpensShardedCheckpoint) {
  const std::string dir = NewDir("sharded");
  const std::string d8 = F32Bytes({1.0f, 2.0f});
  const std::string d4 = F32Bytes({3.0f});
  WriteBytes(dir + "/model-00001-of-00002.safetensors",
             File(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d8));
  WriteBytes(dir + "/model-00002-of-00002.safetensors",
             File(R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", d4));
  WriteBytes(dir + "/model.safetensors.index.json",
             R"({"metadata":{"total_size":12},"weight_map":{
                 "x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}})");
  ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(dir));
  ASSERT_NE(ckpt->Find("x"), nullptr);
  ASSERT_NE(ckpt->Find("y"), nullptr);
  EXPECT_EQ(ckpt->Find("z"), nullptr);
  EXPECT_EQ(ckpt->tensors().size(), 2u);
  float y;
  std::memcpy(&y, ckpt->Find("y")->data.data(), 4);
  EXPECT_EQ(y, 3.0f);

  // The index promises a tensor its shard lacks.
  WriteBytes(dir + "/model.safetensors.index.json",
             R"({"weight_map":{"x":"model-00001-of-00002.safetensors",
                               "y":"model-00001-of-00002.safetensors"}})");
  EXPECT_THAT(SafetensorsCheckpoint::Open(dir), StatusIs(absl::StatusCode::kDataLoss));
  // A shard outside the directory.
  WriteBytes(dir + "/model.safetensors.index.json",
             R"({"weight_map":{"x":"../model-00001-of-00002.safetensors"}})");
  EXPECT_THAT(SafetensorsCheckpoint::Open(dir), StatusIs(absl::StatusCode::kInvalidArgument));
  // A missing shard.
  WriteBytes(dir + "/model.safetensors.index.json", R"({"weight_map":{"x":"gone.safetensors"}})");
  EXPECT_THAT(SafetensorsCheckpoint::Open(dir), StatusIs(absl::StatusCode::kNotFound));
  // A malformed index.
  WriteBytes(dir + "/model.safetensors.index.json", R"({"weight_map":[]})");
  EXPECT_THAT(SafetensorsCheckpoint::Open(dir), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(SafetensorsTest, OpensSingleFileCheckpoint) {
  const std::string dir = NewDir("single");
  WriteBytes(
      dir + "/model.safetensors",
      File(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", F32Bytes({1.0f, 2.0f})));
  ASSERT_OK_AND_ASSIGN(auto ckpt, SafetensorsCheckpoint::Open(dir));
  ASSERT_NE(ckpt->Find("x"), nullptr);
}

}  // namespace
}  // namespace kvrecall::worker
