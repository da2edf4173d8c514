// Prefill throughput of the CPU backend, attention excluded: Embed, then Qkv + FinishLayer for
// every layer over n rows (the attention output is stood in by q).
//   worker_cpu_bench [preset=tiny] [tokens=8192] [threads=0 (all cores)] [repeats=3]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu-worker/backends/backend.h"
#include "gpu-worker/model/make_model.h"

int main(int argc, char** argv) {
  using namespace kvrecall::worker;
  const std::string preset = argc > 1 ? argv[1] : "tiny";
  const int n = argc > 2 ? std::atoi(argv[2]) : 8192;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 0;
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 3;
  auto config = PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  const std::string dir = "/tmp/kvrecall_cpu_bench_" + preset + "_" + std::to_string(::getpid());
  if (auto s = WriteRandomModel(dir, *config, 1); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  auto backend = CreateBackend("cpu", dir, threads);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  const LlamaConfig& c = (*backend)->config();
  const int qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
  std::vector<int32_t> tokens(n), pos(n);
  for (int i = 0; i < n; ++i) tokens[i] = (i * 31 + 7) % c.vocab_size, pos[i] = i;
  std::vector<float> x(size_t(n) * c.hidden_size), q(size_t(n) * qd), k(size_t(n) * kvd),
      v(size_t(n) * kvd);
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    (void)(*backend)->Embed(tokens, x.data());
    for (int l = 0; l < c.num_layers; ++l) {
      (void)(*backend)->Qkv(l, x.data(), pos, q.data(), k.data(), v.data());
      (void)(*backend)->FinishLayer(l, q.data(), n, x.data());
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
    std::printf("run %d: %.3f s, %.0f tokens/s\n", r, s, n / s);
  }
  const double flops = 2.0 * n * c.num_layers *
                       (double(c.hidden_size) * (qd + 2 * kvd) + double(qd) * c.hidden_size +
                        3.0 * c.hidden_size * c.intermediate_size);
  std::printf("%s, %d tokens: best %.3f s = %.0f tokens/s, %.1f GFLOP/s\n", preset.c_str(), n, best,
              n / best, flops / best / 1e9);
  // How peaky is layer-0 attention of the random model? Softmax of the last query (head 0)
  // over all n keys: the largest weight and the effective number of keys 1 / sum(p^2).
  (void)(*backend)->Embed(tokens, x.data());
  (void)(*backend)->Qkv(0, x.data(), pos, q.data(), k.data(), v.data());
  for (int qi : {n - 1, n / 2}) {
    std::vector<double> p(qi + 1);
    double mx = -1e300, sum = 0, sum2 = 0, top = 0;
    for (int i = 0; i <= qi; ++i) {
      double d = 0;
      for (int j = 0; j < c.head_dim; ++j)
        d += double(q[size_t(qi) * qd + j]) * k[size_t(i) * kvd + j];
      p[i] = d / std::sqrt(double(c.head_dim));
      mx = std::max(mx, p[i]);
    }
    for (double& e : p) sum += (e = std::exp(e - mx));
    for (double e : p) top = std::max(top, e / sum), sum2 += (e / sum) * (e / sum);
    std::printf(
        "layer 0 head 0, query %d over %d keys: max weight %.4f (uniform %.6f), "
        "effective keys %.1f\n",
        qi, qi + 1, top, 1.0 / (qi + 1), 1.0 / sum2);
  }
  std::system(("rm -rf " + dir).c_str());
  return 0;
}
