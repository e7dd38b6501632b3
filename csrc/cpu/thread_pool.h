// A small persistent pool of std::threads (not OpenMP: torch ships its own libgomp, and two OpenMP
// runtimes in one process fight). Idle workers sleep on a condition variable (no spinning that would
// steal the cores from torch's threads).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace gradfuse::cpu {

class ThreadPool {
 public:
  using Task = void (*)(void* ctx, int worker, int num_workers);

  static constexpr int kMaxWorkers = 256;  // run() uses at most this many (callers split for it)

  // The process-wide pool. Threads are started on first need and live until exit; a forked child
  // starts a fresh pool (the parent's threads do not exist there).
  static ThreadPool& instance();

  // Runs task(ctx, w, n) for every w in [0, n), worker 0 on the calling thread, and returns when
  // all have finished. Concurrent callers take turns. The task must not throw.
  void run(int n, Task task, void* ctx);

 private:
  void worker_loop(int index);

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;      // guards everything below
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  std::vector<std::thread> threads_;  // workers 1..size()
  uint64_t generation_ = 0;           // bumped per job
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  int num_workers_ = 0;
  int pending_ = 0;  // workers 1..num_workers_-1 not yet done
};

// Calls fn(w, n) for w in [0, n) on the pool; fn must not throw.
template <class Fn>
void parallel_workers(int n, Fn& fn) {
  ThreadPool::instance().run(
      n, [](void* ctx, int w, int num) { (*static_cast<Fn*>(ctx))(w, num); }, &fn);
}

}  // namespace gradfuse::cpu
