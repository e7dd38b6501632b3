#include "clip.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "abi.h"
#include "kernels.h"
#include "thread_pool.h"

namespace gradfuse::cpu {
namespace {

// The unit of work a thread claims: runs of whole chunks of at least kRunBytes (small chunks grouped,
// each also charged kChunkCostBytes for its call). Waking a thread costs about as much as reading
// ~100 KiB, so no more threads are woken than there are runs.
constexpr int64_t kRunBytes = int64_t{1} << 18;
constexpr int64_t kChunkCostBytes = 1024;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("gradfuse._C_cpu: " + what); }

// Chunk c: elements [chunk_start[c], min(chunk_start[c] + chunk_size, numels[t])) of tensor t.
struct Span {
  char* data;
  int64_t n;
  int64_t dtype;
};

Span chunk_span(const Plan& plan, int64_t c) {
  const int64_t t = plan.chunk_tensor[c];
  const int64_t start = plan.chunk_start[c];
  const int64_t left = plan.numels[t] - start;
  const int64_t dtype = plan.dtypes[t];
  char* base = reinterpret_cast<char*>(static_cast<uintptr_t>(plan.addrs[t]));
  return {base + start * element_size(dtype), left < plan.chunk_size ? left : plan.chunk_size, dtype};
}

// Runs of consecutive chunks, claimed in order from a shared counter by whichever worker is free.
// A static split makes every call wait for its slowest thread, and right after a torch op one of
// ours is slow: torch's OpenMP workers keep spinning for several ms on the other cores. GPT-2's
// bf16 reduce on 2 cores right after a torch op: 15.3 ms split statically, 13.6 ms claiming runs
// (12.0 ms with OMP_WAIT_POLICY=PASSIVE). Each chunk's outputs depend on that chunk alone, so which
// thread runs it changes no bit.
class RunQueue {
 public:
  RunQueue(const Plan& plan, int num_threads) {
    bounds_.push_back(0);
    int64_t run = 0;
    for (int64_t c = 0; c < plan.num_chunks; ++c) {
      const Span s = chunk_span(plan, c);
      run += s.n * element_size(s.dtype) + kChunkCostBytes;
      if (run >= kRunBytes || c + 1 == plan.num_chunks) {
        bounds_.push_back(c + 1);
        run = 0;
      }
    }
    const int64_t runs = static_cast<int64_t>(bounds_.size()) - 1;
    int64_t workers = num_threads < 1 ? 1 : num_threads;
    if (workers > ThreadPool::kMaxWorkers) workers = ThreadPool::kMaxWorkers;
    if (workers > runs) workers = runs;
    workers_ = workers < 1 ? 1 : static_cast<int>(workers);
  }

  int workers() const { return workers_; }

  // The next unclaimed run [begin, end) of chunks; false when all are taken.
  bool claim(int64_t& begin, int64_t& end) {
    const size_t r = next_.fetch_add(1, std::memory_order_relaxed);
    if (r + 1 >= bounds_.size()) return false;
    begin = bounds_[r];
    end = bounds_[r + 1];
    return true;
  }

 private:
  std::vector<int64_t> bounds_;  // run r is chunks [bounds_[r], bounds_[r + 1])
  std::atomic<size_t> next_{0};
  int workers_;
};

// fn(c) for every chunk c of the plan, on up to num_threads threads claiming runs of chunks.
template <class Fn>
void for_each_chunk(const Plan& plan, int num_threads, Fn&& fn) {
  RunQueue queue(plan, num_threads);
  auto work = [&](int, int) {
    int64_t begin, end;
    while (queue.claim(begin, end))
      for (int64_t c = begin; c < end; ++c) fn(c);
  };
  parallel_workers(queue.workers(), work);
}

void check_chunk(const Plan& plan, int64_t c, int64_t t) {
  const int64_t start = plan.chunk_start[c];
  if (start < 0 || start >= plan.numels[t])
    fail("chunk " + std::to_string(c) + " starts at element " + std::to_string(start) + ", outside tensor " +
         std::to_string(t) + " of " + std::to_string(plan.numels[t]) + " elements");
}

void check_tensor(const Plan& plan, int64_t t) {
  const int64_t tag = plan.dtypes[t];
  if (!valid_dtype(tag))
    fail("tensor " + std::to_string(t) + " has dtype tag " + std::to_string(tag) +
         "; expected DTYPE_F32 (0), DTYPE_F16 (1) or DTYPE_BF16 (2)");
  if (plan.numels[t] < 0) fail("tensor " + std::to_string(t) + " has a negative numel");
  if (plan.numels[t] > 0 && plan.addrs[t] == 0) fail("tensor " + std::to_string(t) + " has a null address");
}

void check_sizes(const Plan& plan) {
  if (plan.chunk_size < 1) fail("chunk_size must be positive, got " + std::to_string(plan.chunk_size));
  if (plan.num_chunks < 0) fail("num_chunks must be >= 0, got " + std::to_string(plan.num_chunks));
  if (plan.num_chunks > 0 && (!plan.addrs || !plan.numels || !plan.dtypes || !plan.chunk_tensor || !plan.chunk_start))
    fail("a plan table address is 0");
}

// Every chunk inside its tensor, every tensor's chunks where tensor_chunk_begin says.
void check_reduce_args(const Plan& plan, const ReduceParams& params, const ReduceOutputs& out) {
  check_sizes(plan);
  if (plan.num_tensors < 0) fail("num_tensors must be >= 0, got " + std::to_string(plan.num_tensors));
  const int kind = params.norm_kind;
  if (kind < kNormL2 || kind > kNormL0)
    fail("norm_kind " + std::to_string(kind) + " is not one of NORM_L2 (0) .. NORM_L0 (5)");
  if (kind == kNormP && !(std::isfinite(params.p) && params.p != 0.0))
    fail("NORM_P needs a finite non-zero p, got " + std::to_string(params.p) + " (use NORM_INF/NEG_INF/L0)");
  if (params.policy < kPolicyPropagate || params.policy > kPolicyZero)
    fail("policy " + std::to_string(params.policy) + " is not one of POLICY_PROPAGATE (0), SKIP (1), ZERO (2)");
  if (!out.result || !plan.tensor_chunk_begin) fail("the result or tensor_chunk_begin address is 0");
  if (plan.num_tensors > 0 && (!plan.addrs || !plan.numels || !plan.dtypes || !out.tensor_norms))
    fail("a tensor table or tensor_norms address is 0");
  if (plan.num_chunks > 0 && (!out.chunk_partials || !out.chunk_nonfinite)) fail("a workspace address is 0");
  if (plan.tensor_chunk_begin[0] != 0 || plan.tensor_chunk_begin[plan.num_tensors] != plan.num_chunks)
    fail("tensor_chunk_begin must run from 0 to num_chunks");
  for (int64_t t = 0; t < plan.num_tensors; ++t) {
    check_tensor(plan, t);
    const int64_t lo = plan.tensor_chunk_begin[t], hi = plan.tensor_chunk_begin[t + 1];
    if (lo > hi || hi > plan.num_chunks) fail("tensor_chunk_begin is not sorted at tensor " + std::to_string(t));
    for (int64_t c = lo; c < hi; ++c) {
      if (plan.chunk_tensor[c] != t)
        fail("chunk " + std::to_string(c) + " belongs to tensor " + std::to_string(plan.chunk_tensor[c]) +
             " but lies in tensor " + std::to_string(t) + "'s range of tensor_chunk_begin");
      check_chunk(plan, c, t);
    }
  }
}

// The scale phase is not given num_tensors, so tensors are checked through their chunks.
void check_scale_args(const Plan& plan) {
  check_sizes(plan);
  for (int64_t c = 0; c < plan.num_chunks; ++c) {
    const int64_t t = plan.chunk_tensor[c];
    if (t < 0) fail("chunk " + std::to_string(c) + " has a negative tensor index");
    check_tensor(plan, t);
    check_chunk(plan, c, t);
  }
}

double identity(int kind) { return kind == kNormNegInf ? std::numeric_limits<double>::infinity() : 0.0; }

// S combined with one more partial: a sum, or for the max/min norms a max/min in which NaN wins
// (torch.max/min propagate NaN; std::max would drop it).
double combine(int kind, double s, double v) {
  if (kind == kNormInf || kind == kNormNegInf) {
    if (std::isnan(s) || std::isnan(v)) return std::numeric_limits<double>::quiet_NaN();
    return kind == kNormInf ? (v > s ? v : s) : (v < s ? v : s);
  }
  return s + v;
}

// S ** (1/p): sqrt for L2; S itself for L1, INF, NEG_INF and L0.
double root(int kind, double p, double s) {
  if (kind == kNormL2) return std::sqrt(s);
  if (kind == kNormP) return std::pow(s, 1.0 / p);
  return s;
}

// Serial, in tensor then chunk order, in fp64: the same bits for the same input on every run.
//   S_t = combine over t's chunks; norm_t = root(S_t) * inv_scale (L0: S_t, unscaled);
//   total = root(combine over t of S_t) * inv_scale (L0: the number of t with S_t != 0);
//   coef = min(1, max_norm / (fp32(total) + 1e-6)), NaN kept; scale = coef * inv_scale, or 1 (SKIP)
//   / 0 (ZERO) when a chunk held a NaN or Inf; each output rounded to fp32 once.
void finalize(const Plan& plan, const ReduceParams& params, const std::vector<double>& partials,
              const ReduceOutputs& out) {
  const int kind = params.norm_kind;
  const double inv_scale = params.inv_scale_ptr ? *params.inv_scale_ptr : 1.0;
  const double norm_scale = kind == kNormL0 ? 1.0 : inv_scale;
  double all = identity(kind);
  for (int64_t t = 0; t < plan.num_tensors; ++t) {
    double s = identity(kind);
    for (int64_t c = plan.tensor_chunk_begin[t]; c < plan.tensor_chunk_begin[t + 1]; ++c) s = combine(kind, s, partials[c]);
    out.tensor_norms[t] = static_cast<float>(root(kind, params.p, s) * norm_scale);
    all = kind == kNormL0 ? all + (s != 0.0) : combine(kind, all, s);
  }
  const double total = root(kind, params.p, all) * norm_scale;
  bool found_inf = false;
  for (int64_t c = 0; c < plan.num_chunks; ++c) found_inf |= out.chunk_nonfinite[c] != 0;
  const double max_norm = params.max_norm_ptr ? *params.max_norm_ptr : params.max_norm;
  // On the fp32-rounded total, as every backend does: the same coef bits for the same result[0].
  double coef = max_norm / (static_cast<double>(static_cast<float>(total)) + kClipEps);
  coef = coef > 1.0 ? 1.0 : coef;  // torch.clamp(max=1): a NaN stays NaN
  double scale = coef * inv_scale;
  if (found_inf && params.policy == kPolicySkip) scale = 1.0;
  if (found_inf && params.policy == kPolicyZero) scale = 0.0;
  out.result[kResultTotal] = static_cast<float>(total);
  out.result[kResultFoundInf] = found_inf ? 1.0f : 0.0f;
  out.result[kResultCoef] = static_cast<float>(coef);
  out.result[kResultScale] = static_cast<float>(scale);
}

}  // namespace

void reduce(const Plan& plan, const ReduceParams& params, const ReduceOutputs& out, int num_threads) {
  check_reduce_args(plan, params, out);
  const KernelSet& k = kernels();
  // fp64 copy of every chunk partial: the float32 chunk_partials of the contract would round the
  // finalize's inputs.
  std::vector<double> partials(static_cast<size_t>(plan.num_chunks));
  for_each_chunk(plan, num_threads, [&](int64_t c) {
    const Span s = chunk_span(plan, c);
    const SpanPartial r = k.reduce(s.data, s.n, s.dtype, params.norm_kind, params.p);
    partials[c] = r.value;
    out.chunk_partials[c] = static_cast<float>(r.value);
    out.chunk_nonfinite[c] = r.nonfinite ? 1 : 0;
  });
  finalize(plan, params, partials, out);
}

void scale(const Plan& plan, const float* scale_ptr, bool zero_if_scale_is_zero, int num_threads) {
  if (!scale_ptr) fail("scale_ptr is 0");
  const float s = *scale_ptr;
  if (s == 1.0f) return;  // no clipping needed: gradient memory is not touched (a NaN goes on)
  check_scale_args(plan);
  const bool zero = zero_if_scale_is_zero && s == 0.0f;  // NaN * 0 would stay NaN
  const KernelSet& k = kernels();
  for_each_chunk(plan, num_threads, [&](int64_t c) {
    const Span sp = chunk_span(plan, c);
    if (zero) std::memset(sp.data, 0, static_cast<size_t>(sp.n * element_size(sp.dtype)));  // +0.0 in every dtype
    else k.scale(sp.data, sp.n, sp.dtype, s);
  });
}

}  // namespace gradfuse::cpu
