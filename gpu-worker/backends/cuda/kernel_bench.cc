// Attention timings for Llama-3-8B shapes (32 q-heads, 8 kv-heads, head_dim 128, contiguous
// bf16 cache), printed as JSON on stdout; sdpa_reference.py times PyTorch's
// scaled_dot_product_attention on the same shapes and compares.
//   worker_cuda_kernel_bench [--quick] [--prefill | --ctkvr-lists]
// Default: dense decode attention (DecodeAttention), batch x context. --prefill: causal prefill
// attention (PrefillAttention) of one chunk of n query tokens at positions [start, start + n),
// with the automatic block size and with each of 64 and 128 query tokens per block; achieved
// TFLOP/s count the causal FLOPs 4 * n * (start + (n + 1) / 2) * head_dim * num_q_heads.
// Each configuration is timed as CUDA-graph replays of back-to-back calls (20 for decode; for
// prefill as many as fit in ~2 ms, 2 to 20), so launch gaps do not count, the median of 7
// replays after a warm-up; inputs are random (never zeros). --ctkvr-lists: CtkvrLists of one
// layer on the GPU against the tier's ctkvr build of the same keys on the host (RunCtkvrLists).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/thread_pool.h"
#include "gpu-worker/backends/cuda/kernels.h"
#include "indexer/index.h"

namespace {

using namespace kvrecall::worker::cuda;

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

// Fills n bf16 values with random numbers: 32 MiB from the host, then doubling device copies.
void FillRandom(uint16_t* dst, size_t n, std::mt19937& rng) {
  const size_t chunk = std::min<size_t>(n, size_t{16} << 20);
  std::vector<uint16_t> h(chunk);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto& x : h) {
    const float f = dist(rng);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    x = static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
  CHECK_CUDA(cudaMemcpy(dst, h.data(), chunk * 2, cudaMemcpyHostToDevice));
  size_t done = chunk;
  while (done < n) {
    const size_t c = std::min(done, n - done);
    CHECK_CUDA(cudaMemcpy(dst + done, dst, c * 2, cudaMemcpyDeviceToDevice));
    done += c;
  }
}

constexpr int kReplays = 7;

// The K/V cache view of `ctx` positions of kv_heads heads of d, contiguous (one sequence).
KvCacheView ContiguousCache(const uint16_t* k, const uint16_t* v, int64_t ctx, int kv_heads, int d) {
  KvCacheView c;
  c.k = k;
  c.v = v;
  c.page_stride = ctx * kv_heads * d;
  c.token_stride = kv_heads * d;
  c.head_stride = d;
  return c;
}

// Per-call times (ms) of `calls` back-to-back run()s captured in a CUDA graph: one entry per
// replay, sorted. run() must only enqueue work on `stream`.
template <class Run>
std::vector<float> TimeGraph(const Run& run, int calls, cudaStream_t stream) {
  for (int i = 0; i < 3; ++i) run();
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) run();
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int r = 0; r < kReplays; ++r) {
    CHECK_CUDA(cudaEventRecord(e0, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(e1, stream));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t / calls);
  }
  std::sort(ms.begin(), ms.end());
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  return ms;
}

// One prefill chunk per configuration: n query tokens at [start, start + n) over a contiguous
// [1][start + n][kv][d] cache.
int RunPrefill(bool quick, const cudaDeviceProp& prop, cudaStream_t stream, std::mt19937& rng) {
  const int q_heads = 32, kv_heads = 8, d = 128;
  std::vector<std::pair<int, int>> configs;  // (n, start)
  for (int start : {0, 32768}) {
    for (int n : {512, 2048, 8192}) configs.emplace_back(n, start);
  }
  configs.emplace_back(2048, 98304 - 2048);  // the last chunk of a 96K prompt
  if (quick) configs = {{2048, 0}, {2048, 32768}};
  std::printf(
      "{\"mode\": \"prefill\", \"device\": \"%s\", \"sms\": %d, \"model\": \"llama3-8b\", "
      "\"num_q_heads\": %d, \"num_kv_heads\": %d, \"head_dim\": %d, \"rows\": [",
      prop.name, prop.multiProcessorCount, q_heads, kv_heads, d);
  bool first = true;
  for (const auto& [n, start] : configs) {
    const int ctx = start + n;
    const size_t kv_elems = static_cast<size_t>(ctx) * kv_heads * d;
    const size_t q_elems = static_cast<size_t>(n) * q_heads * d;
    uint16_t *k, *v, *q, *out;
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&k), kv_elems * 2));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&v), kv_elems * 2));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&q), q_elems * 2));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&out), q_elems * 2));
    FillRandom(k, kv_elems, rng);
    FillRandom(v, kv_elems, rng);
    FillRandom(q, q_elems, rng);
    PrefillAttentionParams p;
    p.num_tokens = n;
    p.start = start;
    p.num_q_heads = q_heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = d;
    p.q = q;
    p.cache = ContiguousCache(k, v, ctx, kv_heads, d);
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
    p.out = out;
    const double flops = 4.0 * n * (start + (n + 1) / 2.0) * d * q_heads;
    std::vector<float> by_rows[3];  // block_rows 0 (auto), 64, 128
    const int rows_choice[3] = {0, 64, 128};
    for (int i = 0; i < 3; ++i) {
      p.block_rows = rows_choice[i];
      auto run = [&] {
        const absl::Status s = PrefillAttention(p, stream);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          std::exit(1);
        }
      };
      // Calls per graph: as many as fit in ~2 ms by a first estimate.
      const std::vector<float> est = TimeGraph(run, 1, stream);
      const int calls = std::max(2, std::min(20, static_cast<int>(2.0 / std::max(est[0], 1e-3f))));
      by_rows[i] = TimeGraph(run, calls, stream);
    }
    const std::vector<float>& ms = by_rows[0];
    const double med = ms[kReplays / 2];
    std::printf(
        "%s\n  {\"n\": %d, \"start\": %d, \"context\": %d, \"ours_ms\": %.5f, \"min_ms\": %.5f, "
        "\"max_ms\": %.5f, \"ms_block_rows_64\": %.5f, \"ms_block_rows_128\": %.5f, "
        "\"flops\": %.4g, \"ours_tflops\": %.1f}",
        first ? "" : ",", n, start, ctx, med, ms.front(), ms.back(), by_rows[1][kReplays / 2],
        by_rows[2][kReplays / 2], flops, flops / med / 1e9);
    std::fflush(stdout);
    first = false;
    CHECK_CUDA(cudaFree(k));
    CHECK_CUDA(cudaFree(v));
    CHECK_CUDA(cudaFree(q));
    CHECK_CUDA(cudaFree(out));
  }
  std::printf("\n]}\n");
  return 0;
}

// ctkvr lists of one layer (CtkvrLists: 8 centroids of 32 q-heads over 8 kv-heads, lists of
// 2048) on the GPU against what the tier does without them: the indexer's ctkvr build of the
// same keys and queries, one segment per kv-head, on the host's cores; and what the tier does
// with them (BuildSegment taking the GPU's lists: it scores only the listed tokens). Also the
// agreement of the two builds' lists and normalisers.
int RunCtkvrLists(bool quick, const cudaDeviceProp& prop, cudaStream_t stream, std::mt19937& rng) {
  namespace ix = kvrecall::indexer;
  const int q_heads = 32, kv_heads = 8, d = 128, centroids = 8, list_size = 2048, group = 4;
  const int sinks = 16, sparse_layers = 30;  // Llama-3-8B with 2 dense layers
  std::vector<int> contexts = {32768, 98304};
  if (quick) contexts = {32768};
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  kvrecall::ThreadPool pool(threads);
  std::printf(
      "{\"mode\": \"ctkvr-lists\", \"device\": \"%s\", \"sms\": %d, \"model\": \"llama3-8b\", "
      "\"num_q_heads\": %d, \"num_kv_heads\": %d, \"head_dim\": %d, \"centroids\": %d, "
      "\"list_size\": %d, \"host_threads\": %d, \"rows\": [",
      prop.name, prop.multiProcessorCount, q_heads, kv_heads, d, centroids, list_size, threads);
  bool first = true;
  for (int ctx : contexts) {
    const size_t k_elems = static_cast<size_t>(ctx) * kv_heads * d;
    const size_t q_elems = static_cast<size_t>(centroids) * q_heads * d;
    const size_t n_list = static_cast<size_t>(std::min(list_size, ctx - sinks));
    uint16_t *k, *q;
    int32_t* tokens;
    float* lse;
    void* ws;
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&k), k_elems * 2));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&q), q_elems * 2));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&tokens), kv_heads * centroids * n_list * 4));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&lse), kv_heads * centroids * group * 4));
    FillRandom(k, k_elems, rng);
    FillRandom(q, q_elems, rng);
    CtkvrListsParams p;
    p.keys = k;
    p.token_stride = kv_heads * d;
    p.head_stride = d;
    p.begin = sinks;
    p.end = ctx;
    p.queries = q;
    p.query_stride = q_heads * d;
    p.num_centroids = centroids;
    p.num_q_heads = q_heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = d;
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
    p.list_size = list_size;
    p.tokens = tokens;
    p.lse = lse;
    const absl::StatusOr<size_t> ws_bytes = CtkvrListsWorkspaceBytes(p);
    if (!ws_bytes.ok()) {
      std::fprintf(stderr, "%s\n", ws_bytes.status().ToString().c_str());
      return 1;
    }
    CHECK_CUDA(cudaMalloc(&ws, *ws_bytes));
    auto run = [&] {
      const absl::Status s = CtkvrLists(p, ws, *ws_bytes, stream);
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        std::exit(1);
      }
    };
    const std::vector<float> gpu_ms = TimeGraph(run, 5, stream);
    std::vector<int32_t> gpu_tokens(kv_heads * centroids * n_list);
    std::vector<float> gpu_lse(kv_heads * centroids * group);
    CHECK_CUDA(
        cudaMemcpy(gpu_tokens.data(), tokens, gpu_tokens.size() * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(gpu_lse.data(), lse, gpu_lse.size() * 4, cudaMemcpyDeviceToHost));

    // The host's copy of the same keys and queries, as the tier holds them.
    std::vector<uint16_t> hk(k_elems), hq(q_elems);
    CHECK_CUDA(cudaMemcpy(hk.data(), k, k_elems * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(hq.data(), q, q_elems * 2, cudaMemcpyDeviceToHost));
    std::vector<ix::PagedRows> rows(kv_heads);
    std::vector<std::vector<float>> grouped(kv_heads);  // [centroid][group][d] per kv-head
    for (int h = 0; h < kv_heads; ++h) {
      rows[h].page_tokens = ctx;
      rows[h].page_offset = static_cast<size_t>(h) * d * 2;
      rows[h].row_stride = static_cast<size_t>(kv_heads) * d * 2;
      rows[h].head_dim = d;
      rows[h].dtype = kvrecall::DType::kBF16;
      rows[h].num_tokens = ctx;
      rows[h].SetPages({reinterpret_cast<const uint8_t*>(hk.data())});
      for (int c = 0; c < centroids; ++c) {
        for (int j = 0; j < group * d; ++j) {
          const uint32_t bits = static_cast<uint32_t>(hq[(c * q_heads + h * group) * d + j]) << 16;
          float f;
          std::memcpy(&f, &bits, 4);
          grouped[h].push_back(f);
        }
      }
    }
    ix::IndexOptions io;
    io.ctkvr.centroids = centroids;
    io.ctkvr.list_size = list_size;
    auto input = [&](int h) {
      ix::BuildInput in;
      in.keys = &rows[h];
      in.token_begin = sinks;
      in.token_end = ctx;
      in.prompt_queries = grouped[h].data();
      in.num_prompt_queries = centroids;
      in.group = group;
      return in;
    };
    std::vector<std::unique_ptr<ix::Segment>> built(kv_heads), taken(kv_heads);
    std::vector<ix::CtkvrLists> given(kv_heads);
    for (int h = 0; h < kv_heads; ++h) {
      given[h] = {list_size, gpu_tokens.data() + static_cast<size_t>(h) * centroids * n_list,
                  gpu_lse.data() + static_cast<size_t>(h) * centroids * group};
    }
    // One layer's segments on the pool, one segment per thread (as the tier's IndexManager).
    auto layer = [&](bool with_lists) {
      const auto t0 = std::chrono::steady_clock::now();
      pool.ParallelFor(kv_heads, [&](int64_t h) {
        ix::BuildInput in = input(static_cast<int>(h));
        if (with_lists) in.ctkvr_lists = &given[h];
        auto seg = ix::BuildSegment(ix::Method::kCtkvr, in, io, nullptr);
        if (!seg.ok()) {
          std::fprintf(stderr, "%s\n", seg.status().ToString().c_str());
          std::exit(1);
        }
        (with_lists ? taken : built)[h] = std::move(*seg);
      });
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
          .count();
    };
    layer(false);  // warm-up (scratch buffers)
    const double cpu_build_ms = layer(false);
    layer(true);
    const double cpu_take_ms = layer(true);
    // One segment on one core: the tier's core time per segment.
    auto t0 = std::chrono::steady_clock::now();
    if (!ix::BuildSegment(ix::Method::kCtkvr, input(0), io, nullptr).ok()) return 1;
    const double core_build_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ix::BuildInput with = input(0);
    with.ctkvr_lists = &given[0];
    t0 = std::chrono::steady_clock::now();
    if (!ix::BuildSegment(ix::Method::kCtkvr, with, io, nullptr).ok()) return 1;
    const double core_take_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    // Agreement: tokens the two builds' lists share, and the largest normaliser difference.
    int64_t shared = 0, total = 0;
    double lse_diff = 0;
    for (int h = 0; h < kv_heads; ++h) {
      const absl::StatusOr<ix::CtkvrListsCopy> want = ix::CtkvrListsOf(*built[h]);
      if (!want.ok()) return 1;
      for (int c = 0; c < centroids; ++c) {
        const int32_t* g = given[h].tokens + static_cast<size_t>(c) * n_list;
        const int32_t* w = want->tokens.data() + static_cast<size_t>(c) * n_list;
        std::vector<int32_t> both;
        std::set_intersection(g, g + n_list, w, w + n_list, std::back_inserter(both));
        shared += static_cast<int64_t>(both.size());
        total += static_cast<int64_t>(n_list);
        for (int j = 0; j < group; ++j) {
          lse_diff = std::max(lse_diff, std::fabs(static_cast<double>(given[h].lse[c * group + j]) -
                                                  want->lse[c * group + j]));
        }
      }
    }
    const double gpu = gpu_ms[kReplays / 2];
    std::printf(
        "%s\n  {\"context\": %d, \"gpu_ms_per_layer\": %.4f, \"gpu_min_ms\": %.4f, "
        "\"gpu_max_ms\": %.4f, \"tier_build_ms_per_layer\": %.2f, \"tier_take_ms_per_layer\": "
        "%.2f, "
        "\"tier_build_core_ms_per_segment\": %.2f, \"tier_take_core_ms_per_segment\": %.2f, "
        "\"sparse_layers\": %d, \"gpu_ms_per_prompt\": %.2f, \"tier_build_core_s_per_prompt\": "
        "%.3f, "
        "\"tier_take_core_s_per_prompt\": %.3f, \"lists_agree\": %.6f, \"lse_max_abs_diff\": %.3g}",
        first ? "" : ",", ctx, gpu, gpu_ms.front(), gpu_ms.back(), cpu_build_ms, cpu_take_ms,
        core_build_ms, core_take_ms, sparse_layers, gpu * sparse_layers,
        core_build_ms * sparse_layers * kv_heads / 1e3,
        core_take_ms * sparse_layers * kv_heads / 1e3,
        static_cast<double>(shared) / static_cast<double>(total), lse_diff);
    std::fflush(stdout);
    first = false;
    CHECK_CUDA(cudaFree(k));
    CHECK_CUDA(cudaFree(q));
    CHECK_CUDA(cudaFree(tokens));
    CHECK_CUDA(cudaFree(lse));
    CHECK_CUDA(cudaFree(ws));
  }
  std::printf("\n]}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, prefill = false, lists = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--prefill") == 0) {
      prefill = true;
    } else if (std::strcmp(argv[i], "--ctkvr-lists") == 0) {
      lists = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--prefill | --ctkvr-lists]\n", argv[0]);
      return 2;
    }
  }
  const int q_heads = 32, kv_heads = 8, d = 128;
  std::vector<int> batches = {1, 8, 32}, contexts = {4096, 32768, 98304};
  if (quick) batches = {8}, contexts = {32768};
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  size_t free_b = 0, total_b = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::mt19937 rng(1234);
  if (prefill) return RunPrefill(quick, prop, stream, rng);
  if (lists) return RunCtkvrLists(quick, prop, stream, rng);
  std::printf(
      "{\"device\": \"%s\", \"sms\": %d, \"model\": \"llama3-8b\", \"num_q_heads\": %d, "
      "\"num_kv_heads\": %d, \"head_dim\": %d, \"rows\": [",
      prop.name, prop.multiProcessorCount, q_heads, kv_heads, d);
  bool first = true;
  for (int batch : batches) {
    for (int ctx : contexts) {
      const size_t kv_elems = static_cast<size_t>(batch) * ctx * kv_heads * d;
      const size_t need = 2 * kv_elems * 2 + (size_t{1} << 30);
      if (need > free_b) {
        std::fprintf(stderr, "skip batch %d context %d: %zu bytes needed\n", batch, ctx, need);
        continue;
      }
      uint16_t *k, *v, *q, *out;
      int32_t* lens;
      CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&k), kv_elems * 2));
      CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&v), kv_elems * 2));
      CHECK_CUDA(
          cudaMalloc(reinterpret_cast<void**>(&q), static_cast<size_t>(batch) * q_heads * d * 2));
      CHECK_CUDA(
          cudaMalloc(reinterpret_cast<void**>(&out), static_cast<size_t>(batch) * q_heads * d * 2));
      CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&lens), batch * sizeof(int32_t)));
      FillRandom(k, kv_elems, rng);
      FillRandom(v, kv_elems, rng);
      FillRandom(q, static_cast<size_t>(batch) * q_heads * d, rng);
      std::vector<int32_t> hl(batch, ctx);
      CHECK_CUDA(cudaMemcpy(lens, hl.data(), batch * 4, cudaMemcpyHostToDevice));
      DecodeAttentionParams p;
      p.batch = batch;
      p.num_q_heads = q_heads;
      p.num_kv_heads = kv_heads;
      p.head_dim = d;
      p.max_len = ctx;
      p.q = q;
      p.lengths = lens;
      p.cache = ContiguousCache(k, v, ctx, kv_heads, d);
      p.scale = 1.0f / std::sqrt(static_cast<float>(d));
      p.out = out;
      auto ws_bytes = DecodeAttentionWorkspaceBytes(p);
      if (!ws_bytes.ok()) {
        std::fprintf(stderr, "%s\n", ws_bytes.status().ToString().c_str());
        return 1;
      }
      void* ws = nullptr;
      if (*ws_bytes > 0) CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ws), *ws_bytes));
      auto run = [&] {
        const absl::Status s = DecodeAttention(p, ws, *ws_bytes, stream);
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          std::exit(1);
        }
      };
      const std::vector<float> ms = TimeGraph(run, 20, stream);
      const double med = ms[kReplays / 2];
      const double bytes = 2.0 * kv_elems * 2 + 2.0 * batch * q_heads * d * 2;
      std::printf(
          "%s\n  {\"batch\": %d, \"context\": %d, \"ours_ms\": %.5f, \"min_ms\": %.5f, "
          "\"max_ms\": %.5f, \"bytes\": %.0f, \"ours_gbps\": %.1f, \"workspace_bytes\": %zu}",
          first ? "" : ",", batch, ctx, med, ms.front(), ms.back(), bytes, bytes / med / 1e6,
          *ws_bytes);
      std::fflush(stdout);
      first = false;
      CHECK_CUDA(cudaFree(k));
      CHECK_CUDA(cudaFree(v));
      CHECK_CUDA(cudaFree(q));
      CHECK_CUDA(cudaFree(out));
      CHECK_CUDA(cudaFree(lens));
      if (ws != nullptr) CHECK_CUDA(cudaFree(ws));
    }
  }
  std::printf("\n]}\n");
  return 0;
}
