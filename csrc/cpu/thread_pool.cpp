#include "thread_pool.h"

#include <pthread.h>

#include <atomic>

namespace gradfuse::cpu {
namespace {

std::atomic<ThreadPool*> g_pool{nullptr};

// After fork() only the forking thread exists in the child: drop (leak) the parent's pool, whose
// threads and possibly held mutexes are gone, so the next call builds a new one.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

[[maybe_unused]] const int g_fork_handler = pthread_atfork(nullptr, nullptr, &forget_pool_in_child);

}  // namespace

ThreadPool& ThreadPool::instance() {
  ThreadPool* pool = g_pool.load(std::memory_order_acquire);
  if (pool != nullptr) return *pool;
  // Never deleted: joining threads from static destructors at interpreter exit can deadlock.
  auto* fresh = new ThreadPool;
  if (g_pool.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread won the race (no threads were started yet)
  return *pool;
}

void ThreadPool::run(int n, Task task, void* ctx) {
  n = n < kMaxWorkers ? n : kMaxWorkers;
  if (n <= 1) {
    task(ctx, 0, 1);
    return;
  }
  std::lock_guard<std::mutex> turn(run_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(threads_.size()) < n - 1) {
      const int index = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, index] { worker_loop(index); });
    }
    task_ = task;
    ctx_ = ctx;
    num_workers_ = n;
    pending_ = n - 1;
    ++generation_;
  }
  work_ready_.notify_all();
  task(ctx, 0, n);
  std::unique_lock<std::mutex> lock(mutex_);
  work_done_.wait(lock, [this] { return pending_ == 0; });
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_ready_.wait(lock, [&] { return generation_ != seen; });
    seen = generation_;
    // A job that needs fewer workers skips this one; run() cannot return (and start the next job)
    // before every worker it counted has finished, so no counted worker misses its job.
    if (index >= num_workers_) continue;
    const Task task = task_;
    void* const ctx = ctx_;
    const int n = num_workers_;
    lock.unlock();
    task(ctx, index, n);
    lock.lock();
    if (--pending_ == 0) work_done_.notify_one();
  }
}

}  // namespace gradfuse::cpu
