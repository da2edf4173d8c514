// Per-thread scratch vectors that a node reuses across calls: a fresh buffer of a decode step's
// size (hundreds of KiB) is mapped and page-faulted on every call.
#ifndef KVRECALL_KVSTORE_INTERNAL_REUSED_BUFFER_H_
#define KVRECALL_KVSTORE_INTERNAL_REUSED_BUFFER_H_

#include <cstddef>
#include <vector>

namespace kvrecall::kvstore::internal {

// Empties *v and reserves room for n elements. A buffer that an unusually large earlier call
// left behind (over 8 MiB and more than twice what this call needs) is freed first.
template <typename T>
void ClearForReuse(std::vector<T>* v, size_t n) {
  v->clear();
  if (v->capacity() * sizeof(T) > (size_t{8} << 20) && v->capacity() > 2 * n)
    std::vector<T>().swap(*v);
  v->reserve(n);
}

}  // namespace kvrecall::kvstore::internal

#endif  // KVRECALL_KVSTORE_INTERNAL_REUSED_BUFFER_H_
