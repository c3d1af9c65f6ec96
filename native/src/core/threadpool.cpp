#include "threadpool.h"

#include <algorithm>
#include <chrono>

namespace vdiff {

namespace {

// How long a thread polls before it sleeps: longer than the gap between two parallel_for calls of one
// forward, far shorter than a step.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls `done` until it holds or kSpin has passed; returns whether it holds.
template <class Done>
bool spin_until(const Done& done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) return done();
  }
}

// Chunk `index` of `parts` contiguous chunks of [0, n).
inline void chunk_bounds(size_t n, size_t parts, size_t index, size_t& begin, size_t& end) {
  begin = n * index / parts;
  end = n * (index + 1) / parts;
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  n_threads_ = std::min(threads, (1 << kChunkBits) - 1);  // a chunk index fits its field of claim_
  // Thread 0 is the caller of parallel_for; workers are 1 .. n-1.
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks(uint64_t generation, const std::function<void(size_t, size_t, int)>* fn, size_t n,
                            size_t parts, int thread) {
  const uint64_t tag = generation << kChunkBits, chunk_mask = (uint64_t{1} << kChunkBits) - 1;
  uint64_t claim = claim_.load(std::memory_order_acquire);
  for (;;) {
    // Another job's tag, or no chunk left: this job needs nothing more from this thread (and its fn may
    // already be gone).
    if ((claim & ~chunk_mask) != tag || (claim & chunk_mask) >= parts) return;
    if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    size_t begin, end;
    chunk_bounds(n, parts, static_cast<size_t>(claim & chunk_mask), begin, end);
    (*fn)(begin, end, thread);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1 && thread != 0) {
      // The last chunk, run by a worker: the caller may be asleep. Under the lock, so that a caller between
      // its predicate check and its wait cannot miss it.
      std::lock_guard<std::mutex> lock(mu_);
      cv_done_.notify_one();
    }
    claim = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t, size_t, int)>& fn) {
  if (n == 0) return;
  const size_t parts = std::min(n, static_cast<size_t>(n_threads_));
  if (parts == 1) {
    fn(0, n, 0);
    return;
  }
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_n_ = n;
    job_parts_ = parts;
    pending_.store(parts, std::memory_order_relaxed);
    generation = (generation_.load(std::memory_order_relaxed) + 1) & kGenerationMask;
    claim_.store(generation << kChunkBits, std::memory_order_relaxed);
    generation_.store(generation, std::memory_order_release);
  }
  cv_work_.notify_all();  // no system call when every worker is still spinning
  run_chunks(generation, &fn, n, parts, 0);
  const auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(done)) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, done);
  }
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  const auto ready = [&] {
    return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen;
  };
  for (;;) {
    const bool spun = spin_until(ready);
    const std::function<void(size_t, size_t, int)>* job;
    size_t n, parts;
    {
      // The job as one snapshot, consistent with its generation.
      std::unique_lock<std::mutex> lock(mu_);
      if (!spun) cv_work_.wait(lock, ready);
      if (stop_.load(std::memory_order_relaxed)) return;
      seen = generation_.load(std::memory_order_relaxed);
      job = job_;
      n = job_n_;
      parts = job_parts_;
    }
    run_chunks(seen, job, n, parts, index);
  }
}

}  // namespace vdiff
