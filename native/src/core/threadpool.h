// A fixed pool of worker threads with a blocking parallel_for. The calling thread takes part in the work.
//
// A forward calls parallel_for hundreds of times, microseconds apart (a MoE step on two cores: about
// 15 per layer). Waking a sleeping thread through the kernel costs tens of microseconds each time, so a
// worker that finishes a job spins on the job counter for a short while (kSpin) before it sleeps on the
// condition variable, and so does the caller waiting for the workers; between steps they sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
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

  // Runs fn(begin, end, thread_index) over [0, n) split into contiguous chunks, one per thread
  // (fewer when n is small), and returns when all are done. fn must not throw.
  void parallel_for(size_t n, const std::function<void(size_t, size_t, int)>& fn);

 private:
  void worker(int index);
  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  // The job: written under mu_ before generation_ moves (release); a worker reads it after seeing the
  // new generation (acquire). pending_: the workers' chunks not done yet.
  const std::function<void(size_t, size_t, int)>* job_ = nullptr;
  size_t job_n_ = 0;
  std::atomic<size_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace vdiff
