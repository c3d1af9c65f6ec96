#include "threadpool.h"

namespace vdiff {

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  n_threads_ = threads;
  // Thread 0 is the caller of parallel_for; workers are 1 .. n-1.
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

namespace {
// Chunk `index` of `parts` contiguous chunks of [0, n).
inline void chunk_bounds(size_t n, size_t parts, size_t index, size_t& begin, size_t& end) {
  begin = n * index / parts;
  end = n * (index + 1) / parts;
}
}  // namespace

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t, size_t, int)>& fn) {
  if (n == 0) return;
  size_t parts = n < static_cast<size_t>(n_threads_) ? n : static_cast<size_t>(n_threads_);
  if (parts == 1) {
    fn(0, n, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_n_ = n;
    pending_ = static_cast<int>(parts) - 1;  // workers 1 .. parts-1 take a chunk each
    ++generation_;
  }
  cv_work_.notify_all();
  size_t begin, end;
  chunk_bounds(n, parts, 0, begin, end);
  fn(begin, end, 0);
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::worker(int index) {
  size_t seen = 0;
  for (;;) {
    const std::function<void(size_t, size_t, int)>* job;
    size_t n;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_work_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      n = job_n_;
    }
    size_t parts = n < static_cast<size_t>(n_threads_) ? n : static_cast<size_t>(n_threads_);
    if (static_cast<size_t>(index) >= parts) continue;  // no chunk this time
    size_t begin, end;
    chunk_bounds(n, parts, static_cast<size_t>(index), begin, end);
    (*job)(begin, end, index);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) cv_done_.notify_one();
    }
  }
}

}  // namespace vdiff
