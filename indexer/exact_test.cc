#include "indexer/exact.h"

#include <cmath>
#include <random>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrecall::indexer {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;

// Keys in pages of 4 tokens, fp32, head_dim 2.
struct Fixture {
  std::vector<std::vector<float>> pages;
  PagedRows rows;
  explicit Fixture(const std::vector<std::pair<float, float>>& keys) {
    rows.page_tokens = 4;
    rows.head_dim = 2;
    rows.dtype = DType::kF32;
    rows.row_stride = 2 * sizeof(float);
    rows.num_tokens = static_cast<int64_t>(keys.size());
    for (size_t t = 0; t < keys.size(); ++t) {
      if (t % 4 == 0) pages.emplace_back(8, 0.0f);
      pages.back()[(t % 4) * 2] = keys[t].first;
      pages.back()[(t % 4) * 2 + 1] = keys[t].second;
    }
    std::vector<const uint8_t*> table;
    for (auto& p : pages) table.push_back(reinterpret_cast<const uint8_t*>(p.data()));
    rows.SetPages(std::move(table));
  }
};

TEST(ExactSearchTest, SelectsHighestScoringTokensInAscendingOrder) {
  Fixture f({{0, 0}, {5, 0}, {1, 0}, {0, 9}, {4, 0}, {-3, 0}, {0, 0}});
  const float q[2] = {1, 0};
  SearchQuery sq{q, 1, &f.rows, 0, 7, 2, 1.0f};
  std::vector<std::vector<int32_t>> out;
  ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &out));
  EXPECT_THAT(out[0], ElementsAre(1, 4));
}

TEST(ExactSearchTest, GroupKeepsTokensThatMatterToAnyHead) {
  Fixture f({{0, 0}, {5, 0}, {1, 0}, {0, 9}, {4, 0}, {-3, 0}, {0, 0}});
  const float q[4] = {1, 0, 0, 1};  // head 0 likes token 1, head 1 likes token 3
  SearchQuery sq{q, 2, &f.rows, 0, 7, 2, 1.0f};
  std::vector<std::vector<int32_t>> out;
  ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &out));
  EXPECT_THAT(out[0], ElementsAre(1, 3));
}

TEST(ExactSearchTest, RespectsRangeAndClampsK) {
  Fixture f({{0, 0}, {5, 0}, {1, 0}, {0, 9}, {4, 0}, {-3, 0}, {0, 0}});
  const float q[2] = {1, 0};
  SearchQuery sq{q, 1, &f.rows, 2, 6, 100, 1.0f};
  std::vector<std::vector<int32_t>> out;
  ASSERT_OK(ExactSearch({&sq, 1}, nullptr, &out));
  EXPECT_THAT(out[0], ElementsAre(2, 3, 4, 5));
}

TEST(ExactSearchTest, RejectsRangeOutsideKeys) {
  Fixture f({{0, 0}, {1, 0}});
  const float q[2] = {1, 0};
  SearchQuery sq{q, 1, &f.rows, 0, 3, 1, 1.0f};
  std::vector<std::vector<int32_t>> out;
  EXPECT_THAT(ExactSearch({&sq, 1}, nullptr, &out), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ExactSearchTest, MatchesBruteForceOnRandomBf16KeysWithPool) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int d = 16, n = 300, group = 4;
  std::vector<uint16_t> data(static_cast<size_t>(n) * d);
  for (auto& x : data) x = F32ToBf16(nd(rng));
  PagedRows rows{nullptr, 0, 64, d * 2, d, DType::kBF16, n};
  std::vector<const uint8_t*> table;
  for (int p = 0; p < (n + 63) / 64; ++p)
    table.push_back(reinterpret_cast<const uint8_t*>(data.data() + p * 64 * d));
  rows.SetPages(std::move(table));
  std::vector<float> q(group * d);
  for (auto& x : q) x = nd(rng);
  SearchQuery sq{q.data(), group, &rows, 10, 290, 32, 0.25f};
  ThreadPool pool(2);
  std::vector<SearchQuery> batch(5, sq);
  std::vector<std::vector<int32_t>> out;
  ASSERT_OK(ExactSearch(batch, &pool, &out));
  // Brute force in double.
  std::vector<std::pair<double, int>> best;
  for (int t = 10; t < 290; ++t) {
    double s = 0;
    for (int h = 0; h < group; ++h) {
      double mx = -1e30, z = 0, mine = 0;
      for (int u = 10; u < 290; ++u) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[h * d + j] * Bf16ToF32(data[u * d + j]);
        mx = std::max(mx, dot * 0.25);
      }
      for (int u = 10; u < 290; ++u) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[h * d + j] * Bf16ToF32(data[u * d + j]);
        z += std::exp(dot * 0.25 - mx);
        if (u == t) mine = std::exp(dot * 0.25 - mx);
      }
      s = std::max(s, mine / z);
    }
    best.push_back({-s, t});
  }
  std::sort(best.begin(), best.end());
  std::vector<int32_t> expect;
  for (int i = 0; i < 32; ++i) expect.push_back(best[i].second);
  std::sort(expect.begin(), expect.end());
  for (const auto& o : out) EXPECT_EQ(o, expect);
}

}  // namespace
}  // namespace kvrecall::indexer
