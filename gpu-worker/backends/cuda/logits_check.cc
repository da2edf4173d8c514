// Teacher-forced logits of a backend for comparison with Hugging Face transformers
// (hf_oracle.py runs it on the GPU machine):
//   worker_cuda_logits_check BACKEND MODEL_DIR TOKENS_FILE FIRST_ROW OUT
// TOKENS_FILE: whitespace-separated token ids t[0..n). Runs the whole sequence as one causal
// prefill through the backend (Embed, Qkv, CPU attention over K/V rounded to the checkpoint's
// dtype as the engine stores them, FinishLayer, Logits) and writes the logits of positions
// [FIRST_ROW, n) to OUT as raw little-endian fp32, [n - FIRST_ROW][vocab].
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "gpu-worker/backends/attention.h"
#include "gpu-worker/backends/backend.h"

namespace kvrecall::worker {
namespace {

absl::Status Run(const std::string& backend, const std::string& dir, const std::string& tokens_file,
                 int first, const std::string& out_path) {
  std::vector<int32_t> tokens;
  {
    std::ifstream in(tokens_file);
    if (!in) return absl::NotFoundError("cannot read " + tokens_file);
    for (int32_t t; in >> t;) tokens.push_back(t);
  }
  const int n = static_cast<int>(tokens.size());
  if (n == 0 || first < 0 || first >= n)
    return absl::InvalidArgumentError("bad FIRST_ROW or no tokens");
  ASSIGN_OR_RETURN(std::unique_ptr<ModelBackend> model, CreateBackend(backend, dir));
  const LlamaConfig& c = model->config();
  const int hidden = c.hidden_size, hd = c.head_dim, group = c.group_size();
  const int qd = c.num_heads * hd, kvd = c.num_kv_heads * hd;
  std::vector<float> x(static_cast<size_t>(n) * hidden), q(static_cast<size_t>(n) * qd),
      k(static_cast<size_t>(n) * kvd), v(static_cast<size_t>(n) * kvd), attn(q.size());
  std::vector<int32_t> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = i;
  RETURN_IF_ERROR(model->Embed(tokens, x.data()));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int l = 0; l < c.num_layers; ++l) {
    RETURN_IF_ERROR(model->Qkv(l, x.data(), positions, q.data(), k.data(), v.data()));
    for (float& e : k) e = RoundTrip(c.dtype, e);
    for (float& e : v) e = RoundTrip(c.dtype, e);
    for (int t = 0; t < n; ++t) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        const size_t qo = static_cast<size_t>(t) * qd + static_cast<size_t>(g) * group * hd;
        AttendRows(q.data() + qo, group, hd, k.data() + g * hd, kvd, v.data() + g * hd, kvd, t + 1,
                   scale, attn.data() + qo);
      }
    }
    RETURN_IF_ERROR(model->FinishLayer(l, attn.data(), n, x.data()));
  }
  std::vector<float> logits(static_cast<size_t>(n - first) * c.vocab_size);
  RETURN_IF_ERROR(
      model->Logits(x.data() + static_cast<size_t>(first) * hidden, n - first, logits.data()));
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(logits.data()),
            static_cast<std::streamsize>(logits.size() * sizeof(float)));
  if (!out) return absl::InternalError("cannot write " + out_path);
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvrecall::worker

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: " << argv[0] << " BACKEND MODEL_DIR TOKENS_FILE FIRST_ROW OUT\n";
    return 2;
  }
  const absl::Status s =
      kvrecall::worker::Run(argv[1], argv[2], argv[3], std::atoi(argv[4]), argv[5]);
  if (!s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }
  return 0;
}
