#include "clip.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "float_bits.h"
#include "kernels.h"
#include "thread_pool.h"

namespace gradfuse::cpu {
namespace {

// The unit of work a thread claims: runs of whole chunks of at least kRunBytes (small chunks grouped,
// each also charged kChunkCostBytes for its call). Waking a thread costs about as much as reading
// ~100 KiB, so no more threads are woken than there are runs.
constexpr int64_t kRunBytes = int64_t{1} << 18;
constexpr int64_t kChunkCostBytes = 1024;
// The largest chunk_size of the contract: the CUDA kernels index inside a chunk with int32, and every
// backend checks the same limit.
constexpr int64_t kMaxChunkSize = int64_t{1} << 30;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("gradfuse._C_cpu: " + what); }

template <class T>
T* at(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

bool valid_dtype(int64_t tag) { return tag == DTYPE_F32 || tag == DTYPE_F16 || tag == DTYPE_BF16; }

int64_t element_size(int64_t tag) { return tag == DTYPE_F32 ? 4 : 2; }

// The descriptor's plan tables as typed pointers.
struct Plan {
  const int64_t* addrs;
  const int64_t* numels;
  const int64_t* dtypes;
  const int64_t* tensor_chunk_begin;
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  int64_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_size;

  explicit Plan(const ClipDesc& d)
      : addrs(at<const int64_t>(d.addrs)), numels(at<const int64_t>(d.numels)), dtypes(at<const int64_t>(d.dtypes)),
        tensor_chunk_begin(at<const int64_t>(d.tensor_chunk_begin)), chunk_tensor(at<const int64_t>(d.chunk_tensor)),
        chunk_start(at<const int64_t>(d.chunk_start)), num_tensors(d.num_tensors), num_chunks(d.num_chunks),
        chunk_size(d.chunk_size) {}
};

// Chunk c: elements [chunk_start[c], min(chunk_start[c] + chunk_size, numels[t])) of tensor t.
struct Span {
  char* data;
  int64_t n;
  int64_t dtype;
  int64_t tensor;
};

Span chunk_span(const Plan& plan, int64_t c) {
  const int64_t t = plan.chunk_tensor[c];
  const int64_t start = plan.chunk_start[c];
  const int64_t left = plan.numels[t] - start;
  const int64_t dtype = plan.dtypes[t];
  char* base = reinterpret_cast<char*>(static_cast<uintptr_t>(plan.addrs[t]));
  return {base + start * element_size(dtype), left < plan.chunk_size ? left : plan.chunk_size, dtype, t};
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

// ---- argument checks: every one before any gradient is touched --------------------------------

void check_chunk(const Plan& plan, int64_t c, int64_t t) {
  const int64_t start = plan.chunk_start[c];
  if (start < 0 || start >= plan.numels[t])
    fail("chunk " + std::to_string(c) + " starts at element " + std::to_string(start) + ", outside tensor " +
         std::to_string(t) + " of " + std::to_string(plan.numels[t]) + " elements");
}

void check_tensor(const Plan& plan, int64_t t) {
  const int64_t tag = plan.dtypes[t];
  if (!valid_dtype(tag))
    fail("dtypes[" + std::to_string(t) + "] is " + std::to_string(tag) +
         "; expected DTYPE_F32 (0), DTYPE_F16 (1) or DTYPE_BF16 (2)");
  if (plan.numels[t] < 0) fail("numels[" + std::to_string(t) + "] is negative");
  if (plan.numels[t] > 0 && plan.addrs[t] == 0) fail("addrs[" + std::to_string(t) + "] is 0");
}

void require(uint64_t address, const char* field) {
  if (address == 0) fail(std::string(field) + " is 0");
}

void check_common(const ClipDesc& d) {
  if (d.chunk_size < 1 || d.chunk_size > kMaxChunkSize)
    fail("chunk_size must be in [1, 2^30], got " + std::to_string(d.chunk_size));
  if (d.num_chunks < 0) fail("num_chunks must be >= 0, got " + std::to_string(d.num_chunks));
  if (d.num_tensors < 0) fail("num_tensors must be >= 0, got " + std::to_string(d.num_tensors));
  if (d.num_chunks > 0 && d.num_tensors == 0)
    fail("num_chunks is " + std::to_string(d.num_chunks) + " but num_tensors is 0");
  if (d.flags & ~(FLAG_WRITE_TENSOR_SCALES | FLAG_READ_TENSOR_SCALES))
    fail("flags " + std::to_string(d.flags) + " has bits outside FLAG_WRITE_TENSOR_SCALES | FLAG_READ_TENSOR_SCALES");
  if (d.num_chunks > 0) {
    require(d.addrs, "addrs");
    require(d.numels, "numels");
    require(d.dtypes, "dtypes");
    require(d.chunk_tensor, "chunk_tensor");
    require(d.chunk_start, "chunk_start");
  }
}

// Every chunk inside its tensor, every tensor's chunks where tensor_chunk_begin says.
void check_reduce(const ClipDesc& d) {
  check_common(d);
  const int64_t kind = d.norm_kind;
  if (kind < NORM_L2 || kind > NORM_L0)
    fail("norm_kind " + std::to_string(kind) + " is not one of NORM_L2 (0) .. NORM_L0 (5)");
  if (kind == NORM_P && !(std::isfinite(d.p) && d.p != 0.0))
    fail("NORM_P needs a finite non-zero p, got " + std::to_string(d.p) + " (use NORM_INF/NEG_INF/L0)");
  if (d.policy < POLICY_PROPAGATE || d.policy > POLICY_ZERO)
    fail("policy " + std::to_string(d.policy) + " is not one of POLICY_PROPAGATE (0), SKIP (1), ZERO (2)");
  require(d.result, "result");
  require(d.tensor_chunk_begin, "tensor_chunk_begin");
  if (d.num_tensors > 0) {
    require(d.addrs, "addrs");
    require(d.numels, "numels");
    require(d.dtypes, "dtypes");
    require(d.tensor_norms, "tensor_norms");
    require(d.tensor_partials, "tensor_partials");
    require(d.tensor_max_abs, "tensor_max_abs");
    require(d.tensor_counts, "tensor_counts");
    if (d.flags & FLAG_WRITE_TENSOR_SCALES) require(d.tensor_scales, "tensor_scales");
  }
  if (d.num_chunks > 0) {
    require(d.chunk_partials, "chunk_partials");
    require(d.chunk_max_abs, "chunk_max_abs");
    require(d.chunk_counts, "chunk_counts");
  }
  const Plan plan(d);
  if (plan.tensor_chunk_begin[0] != 0 || plan.tensor_chunk_begin[plan.num_tensors] != plan.num_chunks)
    fail("tensor_chunk_begin must run from 0 to num_chunks");
  for (int64_t t = 0; t < plan.num_tensors; ++t) {
    check_tensor(plan, t);
    const int64_t lo = plan.tensor_chunk_begin[t], hi = plan.tensor_chunk_begin[t + 1];
    if (lo > hi || hi > plan.num_chunks) fail("tensor_chunk_begin is not sorted at tensor " + std::to_string(t));
    for (int64_t c = lo; c < hi; ++c) {
      if (plan.chunk_tensor[c] != t)
        fail("chunk_tensor[" + std::to_string(c) + "] is " + std::to_string(plan.chunk_tensor[c]) +
             " but the chunk lies in tensor " + std::to_string(t) + "'s range of tensor_chunk_begin");
      check_chunk(plan, c, t);
    }
  }
}

// The scale reads the tensors through their chunks: each chunk's tensor index and bounds.
void check_scale(const ClipDesc& d) {
  check_common(d);
  if (d.flags & FLAG_READ_TENSOR_SCALES) require(d.tensor_scales, "tensor_scales");
  else require(d.scale_ptr, "scale_ptr");
  const Plan plan(d);
  for (int64_t c = 0; c < plan.num_chunks; ++c) {
    const int64_t t = plan.chunk_tensor[c];
    if (t < 0 || t >= d.num_tensors)
      fail("chunk_tensor[" + std::to_string(c) + "] is " + std::to_string(t) + ", not a tensor index");
    check_tensor(plan, t);
    check_chunk(plan, c, t);
  }
}

// ---- finalize ---------------------------------------------------------------------------------

double identity(int64_t kind) { return kind == NORM_NEG_INF ? std::numeric_limits<double>::infinity() : 0.0; }

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// max / min in which NaN wins (torch.max/min propagate NaN; std::max would drop it).
double max_nan(double s, double v) { return std::isnan(s) || std::isnan(v) ? kNaN : (v > s ? v : s); }
double min_nan(double s, double v) { return std::isnan(s) || std::isnan(v) ? kNaN : (v < s ? v : s); }

// S combined with one more partial: a sum, a max or a min.
double combine(int64_t kind, double s, double v) {
  if (kind == NORM_INF) return max_nan(s, v);
  if (kind == NORM_NEG_INF) return min_nan(s, v);
  return s + v;
}

// S ** (1/p): sqrt for L2; S itself for L1, INF, NEG_INF and L0.
double root(int64_t kind, double p, double s) {
  if (kind == NORM_L2) return std::sqrt(s);
  if (kind == NORM_P) return std::pow(s, 1.0 / p);
  return s;
}

// min(1, max_norm / (t + 1e-6)) with NaN kept (torch.clamp(max=1)), t the fp32-rounded norm, or
// the fp64 one where fp32 overflows (a norm beyond 3.4e38 still clips by a finite factor).
double clip_coef(double max_norm, double norm) {
  const float t32 = static_cast<float>(norm);
  const double t = std::isinf(t32) ? norm : static_cast<double>(t32);
  const double coef = max_norm / (t + CLIP_EPS);
  return coef > 1.0 ? 1.0 : coef;
}

// The factor the scale pass applies, after the non-finite policy.
float factor(double coef, double inv_scale, bool found_inf, int64_t policy) {
  if (found_inf && policy == POLICY_SKIP) return 1.0f;
  if (found_inf && policy == POLICY_ZERO) return 0.0f;
  return static_cast<float>(coef * inv_scale);
}

// Serial, in tensor then chunk order, in fp64: the same bits for the same input on every run.
// The formulas are gradfuse/_abi.py's; each output is rounded to fp32 once.
void finalize(const ClipDesc& d) {
  const Plan plan(d);
  const int64_t kind = d.norm_kind;
  const double* partials = at<const double>(d.chunk_partials);
  const float* chunk_max = at<const float>(d.chunk_max_abs);
  const int32_t* chunk_counts = at<const int32_t>(d.chunk_counts);
  float* tensor_norms = at<float>(d.tensor_norms);
  double* tensor_partials = at<double>(d.tensor_partials);
  float* tensor_max_abs = at<float>(d.tensor_max_abs);
  int64_t* tensor_counts = at<int64_t>(d.tensor_counts);
  const double inv_scale = d.inv_scale_ptr ? *at<const float>(d.inv_scale_ptr) : 1.0;
  const double norm_scale = kind == NORM_L0 ? 1.0 : inv_scale;
  double all = identity(kind);
  bool found_inf = false;
  for (int64_t t = 0; t < plan.num_tensors; ++t) {
    double s = identity(kind), m = 0.0;
    int64_t nans = 0, infs = 0;
    for (int64_t c = plan.tensor_chunk_begin[t]; c < plan.tensor_chunk_begin[t + 1]; ++c) {
      s = combine(kind, s, partials[c]);
      m = max_nan(m, chunk_max[c]);
      nans += chunk_counts[2 * c];
      infs += chunk_counts[2 * c + 1];
    }
    tensor_partials[t] = s;
    tensor_norms[t] = static_cast<float>(root(kind, d.p, s) * norm_scale);
    tensor_max_abs[t] = static_cast<float>(m);
    tensor_counts[2 * t] = nans;
    tensor_counts[2 * t + 1] = infs;
    found_inf |= nans + infs != 0;
    all = kind == NORM_L0 ? all + (s != 0.0) : combine(kind, all, s);
  }
  const double total = root(kind, d.p, all) * norm_scale;
  const double max_norm = d.max_norm_ptr ? *at<const float>(d.max_norm_ptr) : d.max_norm;
  const double coef = clip_coef(max_norm, total);
  if (d.flags & FLAG_WRITE_TENSOR_SCALES) {
    float* scales = at<float>(d.tensor_scales);
    for (int64_t t = 0; t < plan.num_tensors; ++t)  // the fp64 norm: clip_coef rounds it as for the total
      scales[t] = factor(clip_coef(max_norm, root(kind, d.p, tensor_partials[t]) * norm_scale), inv_scale, found_inf, d.policy);
  }
  float* result = at<float>(d.result);
  result[RESULT_TOTAL] = static_cast<float>(total);
  result[RESULT_FOUND_INF] = found_inf ? 1.0f : 0.0f;
  result[RESULT_COEF] = static_cast<float>(coef);
  result[RESULT_SCALE] = factor(coef, inv_scale, found_inf, d.policy);
}

// A NaN max |x| pattern as the canonical quiet NaN.
float max_abs_of(uint32_t bits) {
  return bits > 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : float_of(bits);
}

}  // namespace

void reduce(const ClipDesc& d, int num_threads) {
  check_reduce(d);
  const Plan plan(d);
  const KernelSet& k = kernels();
  double* partials = at<double>(d.chunk_partials);
  float* max_abs = at<float>(d.chunk_max_abs);
  int32_t* counts = at<int32_t>(d.chunk_counts);
  const int kind = static_cast<int>(d.norm_kind);
  for_each_chunk(plan, num_threads, [&](int64_t c) {
    const Span s = chunk_span(plan, c);
    const SpanPartial r = k.reduce(s.data, s.n, s.dtype, kind, d.p);
    partials[c] = r.value;
    max_abs[c] = max_abs_of(r.max_bits);
    counts[2 * c] = static_cast<int32_t>(r.nan_count);
    counts[2 * c + 1] = static_cast<int32_t>(r.inf_count);
  });
  finalize(d);
}

void scale(const ClipDesc& d, int num_threads) {
  const bool per_tensor = d.flags & FLAG_READ_TENSOR_SCALES;
  // No clipping needed: gradient memory is not touched and nothing is checked (a NaN goes on).
  if (!per_tensor && d.scale_ptr && *at<const float>(d.scale_ptr) == 1.0f) return;
  check_scale(d);
  const Plan plan(d);
  const float* scales = per_tensor ? at<const float>(d.tensor_scales) : at<const float>(d.scale_ptr);
  const KernelSet& k = kernels();
  for_each_chunk(plan, num_threads, [&](int64_t c) {
    const Span sp = chunk_span(plan, c);
    const float s = scales[per_tensor ? sp.tensor : 0];
    if (s == 1.0f) return;
    if (d.zero_if_scale_is_zero && s == 0.0f) std::memset(sp.data, 0, static_cast<size_t>(sp.n * element_size(sp.dtype)));  // +0.0 in every dtype; NaN * 0 would stay NaN
    else k.scale(sp.data, sp.n, sp.dtype, s);
  });
}

}  // namespace gradfuse::cpu
