// A fixed pool of worker threads with a blocking parallel_for. The calling thread takes part in the work.
//
// A forward calls parallel_for hundreds of times, microseconds apart (a MoE step on two cores: about
// 15 per layer). Waking a sleeping thread through the kernel costs tens of microseconds each time, so a
// worker that finishes a job spins on the job counter for a short while (kSpin) before it sleeps on the
// condition variable, and so does the caller waiting for the workers; between steps they sleep.
//
// The chunks of a job are claimed, not assigned: every thread, the caller included, takes the next
// unclaimed chunk until none is left. A worker that is asleep, or that the OS has descheduled to run
// another process (the server's JavaScript, on a two-core machine), therefore holds up a job only by a
// chunk it has already started: the caller runs the chunks nobody has claimed, instead of waiting for
// each worker to come and run its own. Which thread runs a chunk changes nothing in the results (the
// chunk bounds depend only on n and the pool size); `thread` only names per-thread scratch.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace vdiff {

class ThreadPool {
 public:
  // threads <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(begin, end, thread) over [0, n) split into contiguous chunks, as many as the pool has threads
  // (fewer when n is small), and returns when all are done. `thread` (0 for the caller, 1 .. size()-1 for
  // the workers) is unique among the chunks running at one time. fn must not throw.
  void parallel_for(size_t n, const std::function<void(size_t, size_t, int)>& fn);

 private:
  void worker(int index);
  // Claims and runs chunks of the job of `generation` until none is left.
  void run_chunks(uint64_t generation, const std::function<void(size_t, size_t, int)>* fn, size_t n, size_t parts,
                  int thread);
  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  // The job: written under mu_ before generation_ moves (release); a worker reads it under mu_ after
  // seeing the new generation.
  const std::function<void(size_t, size_t, int)>* job_ = nullptr;
  size_t job_n_ = 0, job_parts_ = 0;
  std::atomic<uint64_t> generation_{0};
  // The next chunk to claim, tagged with its job's generation: (generation << kChunkBits) | chunk. A claim
  // is a compare-and-swap that fails once the job has moved on, so a worker that read a job late can never
  // run a chunk of the next one with the old job's function.
  static constexpr int kChunkBits = 16;
  static constexpr uint64_t kGenerationMask = (uint64_t{1} << (64 - kChunkBits)) - 1;
  std::atomic<uint64_t> claim_{0};
  std::atomic<size_t> pending_{0};  // chunks of the current job not done yet
  std::atomic<bool> stop_{false};
};

}  // namespace vdiff
