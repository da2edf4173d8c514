// ThreadSanitizer shim for Debian's prebuilt Abseil synchronisation primitives.
//
// Debian ships Abseil as shared libraries built without -fsanitize=thread, so the ThreadSanitizer
// annotations inside absl::Mutex (ABSL_TSAN_MUTEX_*) are compiled out: TSan sees neither the
// locks nor the futex hand-offs behind absl::Mutex, CondVar, Notification, BlockingCounter and
// Barrier, and reports every ABSL_GUARDED_BY access as a race. Only KVRECALL_TSAN builds compile
// this file. cmake/kvrecall.cmake links every executable with `-Wl,--wrap=<symbol>` for each
// function defined below, so our objects' calls to e.g. absl::Mutex::Lock() reach
// __wrap_<mangled Lock> here; each wrapper calls the real Abseil function (__real_<mangled>)
// and tells TSan what it did, with the same annotations Abseil itself makes when it is built
// with TSan (absl/synchronization/mutex.cc). --wrap only rewrites references from the objects
// being linked, so calls made inside libabsl are not wrapped. That is fine for Abseil's private
// use of its own primitives; the out-of-line entry points that lock or unlock on our behalf
// (ReleasableMutexLock::Release) are wrapped themselves. Inline header code needs nothing: it is
// compiled with -fsanitize=thread (the inline Mutex constructor already calls __tsan_mutex_create).
//
// The list of wrapped symbols is taken from this file: every `KVRECALL_TSAN_WRAP("_ZN", "...")`
// below becomes one --wrap flag (cmake/kvrecall.cmake reads them from here), and a symbol Abseil
// does not export fails the link (its __real_ stays undefined) instead of silently going
// unannotated.
//
// Conditions (Mutex::Await, LockWhen, CondVar waits): Abseil evaluates absl::Condition inside
// the library, in the waiting thread or in whichever thread unlocks. Both happen between our
// pre_lock/post_lock or pre_unlock/post_unlock annotations, where TSan ignores memory accesses,
// so the (instrumented) condition function's reads of guarded state are never reported; the
// waiter's acquire happens in post_lock once it owns the mutex again.

#include <sanitizer/tsan_interface.h>

// Exported by the TSan runtime but not declared in its public header: between begin and end, the
// calling thread's memory accesses (its own and those of intercepted calls) are not recorded.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();

#include <atomic>
#include <cstdint>

#include "absl/synchronization/barrier.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#ifndef KVRECALL_ABSL_MANGLED_NS
#error "KVRECALL_ABSL_MANGLED_NS (e.g. \"4absl7debian3\") comes from cmake/kvrecall.cmake"
#endif

// `void F(Mutex*) KVRECALL_TSAN_WRAP("_ZN", "5Mutex4LockEv");` gives F the symbol
// __wrap__ZN4absl7debian35Mutex4LockEv (`_ZNK` for const member functions), and
// KVRECALL_TSAN_REAL likewise names __real_<symbol>, which the linker binds to Abseil's function.
// Member functions are declared as free functions taking `this` first: that is how the Itanium
// C++ ABI passes it.
#define KVRECALL_TSAN_WRAP(lead, rest) __asm__("__wrap_" lead KVRECALL_ABSL_MANGLED_NS rest)
#define KVRECALL_TSAN_REAL(lead, rest) __asm__("__real_" lead KVRECALL_ABSL_MANGLED_NS rest)

namespace kvrecall::tsan_internal {

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Notification;
using absl::Time;

// Await and CondVar::Wait accept a mutex held in either mode, and TSan must be told the mode it
// releases. Abseil decides it the same way (mutex.cc, AwaitCommon / CondVar::WaitCommon): the
// writer bit of the mutex word, its only member.
static_assert(sizeof(Mutex) == sizeof(std::atomic<intptr_t>), "absl::Mutex layout changed");
constexpr intptr_t kMuWriter = 0x0008;  // absl/synchronization/mutex.cc
unsigned HeldFlags(const Mutex* mu) {
  intptr_t v = reinterpret_cast<const std::atomic<intptr_t>*>(mu)->load(std::memory_order_relaxed);
  return (v & kMuWriter) != 0 ? 0 : __tsan_mutex_read_lock;
}

// Models "release mu, block, re-acquire mu" around a call that may do exactly that. When the
// library finds the condition already true it does not unlock; the extra release/acquire pair
// TSan then sees only orders this thread with itself.
template <typename F>
auto WaitHolding(Mutex* mu, F&& wait) {
  const unsigned flags = HeldFlags(mu);
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
  __tsan_mutex_pre_lock(mu, flags);
  auto result = wait();
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

template <typename F>
auto Locking(Mutex* mu, unsigned flags, F&& lock) {
  __tsan_mutex_pre_lock(mu, flags);
  auto result = lock();
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

// ---- absl::Mutex ----

void RealLock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex4LockEv");
void RealUnlock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex6UnlockEv");
void RealReaderLock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex10ReaderLockEv");
void RealReaderUnlock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex12ReaderUnlockEv");
bool RealTryLock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex7TryLockEv");
bool RealReaderTryLock(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5Mutex13ReaderTryLockEv");
void RealLockWhen(Mutex*, const Condition&)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex8LockWhenERKNS0_9ConditionE");
void RealReaderLockWhen(Mutex*, const Condition&)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
bool RealLockWhenWithTimeout(Mutex*, const Condition&, Duration)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool RealLockWhenWithDeadline(Mutex*, const Condition&, Time)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
bool RealReaderLockWhenWithTimeout(Mutex*, const Condition&, Duration)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool RealReaderLockWhenWithDeadline(Mutex*, const Condition&, Time)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
void RealAwait(Mutex*, const Condition&)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex5AwaitERKNS0_9ConditionE");
bool RealAwaitWithTimeout(Mutex*, const Condition&, Duration)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool RealAwaitWithDeadline(Mutex*, const Condition&, Time)
    KVRECALL_TSAN_REAL("_ZN", "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
void RealMutexDtor(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5MutexD1Ev");
void RealMutexBaseDtor(Mutex*) KVRECALL_TSAN_REAL("_ZN", "5MutexD2Ev");

void WrapLock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex4LockEv");
void WrapLock(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, 0);
  RealLock(mu);
  __tsan_mutex_post_lock(mu, 0, 0);
}

void WrapUnlock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex6UnlockEv");
void WrapUnlock(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, 0);
  RealUnlock(mu);
  __tsan_mutex_post_unlock(mu, 0);
}

void WrapReaderLock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex10ReaderLockEv");
void WrapReaderLock(Mutex* mu) {
  __tsan_mutex_pre_lock(mu, __tsan_mutex_read_lock);
  RealReaderLock(mu);
  __tsan_mutex_post_lock(mu, __tsan_mutex_read_lock, 0);
}

void WrapReaderUnlock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex12ReaderUnlockEv");
void WrapReaderUnlock(Mutex* mu) {
  __tsan_mutex_pre_unlock(mu, __tsan_mutex_read_lock);
  RealReaderUnlock(mu);
  __tsan_mutex_post_unlock(mu, __tsan_mutex_read_lock);
}

bool TryLocking(Mutex* mu, unsigned flags, bool (*real)(Mutex*)) {
  flags |= __tsan_mutex_try_lock;
  __tsan_mutex_pre_lock(mu, flags);
  const bool locked = real(mu);
  __tsan_mutex_post_lock(mu, locked ? flags : flags | __tsan_mutex_try_lock_failed, 0);
  return locked;
}

bool WrapTryLock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex7TryLockEv");
bool WrapTryLock(Mutex* mu) { return TryLocking(mu, 0, RealTryLock); }

bool WrapReaderTryLock(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5Mutex13ReaderTryLockEv");
bool WrapReaderTryLock(Mutex* mu) {
  return TryLocking(mu, __tsan_mutex_read_lock, RealReaderTryLock);
}

// LockWhen*: the condition is evaluated inside, between our pre_lock and post_lock (ignored);
// the timed variants hold the mutex on return whether or not the condition became true.
void WrapLockWhen(Mutex* mu, const Condition& c)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex8LockWhenERKNS0_9ConditionE");
void WrapLockWhen(Mutex* mu, const Condition& c) {
  Locking(mu, 0, [&] { return (RealLockWhen(mu, c), 0); });
}

void WrapReaderLockWhen(Mutex* mu, const Condition& c)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
void WrapReaderLockWhen(Mutex* mu, const Condition& c) {
  Locking(mu, __tsan_mutex_read_lock, [&] { return (RealReaderLockWhen(mu, c), 0); });
}

bool WrapLockWhenWithTimeout(Mutex* mu, const Condition& c, Duration d)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool WrapLockWhenWithTimeout(Mutex* mu, const Condition& c, Duration d) {
  return Locking(mu, 0, [&] { return RealLockWhenWithTimeout(mu, c, d); });
}

bool WrapLockWhenWithDeadline(Mutex* mu, const Condition& c, Time t)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
bool WrapLockWhenWithDeadline(Mutex* mu, const Condition& c, Time t) {
  return Locking(mu, 0, [&] { return RealLockWhenWithDeadline(mu, c, t); });
}

bool WrapReaderLockWhenWithTimeout(Mutex* mu, const Condition& c, Duration d)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool WrapReaderLockWhenWithTimeout(Mutex* mu, const Condition& c, Duration d) {
  return Locking(mu, __tsan_mutex_read_lock,
                 [&] { return RealReaderLockWhenWithTimeout(mu, c, d); });
}

bool WrapReaderLockWhenWithDeadline(Mutex* mu, const Condition& c, Time t)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
bool WrapReaderLockWhenWithDeadline(Mutex* mu, const Condition& c, Time t) {
  return Locking(mu, __tsan_mutex_read_lock,
                 [&] { return RealReaderLockWhenWithDeadline(mu, c, t); });
}

void WrapAwait(Mutex* mu, const Condition& c)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex5AwaitERKNS0_9ConditionE");
void WrapAwait(Mutex* mu, const Condition& c) {
  WaitHolding(mu, [&] { return (RealAwait(mu, c), 0); });
}

bool WrapAwaitWithTimeout(Mutex* mu, const Condition& c, Duration d)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
bool WrapAwaitWithTimeout(Mutex* mu, const Condition& c, Duration d) {
  return WaitHolding(mu, [&] { return RealAwaitWithTimeout(mu, c, d); });
}

bool WrapAwaitWithDeadline(Mutex* mu, const Condition& c, Time t)
    KVRECALL_TSAN_WRAP("_ZN", "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
bool WrapAwaitWithDeadline(Mutex* mu, const Condition& c, Time t) {
  return WaitHolding(mu, [&] { return RealAwaitWithDeadline(mu, c, t); });
}

// The inline constructor already calls __tsan_mutex_create in TSan-compiled code; the matching
// destroy lives in mutex.cc, so it is made here. Without it a mutex whose memory is reused (stack,
// placement) would keep its old TSan state.
//
// Debian's Abseil is built with deadlock detection on: the real destructor removes the mutex from
// a process-wide lock graph (GraphCycles::RemoveNode) under an internal spin lock TSan cannot see,
// and the graph's memmove (an intercepted call) then reads as a race between two threads that
// destroy mutexes at once. The destructor's own accesses are therefore ignored, as the lock paths'
// are between pre_lock and post_lock.
void DestroyIgnoringAccesses(Mutex* mu, void (*real)(Mutex*)) {
  __tsan_mutex_destroy(mu, __tsan_mutex_not_static);
  __tsan_ignore_thread_begin();
  real(mu);
  __tsan_ignore_thread_end();
}

void WrapMutexDtor(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5MutexD1Ev");
void WrapMutexDtor(Mutex* mu) { DestroyIgnoringAccesses(mu, RealMutexDtor); }

void WrapMutexBaseDtor(Mutex* mu) KVRECALL_TSAN_WRAP("_ZN", "5MutexD2Ev");
void WrapMutexBaseDtor(Mutex* mu) { DestroyIgnoringAccesses(mu, RealMutexBaseDtor); }

// ReleasableMutexLock::Release() is out of line and unlocks inside the library; the lock's only
// member is the Mutex*.
static_assert(sizeof(absl::ReleasableMutexLock) == sizeof(Mutex*), "ReleasableMutexLock layout");
void RealReleasableRelease(absl::ReleasableMutexLock*)
    KVRECALL_TSAN_REAL("_ZN", "19ReleasableMutexLock7ReleaseEv");

void WrapReleasableRelease(absl::ReleasableMutexLock* lock)
    KVRECALL_TSAN_WRAP("_ZN", "19ReleasableMutexLock7ReleaseEv");
void WrapReleasableRelease(absl::ReleasableMutexLock* lock) {
  Mutex* mu = *reinterpret_cast<Mutex**>(lock);
  __tsan_mutex_pre_unlock(mu, 0);
  RealReleasableRelease(lock);
  __tsan_mutex_post_unlock(mu, 0);
}

// ---- absl::CondVar ----
// Signal/SignalAll carry no happens-before of their own (that goes through the mutex), so they
// are left alone, as Abseil's own annotations do.

void RealCondVarWait(CondVar*, Mutex*) KVRECALL_TSAN_REAL("_ZN", "7CondVar4WaitEPNS0_5MutexE");
bool RealCondVarWaitWithTimeout(CondVar*, Mutex*, Duration)
    KVRECALL_TSAN_REAL("_ZN", "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
bool RealCondVarWaitWithDeadline(CondVar*, Mutex*, Time)
    KVRECALL_TSAN_REAL("_ZN", "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");

void WrapCondVarWait(CondVar* cv, Mutex* mu)
    KVRECALL_TSAN_WRAP("_ZN", "7CondVar4WaitEPNS0_5MutexE");
void WrapCondVarWait(CondVar* cv, Mutex* mu) {
  WaitHolding(mu, [&] { return (RealCondVarWait(cv, mu), 0); });
}

bool WrapCondVarWaitWithTimeout(CondVar* cv, Mutex* mu, Duration d)
    KVRECALL_TSAN_WRAP("_ZN", "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
bool WrapCondVarWaitWithTimeout(CondVar* cv, Mutex* mu, Duration d) {
  return WaitHolding(mu, [&] { return RealCondVarWaitWithTimeout(cv, mu, d); });
}

bool WrapCondVarWaitWithDeadline(CondVar* cv, Mutex* mu, Time t)
    KVRECALL_TSAN_WRAP("_ZN", "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
bool WrapCondVarWaitWithDeadline(CondVar* cv, Mutex* mu, Time t) {
  return WaitHolding(mu, [&] { return RealCondVarWaitWithDeadline(cv, mu, t); });
}

// ---- absl::Notification ----
// Notify releases, a successful wait acquires, both on the address of `notified_yet_` (the member
// after the internal mutex): HasBeenNotified() is inline, i.e. an instrumented acquire load of that
// atomic, and TSan keys an atomic's synchronisation by its address, so it acquires the same.

static_assert(sizeof(Notification) == 2 * sizeof(Mutex), "absl::Notification layout changed");
void* NotifiedFlag(const Notification* n) {
  return const_cast<char*>(reinterpret_cast<const char*>(n)) + sizeof(Mutex);
}

void RealNotify(Notification*) KVRECALL_TSAN_REAL("_ZN", "12Notification6NotifyEv");
void RealWaitForNotification(const Notification*)
    KVRECALL_TSAN_REAL("_ZNK", "12Notification19WaitForNotificationEv");
bool RealWaitForNotificationWithTimeout(const Notification*, Duration)
    KVRECALL_TSAN_REAL("_ZNK", "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
bool RealWaitForNotificationWithDeadline(const Notification*, Time)
    KVRECALL_TSAN_REAL("_ZNK", "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");

void WrapNotify(Notification* n) KVRECALL_TSAN_WRAP("_ZN", "12Notification6NotifyEv");
void WrapNotify(Notification* n) {
  __tsan_release(NotifiedFlag(n));
  RealNotify(n);
}

void WrapWaitForNotification(const Notification* n)
    KVRECALL_TSAN_WRAP("_ZNK", "12Notification19WaitForNotificationEv");
void WrapWaitForNotification(const Notification* n) {
  RealWaitForNotification(n);
  __tsan_acquire(NotifiedFlag(n));
}

bool WrapWaitForNotificationWithTimeout(const Notification* n, Duration d)
    KVRECALL_TSAN_WRAP("_ZNK", "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
bool WrapWaitForNotificationWithTimeout(const Notification* n, Duration d) {
  const bool notified = RealWaitForNotificationWithTimeout(n, d);
  if (notified) __tsan_acquire(NotifiedFlag(n));
  return notified;
}

bool WrapWaitForNotificationWithDeadline(const Notification* n, Time t)
    KVRECALL_TSAN_WRAP("_ZNK", "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
bool WrapWaitForNotificationWithDeadline(const Notification* n, Time t) {
  const bool notified = RealWaitForNotificationWithDeadline(n, t);
  if (notified) __tsan_acquire(NotifiedFlag(n));
  return notified;
}

// ---- absl::BlockingCounter, absl::Barrier ----
// Everything before a DecrementCount() happens before Wait() returns (and before the call that
// reached zero returns true); everything before Block() happens before any Block() returns.

bool RealDecrementCount(absl::BlockingCounter*)
    KVRECALL_TSAN_REAL("_ZN", "15BlockingCounter14DecrementCountEv");
void RealBlockingCounterWait(absl::BlockingCounter*)
    KVRECALL_TSAN_REAL("_ZN", "15BlockingCounter4WaitEv");
bool RealBarrierBlock(absl::Barrier*) KVRECALL_TSAN_REAL("_ZN", "7Barrier5BlockEv");

bool WrapDecrementCount(absl::BlockingCounter* c)
    KVRECALL_TSAN_WRAP("_ZN", "15BlockingCounter14DecrementCountEv");
bool WrapDecrementCount(absl::BlockingCounter* c) {
  __tsan_release(c);
  const bool zero = RealDecrementCount(c);
  if (zero) __tsan_acquire(c);
  return zero;
}

void WrapBlockingCounterWait(absl::BlockingCounter* c)
    KVRECALL_TSAN_WRAP("_ZN", "15BlockingCounter4WaitEv");
void WrapBlockingCounterWait(absl::BlockingCounter* c) {
  RealBlockingCounterWait(c);
  __tsan_acquire(c);
}

bool WrapBarrierBlock(absl::Barrier* b) KVRECALL_TSAN_WRAP("_ZN", "7Barrier5BlockEv");
bool WrapBarrierBlock(absl::Barrier* b) {
  __tsan_release(b);
  const bool last = RealBarrierBlock(b);
  __tsan_acquire(b);
  return last;
}

}  // namespace kvrecall::tsan_internal
