// For tests of Tier users: a Tier that passes every call to an inner one. Test doubles derive
// from it and override only the calls they watch or break.
#ifndef KVRECALL_CLIENT_TESTING_FORWARDING_TIER_H_
#define KVRECALL_CLIENT_TESTING_FORWARDING_TIER_H_

#include <string>
#include <utility>
#include <vector>

#include "client/tier.h"

namespace kvrecall::client::testing {

class ForwardingTier : public Tier {
 public:
  explicit ForwardingTier(Tier* inner) : inner_(inner) {}  // not owned
  absl::Status RegisterModel(const ModelSpec& spec) override { return inner_->RegisterModel(spec); }
  absl::StatusOr<OpenResult> OpenSequence(const std::string& id, const std::string& model,
                                          absl::Span<const int32_t> tokens) override {
    return inner_->OpenSequence(id, model, tokens);
  }
  absl::Status AppendKV(const std::string& id, const AppendBatch& b) override {
    return inner_->AppendKV(id, b);
  }
  absl::Status AppendKVBatch(absl::Span<const SequenceAppend> appends,
                             std::vector<bool>* stored) override {
    return inner_->AppendKVBatch(appends, stored);
  }
  absl::Status Retrieve(const RetrieveBatch& batch, std::vector<Recalled>* out) override {
    return inner_->Retrieve(batch, out);
  }
  absl::Span<float> QueryStaging(const ModelSpec& spec, int staging_area, size_t entries,
                                 int budget, int successors) override {
    return inner_->QueryStaging(spec, staging_area, entries, budget, successors);
  }
  absl::StatusOr<kvstore::BuildIndexOutcome> BuildIndex(const std::string& id,
                                                        kvstore::BuildIndexArgs a) override {
    return inner_->BuildIndex(id, std::move(a));
  }
  absl::Status CloseSequence(const std::string& id, bool drop) override {
    return inner_->CloseSequence(id, drop);
  }
  absl::StatusOr<kvstore::NodeStats> Stats(bool s) override { return inner_->Stats(s); }
  TierCounters counters() const override { return inner_->counters(); }
  std::string Describe() const override { return "forwarding to " + inner_->Describe(); }

 protected:
  Tier* inner() const { return inner_; }

 private:
  Tier* const inner_;
};

}  // namespace kvrecall::client::testing

#endif  // KVRECALL_CLIENT_TESTING_FORWARDING_TIER_H_
