// The kernels' own thread team for decode steps (engine/kernels/cpu.py: CpuKernels.step_threads).
// Engines are served with OMP_WAIT_POLICY=PASSIVE, so every OpenMP region wakes a sleeping
// thread: a futex wake-up and, on a VM, the vCPU's return from halt, tens of microseconds a
// region (bench/RESULTS.md) and about 50 regions a decode step. While the engine runs a decode
// step's forward it makes this team hot: the kernels' parallel parts then run on its workers,
// which spin between the step's kernels (yielding the core now and then to any other runnable
// thread) and sleep again as soon as the forward ends, so the front end and clients sharing the
// cores get them between steps as before. Only the thread that made the team hot uses it; other
// callers, and everything outside a hot forward, run on OpenMP.
#pragma once
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <immintrin.h>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <exception>
#include <functional>
#include <thread>

namespace hot_team {

// spinning past this long without a task, a worker yields its core once; past kIdleSleep it sleeps
constexpr auto kYieldEvery = std::chrono::microseconds(20);
constexpr auto kIdleSleep = std::chrono::milliseconds(2);
constexpr int kMaxThreads = 64;

class Team {
 public:
  static Team& get() {
    static Team* team = new Team();   // never destroyed: detached workers use it to the end
    return *team;
  }

  // size > 1: the calling thread's kernels run on `size` threads (it and size - 1 workers) until
  // it calls set_hot(0). One thread at a time: while another holds the team, the caller's kernels
  // stay on OpenMP.
  void set_hot(int64_t size) {
    if (size <= 1) {
      if (owner()) {
        owner() = false;
        hot_.store(false, std::memory_order_release);
      }
      return;
    }
    bool cold = false;
    if (owner() || !hot_.compare_exchange_strong(cold, true, std::memory_order_acquire)) return;
    size_ = std::min<int64_t>(size, kMaxThreads);
    while (workers_ < size_ - 1) std::thread(&Team::work, this, 1 + workers_++).detach();
    owner() = true;
  }

  bool hot_here() const { return hot_.load(std::memory_order_relaxed) && owner(); }
  int64_t size() const { return size_; }

  // body(t) for t in [0, n), n <= size(): part 0 on the caller, the others on the workers that
  // take theirs before the caller is done with its own; the caller runs the parts no worker took
  // (a worker off its core holds nothing up). Returns when every part is done; rethrows the
  // first exception of a part.
  template <typename F>
  void run(int64_t n, const F& body) {
    n = std::min(n, size_);
    if (n <= 1) {
      body(0);
      return;
    }
    const std::function<void(int64_t)> fn = [&](int64_t t) { body(t); };
    task_ = &fn;
    for (int64_t w = 1; w < n; ++w) {
      slots_[w].error = nullptr;
      slots_[w].state.store(kPosted, std::memory_order_release);
    }
    seq_.fetch_add(1);
    if (sleepers_.load() > 0) syscall(SYS_futex, &seq_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    std::exception_ptr error;
    try { body(0); } catch (...) { error = std::current_exception(); }
    for (int64_t w = 1; w < n; ++w) {
      int expected = kPosted;
      if (slots_[w].state.compare_exchange_strong(expected, kCancelled)) {
        if (!error) try { body(w); } catch (...) { error = std::current_exception(); }
        continue;
      }
      for (Spin spin; slots_[w].state.load(std::memory_order_acquire) != kDone;) spin.pause();
      if (slots_[w].error && !error) error = slots_[w].error;
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  enum State : int { kIdle, kPosted, kTaken, kDone, kCancelled };
  struct alignas(64) Slot {
    std::atomic<int> state{kIdle};
    std::exception_ptr error;
  };
  // pause, and every kYieldEvery hand the core to any other runnable thread
  struct Spin {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now(), yielded = start;
    int count = 0;
    std::chrono::steady_clock::duration pause() {
      _mm_pause();
      if (++count % 64) return {};
      const auto now = std::chrono::steady_clock::now();
      if (now - yielded > kYieldEvery) {
        sched_yield();
        yielded = now;
      }
      return now - start;
    }
  };

  Team() {
    pthread_atfork(nullptr, nullptr, [] {   // a forked child has none of the workers, and a cold team
      Team& t = get();
      t.workers_ = 0;
      t.sleepers_.store(0);
      t.hot_.store(false);
      owner() = false;   // the forking thread, the child's only one
    });
  }

  void work(int64_t w) {
    uint32_t seen = seq_.load();
    for (;;) {
      for (Spin spin; seq_.load(std::memory_order_acquire) == seen;) {
        if (hot_.load(std::memory_order_relaxed) && spin.pause() < kIdleSleep) continue;
        sleepers_.fetch_add(1);
        syscall(SYS_futex, &seq_, FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
        sleepers_.fetch_sub(1);
        spin = Spin();
      }
      seen = seq_.load(std::memory_order_acquire);
      int expected = kPosted;
      if (!slots_[w].state.compare_exchange_strong(expected, kTaken, std::memory_order_acq_rel)) continue;
      try { (*task_)(w); } catch (...) { slots_[w].error = std::current_exception(); }
      slots_[w].state.store(kDone, std::memory_order_release);
    }
  }

  static bool& owner() {   // whether this thread made the team hot
    static thread_local bool made_hot = false;
    return made_hot;
  }

  std::atomic<bool> hot_{false};
  int64_t size_ = 1, workers_ = 0;
  std::atomic<uint32_t> seq_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  Slot slots_[kMaxThreads];
};

}  // namespace hot_team
