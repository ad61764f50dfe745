// A small persistent thread pool: `run(ntasks, fn)` calls fn(0..ntasks-1) on the
// caller and the workers, and returns when all are done. Workers spin briefly
// (200 us) after a job (decode issues one matmul after another, microseconds apart), then
// sleep on a condition variable so an idle process burns no CPU.
//
// A spinning worker yields its core on every turn rather than pausing on it. At decode the
// Python thread building the next token's graph wants a core too, and on 2 cores it
// would otherwise wait behind a worker that has nothing to do. Measured on the model's
// decode at S = 512 (8 rounds, old and new build alternated in separate processes):
// 5.22 -> 4.84 ms a token (medians), faster in 7 rounds of 8; prefill and the lone
// matmul calls of the kernel benchmark did not change.
//
// Size: TINY_LLM_THREADS if set, else std::thread::hardware_concurrency().
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TINY_LLM_PAUSE() _mm_pause()
#else
#define TINY_LLM_PAUSE() std::this_thread::yield()
#endif

namespace tiny_llm {

class ThreadPool {
 public:
  static ThreadPool& get() {
    // Never destroyed: workers die with the process, so exit cannot hang on a join.
    static ThreadPool* pool = new ThreadPool(default_threads());
    return *pool;
  }

  static int default_threads() {
    if (const char* env = std::getenv("TINY_LLM_THREADS"); env && std::atoi(env) > 0) return std::atoi(env);
    return std::max(1u, std::thread::hardware_concurrency());
  }

  int size() const { return int(workers_.size()) + 1; }

  void run(int ntasks, const std::function<void(int)>& fn) {
    if (ntasks <= 0) return;
    // Inline: one task, no workers, or a task that itself calls run() (nested jobs
    // would wait on each other's lock).
    if (ntasks == 1 || workers_.empty() || ntasks >= (1 << 24) || inside()) {
      for (int i = 0; i < ntasks; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    Inside mark;
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (generation(state_.load(std::memory_order_relaxed)) + 1) & 0xffff;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      state_.store(gen << 48 | uint64_t(ntasks) << 24, std::memory_order_release);  // next task: 0
    }
    cv_.notify_all();
    work(gen);
    // Tasks still running elsewhere: spin briefly, then yield, so that a worker the
    // OS has preempted (busy machine) can run on this core instead of us spinning.
    for (int i = 0; done_.load(std::memory_order_acquire) < ntasks; ++i) {
      if (i < 4096) {
        TINY_LLM_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }

  // The job lives in one word: generation (16 bits), task count (24), next task
  // (24). A task is claimed by a CAS on that word, and fn_ is read only after a
  // claim succeeds (its caller is then still waiting), so a worker that wakes
  // late for a finished job can never run a task with another job's state.
  static uint64_t generation(uint64_t s) { return s >> 48; }

  // True on a thread that is running a task (a worker, or a caller inside run()).
  static bool& inside() {
    static thread_local bool flag = false;
    return flag;
  }
  struct Inside {
    Inside() { inside() = true; }
    ~Inside() { inside() = false; }
  };

  void work(uint64_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      const int next = int(s & 0xffffff), ntasks = int((s >> 24) & 0xffffff);
      if (generation(s) != gen || next >= ntasks) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(next);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      for (int i = 0; generation(state_.load(std::memory_order_acquire)) == seen; ++i) {
        if ((i & 7) == 0 && std::chrono::steady_clock::now() > spin_until) break;
        std::this_thread::yield();  // see the header: a turn for the graph-building thread
      }
      if (generation(state_.load(std::memory_order_acquire)) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation(state_.load(std::memory_order_acquire)) != seen; });
      }
      seen = generation(state_.load(std::memory_order_acquire));
      Inside mark;
      work(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* fn_ = nullptr;
};

// [0, n) in about `parts` ranges, each a multiple of `align` (the last may be shorter).
struct Split {
  int per, count;
  Split(long n, int parts, int align) {
    per = int((n + parts - 1) / parts);
    per = std::max(align, (per + align - 1) / align * align);
    count = int((n + per - 1) / per);
  }
};

// fn(r0, r1) for ranges of the rows [0, rows), split over the pool when rows * cols values
// are worth handing out (2^15 or more), else fn(0, rows) on the caller. For loops that treat
// each row on its own (RMSNorm, SwiGLU, a residual add): a row's arithmetic is the same in
// whichever range it falls, so the result does not depend on the split.
template <class F>
void parallel_rows(long rows, long cols, F&& fn) {
  if (rows <= 0) return;
  ThreadPool& pool = ThreadPool::get();
  const Split s(rows, rows * cols < (1 << 15) ? 1 : pool.size(), 1);
  pool.run(s.count, [&](int t) {
    const long r0 = long(t) * s.per;
    fn(r0, std::min<long>(rows, r0 + s.per));
  });
}

}  // namespace tiny_llm
