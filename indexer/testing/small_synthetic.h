// Small synthetic Q/K sets and build inputs over them, shared by the indexer's unit tests.
#ifndef KVRECALL_INDEXER_TESTING_SMALL_SYNTHETIC_H_
#define KVRECALL_INDEXER_TESTING_SMALL_SYNTHETIC_H_

#include <cstdint>
#include <memory>
#include <utility>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "indexer/index.h"
#include "indexer/synthetic.h"

namespace kvrecall::indexer::test_data {

// head_dim 32, group 4, 4 sinks, a 32-token window and 4 needles, no lookup component; fails the
// test on error.
inline std::unique_ptr<SyntheticData> SmallSynthetic(int64_t tokens, int prompt_queries,
                                                     int decode_queries, uint64_t seed) {
  SyntheticOptions o;
  o.tokens = tokens;
  o.head_dim = 32;
  o.group = 4;
  o.prompt_queries = prompt_queries;
  o.decode_queries = decode_queries;
  o.sinks = 4;
  o.window = 32;
  o.needles = 4;
  o.seed = seed;
  // The index tests check the methods' mechanics on slowly drifting queries (every decode query
  // near the prompt's last ones); the per-position lookup component is tested in
  // quality_test.cc.
  o.query_token_weight = 0;
  auto d = GenerateSynthetic(o);
  EXPECT_OK(d.status());
  return std::move(d).value();
}

// A segment over tokens [begin, end) of `d`, with d's prompt queries (for ctkvr).
inline BuildInput InputOver(const SyntheticData& d, int64_t begin, int64_t end) {
  BuildInput in;
  in.keys = &d.keys;
  in.token_begin = begin;
  in.token_end = end;
  in.prompt_queries = d.prompt_queries.data();
  in.num_prompt_queries = d.num_prompt_queries;
  in.group = d.options.group;
  return in;
}

}  // namespace kvrecall::indexer::test_data

#endif  // KVRECALL_INDEXER_TESTING_SMALL_SYNTHETIC_H_
