// For tests of Tier users: an AppendKVBatch that fails one call part-way, as a batch does when
// its node is lost after storing some of it. Test doubles of client::Tier forward their
// AppendKVBatch here.
#ifndef KVRECALL_CLIENT_TESTING_FAILING_APPENDS_H_
#define KVRECALL_CLIENT_TESTING_FAILING_APPENDS_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "client/tier.h"

namespace kvrecall::client::testing {

class FailingAppends {
 public:
  // AppendKVBatch call `call` (from 1) stores every append but `sequence_id`'s, says which in
  // *stored, and answers UNAVAILABLE. Every other call goes to the inner tier as it is.
  void FailOnce(int call, std::string sequence_id) {
    fail_call_ = call;
    fail_of_ = std::move(sequence_id);
  }

  absl::Status AppendKVBatch(Tier* inner, absl::Span<const SequenceAppend> appends,
                             std::vector<bool>* stored) {
    if (++calls_ != fail_call_) return inner->AppendKVBatch(appends, stored);
    std::vector<SequenceAppend> others;
    for (const SequenceAppend& a : appends) {
      if (a.sequence_id != fail_of_) others.push_back(a);
    }
    if (!others.empty()) {
      if (absl::Status s = inner->AppendKVBatch(others); !s.ok()) return s;
    }
    if (stored != nullptr) {
      stored->resize(appends.size());
      for (size_t i = 0; i < appends.size(); ++i) (*stored)[i] = appends[i].sequence_id != fail_of_;
    }
    return absl::UnavailableError("the node of '" + fail_of_ + "' went away mid-batch");
  }

 private:
  int calls_ = 0, fail_call_ = 0;
  std::string fail_of_;
};

}  // namespace kvrecall::client::testing

#endif  // KVRECALL_CLIENT_TESTING_FAILING_APPENDS_H_
