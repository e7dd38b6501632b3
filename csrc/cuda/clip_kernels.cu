// gradfuse CUDA kernels: fused gradient-norm reduce (phase 1) and in-place scale (phase 2).
//
// Contract: gradfuse/_abi.py (plan tables, workspace, outputs, formulas, policies). Host
// interface: clip_kernels.h. Everything below runs on raw device addresses; one launch per phase.
//
// ---------------------------------------------------------------------------------------------
// Phase 1, reduce_kernel<KIND> (one launch, persistent grid, mixed fp32/fp16/bf16):
//
//   for each chunk c (block b takes c = b, b + G, b + 2G, ...):
//     chunk_partials[c]  = P_c = sum_i x_i^2 (L2) | sum |x_i| (L1) | sum |x_i|^p (P)
//                              | max |x_i| (INF) | min |x_i| (NEG_INF) | #{x_i != 0} (L0)
//                          accumulated in fp32; INF / NEG_INF give NaN when the chunk holds a NaN
//     chunk_nonfinite[c] = 1 if some x_i is NaN or +-Inf, else 0
//   the last block to finish (ticket counter) then computes, in fp64 and in a fixed order:
//     S_t    = sum_{c in t} P_c   (max for INF, min for NEG_INF; NaN-propagating)
//     norm_t = sqrt(S_t) * inv (L2) | S_t^(1/p) * inv (P) | S_t * inv (L1, INF, NEG_INF) | S_t (L0)
//     total  = same formula on sum_t S_t (max_t / min_t for INF / NEG_INF;
//              L0: #{t : S_t != 0}, no inv)
//     found  = OR_c chunk_nonfinite[c]
//     coef   = max_norm / (total + 1e-6), then min(coef, 1) with NaN propagating (torch.clamp)
//     scale  = coef * inv          POLICY_PROPAGATE
//              found ? 1 : coef*inv   POLICY_SKIP
//              found ? 0 : coef*inv   POLICY_ZERO
//     tensor_norms[t] = (float)norm_t; result = {total, found, coef, scale} as float32
//   where inv = *inv_scale_ptr (or 1) and max_norm = *max_norm_ptr (or the double argument).
//
// Determinism: a chunk partial depends only on the chunk's contents and address alignment (the
// element -> thread map and the reduction tree inside a block are fixed; no float atomics), not on
// which block ran it or when. The finalize reads the partials in a fixed order. So the same input
// gives the same bits on every run (for a fixed build of these tunables).
//
// Phase 2, scale_kernel (one launch): s = *scale_ptr; s == 1 -> every block returns at once (no
// gradient traffic; NaN is not == 1 so it propagates); else x = x * s in fp32 rounded once to the
// gradient's dtype, or x = 0 when zero_if_scale_is_zero && s == 0.
//
// Memory access: each chunk is split into a scalar head (elements before the first 16-byte
// boundary: a view at an odd storage offset), a body of 16-byte vectors (LDG.E.128 / STG.E.128,
// kUnroll independent loads in flight per thread) and a scalar tail. A chunk starts at
// addrs[t] + chunk_start[c] * elem_size; the head is computed from that address, so any
// chunk_size and any element-aligned tensor address work. Precondition (always true for torch
// tensors): every address is aligned to its element size.
//
// Indexing: chunk_start / numels are int64 (tensors beyond 2^31 elements); inside a chunk the
// index is int32 (chunk_size <= 2^30, checked on the host).
// ---------------------------------------------------------------------------------------------

#include "clip_kernels.h"

#include <cuda.h>  // CUcontext / CUresult, for restoring the caller's exact context (no libcuda link)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace gradfuse_cuda {
namespace {

// =============================================================================================
// Tunables (first pass measured on an H200; re-tune there with the -D overrides below).
//
// Bandwidth-latency product. H200: HBM3e ~4.8 TB/s peak, ~4.3 TB/s measured copy bandwidth;
// loaded DRAM latency on Hopper ~600-800 ns. Little's law: bytes in flight needed
//   = 4.3e12 B/s * ~700e-9 s ~= 3.0 MB for the chip ~= 23 KB per SM (132 SMs).
// Reduce: kReduceThreads * kReduceBlocksPerSM * kReduceUnroll * 16 B
//   = 512 * 2 * 4 * 16 B = 64 KB per SM at the top of each unrolled iteration, ~2.8x the need:
//   the margin covers the issue/consume gap of each iteration (a thread has nothing in flight
//   while it accumulates), the block reduction at the end of every chunk (~1 per 8 iterations
//   for fp32 at 65536-element chunks, ~1 per 4 for 16-bit) and latency above 700 ns under load.
//   1024 threads/SM with __launch_bounds__(512, 2) caps registers at 64/thread (65536-entry RF),
//   which the kernels fit without spills (see the -Xptxas -v report). 2048 threads/SM would cap
//   them at 32: measured, 256 x 8 x 2 spills and runs ~15% slower.
// Why 512 x 2 rather than 256 x 4 (same bytes in flight): the persistent grid ends with a tail of
//   at most one chunk per block, finished at one block's share of the bandwidth; fewer, bigger
//   blocks shorten that tail, and the scale kernel streams better with them. Measured on the H200
//   (GPU time per call from CUDA-graph replays, 512x2 vs 256x4): Llama-7B-shaped bf16 grads
//   (13.5 GB) reduce 2.98 vs 3.02 ms (4.52 vs 4.46 TB/s read), scale 6.85 vs 7.24 ms (3.94 vs
//   3.73 TB/s read+write); GPT-2-small grads reduce 120.0 vs 121.6 us (fp32), 66.9 vs 68.8 us
//   (bf16), scale 257 vs 269 us (fp32). 1024 x 1 ties on large inputs and loses on many small
//   chunks (3000 x 1000 fp32: 32 vs 21 us; per-chunk latency, more chunks per block).
// Scale: read-modify-write; reads are half of the traffic, so the same 64 KB of loads in flight
//   per SM is again ~2.8x what the read side needs at ~2.15 TB/s of reads + ~2.15 TB/s of writes.
// Chunk (caller's, 65536 elements = 256 KB fp32 / 128 KB 16-bit): big enough to amortise the
//   per-chunk metadata loads and block reduction (8192 costs 1.5x on 13.5 GB; 65536..262144 are
//   within 1%), small enough that the tail above stays short.
// =============================================================================================
// Each can be overridden at build time (-DGRADFUSE_REDUCE_THREADS=512 ...) for tuning sweeps.
#ifndef GRADFUSE_REDUCE_THREADS
#define GRADFUSE_REDUCE_THREADS 512
#endif
#ifndef GRADFUSE_REDUCE_BLOCKS_PER_SM
#define GRADFUSE_REDUCE_BLOCKS_PER_SM 2
#endif
#ifndef GRADFUSE_REDUCE_UNROLL
#define GRADFUSE_REDUCE_UNROLL 4
#endif
#ifndef GRADFUSE_SCALE_THREADS
#define GRADFUSE_SCALE_THREADS 512
#endif
#ifndef GRADFUSE_SCALE_BLOCKS_PER_SM
#define GRADFUSE_SCALE_BLOCKS_PER_SM 2
#endif
#ifndef GRADFUSE_SCALE_UNROLL
#define GRADFUSE_SCALE_UNROLL 4
#endif
constexpr int kReduceThreads = GRADFUSE_REDUCE_THREADS;           // threads per reduce block (multiple of 32)
constexpr int kReduceBlocksPerSM = GRADFUSE_REDUCE_BLOCKS_PER_SM;  // persistent grid = SMs * this (and launch bound)
constexpr int kReduceUnroll = GRADFUSE_REDUCE_UNROLL;              // independent 16-byte loads in flight per thread
constexpr int kScaleThreads = GRADFUSE_SCALE_THREADS;              // threads per scale block
constexpr int kScaleBlocksPerSM = GRADFUSE_SCALE_BLOCKS_PER_SM;    // persistent grid = SMs * this
constexpr int kScaleUnroll = GRADFUSE_SCALE_UNROLL;                // independent 16-byte loads in flight per thread
// Finalize (last block only): a tensor with at most kFinalizeSmallChunks chunks is summed by one
// thread (kReduceThreads tensors at once: small tensors cost ~one L2 round trip per tile); a larger one
// by a whole warp (lanes stride over its chunks, then a shuffle tree). kFinalizeUnroll partials
// are loaded before they are combined, to keep L2 reads in flight.
constexpr int kFinalizeSmallChunks = 32;
constexpr int kFinalizeUnroll = 8;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kReduceWarps = kReduceThreads / kWarpSize;
constexpr long long kMaxChunkSize = 1LL << 30;  // keeps in-chunk indices (+ unroll slack) in int32
constexpr int kMaxCachedDevices = 64;

static_assert(kReduceThreads % kWarpSize == 0 && kReduceThreads <= 1024, "bad kReduceThreads");
static_assert(kReduceWarps <= kWarpSize, "the block reduction uses one warp for the warp partials");
static_assert(kScaleThreads % kWarpSize == 0 && kScaleThreads <= 1024, "bad kScaleThreads");
static_assert(kReduceThreads >= 16 && kScaleThreads >= 16, "heads and tails need up to 7 threads");
static_assert(kReduceUnroll >= 1 && kScaleUnroll >= 1 && kFinalizeUnroll >= 1, "bad unroll");

// ---------------------------------------------------------------------------------------------
// Kernel parameters (passed by value; one struct per kernel).
// ---------------------------------------------------------------------------------------------
struct ReduceParams {
  const long long* addrs;               // int64[T]: address of element 0 of tensor t
  const long long* numels;              // int64[T]: elements of tensor t
  const long long* dtypes;              // int64[T]: DTYPE_* of tensor t
  const long long* tensor_chunk_begin;  // int64[T+1]: first chunk of t; [T] = C
  const long long* chunk_tensor;        // int64[C]: tensor of chunk c
  const long long* chunk_start;         // int64[C]: first element of chunk c inside its tensor
  long long num_tensors;                // T
  long long num_chunks;                 // C
  long long chunk_size;                 // elements per full chunk (<= kMaxChunkSize)
  float pf;                             // p as float, for the per-element |x|^p (NORM_P)
  double p;                             // p, for S^(1/p) in the finalize (NORM_P)
  double max_norm;                      // threshold when max_norm_ptr is null
  const float* max_norm_ptr;            // float32[1] threshold on the device, or null
  const float* inv_scale_ptr;           // float32[1] inverse loss scale, or null (= 1)
  int policy;                           // POLICY_*
  float* partials;                      // float32[C] out: chunk partials
  int* nonfinite;                       // int32[C] out: chunk NaN/Inf flags
  int* ticket;                          // int32[1] in/out: block counter, 0 on entry and exit
  float* tensor_norms;                  // float32[T] out
  float* result;                        // float32[4] out: total, found_inf, coef, scale
};

struct ScaleParams {
  const long long* addrs;         // int64[T]: address of element 0 of tensor t (written in place)
  const long long* numels;        // int64[T]
  const long long* dtypes;        // int64[T]
  const long long* chunk_tensor;  // int64[C]
  const long long* chunk_start;   // int64[C]
  long long num_chunks;           // C
  long long chunk_size;           // elements per full chunk
  const float* scale;             // float32[1]: the factor
  int zero_if_scale_is_zero;      // 1: write zeros when *scale == 0
};

// ---------------------------------------------------------------------------------------------
// Chunk metadata: two dependent levels of table loads (chunk -> tensor row), issued one chunk
// ahead so that their latency overlaps the current chunk.
// ---------------------------------------------------------------------------------------------
struct ChunkRef {
  long long tensor;  // chunk_tensor[c]
  long long start;   // chunk_start[c]
};

struct Chunk {
  char* base;  // address of the chunk's first element
  int n;       // elements in the chunk, 1..chunk_size
  int dtype;   // DTYPE_*, or -1 for an unknown tag
};

__device__ __forceinline__ ChunkRef load_ref(const long long* __restrict__ chunk_tensor,
                                             const long long* __restrict__ chunk_start, long long c) {
  return ChunkRef{__ldg(chunk_tensor + c), __ldg(chunk_start + c)};
}

__device__ __forceinline__ Chunk resolve(const long long* __restrict__ addrs,
                                         const long long* __restrict__ numels,
                                         const long long* __restrict__ dtypes, long long chunk_size,
                                         ChunkRef r) {
  const long long addr = __ldg(addrs + r.tensor);
  const long long numel = __ldg(numels + r.tensor);
  const long long tag = __ldg(dtypes + r.tensor);
  const long long left = numel - r.start;
  Chunk ch;
  ch.n = static_cast<int>(left < chunk_size ? left : chunk_size);
  ch.dtype = (tag == DTYPE_F32 || tag == DTYPE_F16 || tag == DTYPE_BF16) ? static_cast<int>(tag) : -1;
  const long long elem_bytes = (tag == DTYPE_F32) ? 4 : 2;
  // 64-bit byte offset: chunk_start may exceed 2^31 elements.
  ch.base = reinterpret_cast<char*>(static_cast<uintptr_t>(addr)) + r.start * elem_bytes;
  return ch;
}

// ---------------------------------------------------------------------------------------------
// Element types: scalar load/store at a byte address + element index, 16-byte vector unpack/pack.
// Element k of a vector lives at the lower address, i.e. in the low bits of its 32-bit word.
// ---------------------------------------------------------------------------------------------
template <int DT>
struct Elem;

template <>
struct Elem<DTYPE_F32> {
  static constexpr int kBytes = 4;
  static constexpr int kPerVec = 4;
  __device__ __forceinline__ static float load_ro(const char* p, int i) {
    return __ldg(reinterpret_cast<const float*>(p) + i);
  }
  __device__ __forceinline__ static float load(const char* p, int i) {
    return reinterpret_cast<const float*>(p)[i];
  }
  __device__ __forceinline__ static void store(char* p, int i, float x) {
    reinterpret_cast<float*>(p)[i] = x;
  }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[kPerVec]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kPerVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

__device__ __forceinline__ float2 half2_bits_to_float2(unsigned w) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  return __half22float2(h);
}
__device__ __forceinline__ unsigned float2_to_half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi; each rounded once
  unsigned w;
  memcpy(&w, &h, sizeof(w));
  return w;
}
__device__ __forceinline__ unsigned float2_to_bf162_bits(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  unsigned w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

template <>
struct Elem<DTYPE_F16> {
  static constexpr int kBytes = 2;
  static constexpr int kPerVec = 8;
  __device__ __forceinline__ static float load_ro(const char* p, int i) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p) + i)));
  }
  __device__ __forceinline__ static float load(const char* p, int i) {
    return __half2float(__ushort_as_half(reinterpret_cast<const unsigned short*>(p)[i]));
  }
  __device__ __forceinline__ static void store(char* p, int i, float x) {
    reinterpret_cast<unsigned short*>(p)[i] = __half_as_ushort(__float2half_rn(x));
  }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[kPerVec]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 t = half2_bits_to_float2(w[k]);
      f[2 * k] = t.x;
      f[2 * k + 1] = t.y;
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kPerVec]) {
    return make_uint4(float2_to_half2_bits(f[0], f[1]), float2_to_half2_bits(f[2], f[3]),
                      float2_to_half2_bits(f[4], f[5]), float2_to_half2_bits(f[6], f[7]));
  }
};

template <>
struct Elem<DTYPE_BF16> {
  static constexpr int kBytes = 2;
  static constexpr int kPerVec = 8;
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  __device__ __forceinline__ static float load_ro(const char* p, int i) {
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p) + i)) << 16);
  }
  __device__ __forceinline__ static float load(const char* p, int i) {
    return __uint_as_float(static_cast<unsigned>(reinterpret_cast<const unsigned short*>(p)[i]) << 16);
  }
  __device__ __forceinline__ static void store(char* p, int i, float x) {
    reinterpret_cast<unsigned short*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[kPerVec]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kPerVec]) {
    return make_uint4(float2_to_bf162_bits(f[0], f[1]), float2_to_bf162_bits(f[2], f[3]),
                      float2_to_bf162_bits(f[4], f[5]), float2_to_bf162_bits(f[6], f[7]));
  }
};

// Elements before the first 16-byte boundary at `p` (clamped to n). 0 when p is 16-byte aligned.
template <int DT>
__device__ __forceinline__ int head_elems(const char* p, int n) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p)) & 15u;
  const int h = static_cast<int>(((16u - mis) & 15u) / Elem<DT>::kBytes);
  return h < n ? h : n;
}

// ---------------------------------------------------------------------------------------------
// Norm kinds: per-element accumulation (fp32) and the combine operators (fp32 / fp64).
// ---------------------------------------------------------------------------------------------

// NaN-propagating max / min (PTX max.NaN / min.NaN, sm_80+): the result is NaN if either input is.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}
__device__ __forceinline__ float fmin_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a != a || b != b) ? a + b : fminf(a, b);
#endif
}
__device__ __forceinline__ double dmax_nan(double a, double b) {
  return (a != a || b != b) ? a + b : fmax(a, b);
}
__device__ __forceinline__ double dmin_nan(double a, double b) {
  return (a != a || b != b) ? a + b : fmin(a, b);
}

// Identity of the chunk combine: 0 for the sums and for max |x| (|x| >= 0), +Inf for min |x|.
template <int KIND>
__device__ __forceinline__ float identity32() {
  return KIND == NORM_NEG_INF ? __int_as_float(0x7f800000) : 0.0f;
}
template <int KIND>
__device__ __forceinline__ double identity64() {
  return KIND == NORM_NEG_INF ? __longlong_as_double(0x7ff0000000000000LL) : 0.0;
}

// Combine two partials of the same kind (sum; max / min with NaN propagating). Commutative, so
// both lanes of a shuffle-xor pair compute the same bits.
template <int KIND>
__device__ __forceinline__ float combine32(float a, float b) {
  if constexpr (KIND == NORM_INF) return fmax_nan(a, b);
  else if constexpr (KIND == NORM_NEG_INF) return fmin_nan(a, b);
  else return a + b;
}
template <int KIND>
__device__ __forceinline__ double combine64(double a, double b) {
  if constexpr (KIND == NORM_INF) return dmax_nan(a, b);
  else if constexpr (KIND == NORM_NEG_INF) return dmin_nan(a, b);
  else return a + b;
}

// Fold one element into the thread's partial v. z tracks non-finite elements for free:
// fma(x, 0, z) stays 0 for finite x and becomes NaN (for good) at the first +-Inf or NaN.
// NORM_INF needs no z: max |x| is non-finite exactly when the chunk holds a NaN or an Inf.
template <int KIND>
__device__ __forceinline__ void accumulate(float x, float p, float& v, float& z) {
  if constexpr (KIND == NORM_L2) v = fmaf(x, x, v);
  else if constexpr (KIND == NORM_L1) v += fabsf(x);
  else if constexpr (KIND == NORM_P) v += powf(fabsf(x), p);
  else if constexpr (KIND == NORM_INF) v = fmax_nan(v, fabsf(x));
  else if constexpr (KIND == NORM_NEG_INF) v = fmin_nan(v, fabsf(x));
  else v += (x != 0.0f) ? 1.0f : 0.0f;  // NORM_L0: NaN != 0 counts, like torch
  if constexpr (KIND != NORM_INF) z = __fmaf_rn(x, 0.0f, z);
}

template <int KIND>
__device__ __forceinline__ float warp_allreduce32(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = combine32<KIND>(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
template <int KIND>
__device__ __forceinline__ double warp_allreduce64(double v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = combine64<KIND>(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Phase 1 inner loop: this thread's share of one chunk of dtype DT, folded into (v, z).
// Element -> thread map (fixed, hence deterministic partials): head element j -> thread j;
// body vector i -> thread i % kReduceThreads, visited in increasing i; tail element j -> thread j.
// ---------------------------------------------------------------------------------------------
template <int KIND, int DT>
__device__ __forceinline__ void reduce_chunk(const char* __restrict__ base, int n, float p, float& v, float& z) {
  using E = Elem<DT>;
  constexpr int T = kReduceThreads;
  constexpr int U = kReduceUnroll;
  const int tid = threadIdx.x;
  const int head = head_elems<DT>(base, n);
  if (tid < head) accumulate<KIND>(E::load_ro(base, tid), p, v, z);

  const uint4* __restrict__ body = reinterpret_cast<const uint4*>(base + head * E::kBytes);  // 16-B aligned
  const int rest = n - head;
  const int nv = rest / E::kPerVec;  // full 16-byte vectors
  int i = tid;
  // Unpredicated main loop: U independent 16-byte loads, then U vectors of math.
  for (; i + (U - 1) * T < nv; i += U * T) {
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r[u] = __ldg(body + i + u * T);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[E::kPerVec];
      E::unpack(r[u], f);
#pragma unroll
      for (int k = 0; k < E::kPerVec; ++k) accumulate<KIND>(f[k], p, v, z);
    }
  }
  // At most one partial round (i + (U-1)*T >= nv implies i + U*T > nv): predicated loads.
  if (i < nv) {
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r[u] = (i + u * T < nv) ? __ldg(body + i + u * T) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + u * T < nv) {
        float f[E::kPerVec];
        E::unpack(r[u], f);
#pragma unroll
        for (int k = 0; k < E::kPerVec; ++k) accumulate<KIND>(f[k], p, v, z);
      }
    }
  }
  const int tail = rest - nv * E::kPerVec;  // < kPerVec
  if (tid < tail) accumulate<KIND>(E::load_ro(reinterpret_cast<const char*>(body + nv), tid), p, v, z);
}

// ---------------------------------------------------------------------------------------------
// Phase 1 finalize helpers (fp64).
// ---------------------------------------------------------------------------------------------

// norm from a combined partial S: sqrt(S)*inv | S^(1/p)*inv | S*inv | S (L0, never scaled).
template <int KIND>
__device__ __forceinline__ double finish_norm(double S, double inv, double p) {
  if constexpr (KIND == NORM_L2) return sqrt(S) * inv;
  else if constexpr (KIND == NORM_P) return pow(S, 1.0 / p) * inv;
  else if constexpr (KIND == NORM_L0) return S;
  else return S * inv;
}

// Fold tensor t's S_t into a running total: sum / max / min of S_t, or (L0) count of S_t != 0.
// Running totals of the same kind then combine with combine64 (for L0 they are counts: a sum).
template <int KIND>
__device__ __forceinline__ double fold_tensor(double acc, double S) {
  if constexpr (KIND == NORM_L0) return acc + (S != 0.0 ? 1.0 : 0.0);
  else return combine64<KIND>(acc, S);
}

// Combine the partials of chunks first, first + stride, ... < end in that order (fp64), loading
// kFinalizeUnroll of them before combining them. Partials and flags are read with ld.global.cg
// (L2, never a stale L1 line): other blocks wrote them during this launch.
template <int KIND>
__device__ __forceinline__ double combine_chunks(const ReduceParams& P, long long first, long long end,
                                                 int stride, int& bad) {
  constexpr int U = kFinalizeUnroll;
  double S = identity64<KIND>();
  for (long long c = first; c < end; c += static_cast<long long>(U) * stride) {
    float v[U];
    int f[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long cu = c + static_cast<long long>(u) * stride;
      v[u] = (cu < end) ? __ldcg(P.partials + cu) : 0.0f;
      f[u] = (cu < end) ? __ldcg(P.nonfinite + cu) : 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c + static_cast<long long>(u) * stride < end) {
        S = combine64<KIND>(S, static_cast<double>(v[u]));
        bad |= f[u];
      }
    }
  }
  return S;
}

// The last block: per-tensor norms, total, found_inf, coef, scale (see the file comment).
// Order (fixed): tensors in tiles of kReduceThreads; in a tile, thread j sums tensor tile+j alone
// when it has <= kFinalizeSmallChunks chunks (sequentially), else the tensor goes to a list built
// in tensor order (ballot + prefix) that warps take round-robin (lane l sums chunks l, l+32, ...
// in order, then a shuffle-xor tree). Running totals: per thread (small tensors) and per warp (big
// ones), combined by a shuffle-xor tree, then over warps in order by thread 0.
template <int KIND>
__device__ __forceinline__ void finalize(const ReduceParams& P) {
  __shared__ int s_count[kReduceWarps];
  __shared__ long long s_t[kReduceThreads], s_b[kReduceThreads], s_e[kReduceThreads];
  __shared__ double s_total[kReduceWarps];
  const int tid = threadIdx.x;
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;
  const double inv = P.inv_scale_ptr ? static_cast<double>(__ldg(P.inv_scale_ptr)) : 1.0;

  double thread_total = identity64<KIND>();  // small tensors of this thread
  double warp_total = identity64<KIND>();    // big tensors of this warp (same bits in every lane)
  int bad = 0;                               // OR of the chunk_nonfinite flags this thread read
  for (long long tile = 0; tile < P.num_tensors; tile += kReduceThreads) {
    const long long t = tile + tid;
    bool big = false;
    long long b = 0, e = 0;
    if (t < P.num_tensors) {
      b = __ldg(P.tensor_chunk_begin + t);
      e = __ldg(P.tensor_chunk_begin + t + 1);
      if (e - b <= kFinalizeSmallChunks) {
        const double S = combine_chunks<KIND>(P, b, e, 1, bad);
        P.tensor_norms[t] = static_cast<float>(finish_norm<KIND>(S, inv, P.p));
        thread_total = fold_tensor<KIND>(thread_total, S);
      } else {
        big = true;
      }
    }
    // Compact the big tensors of this tile into s_t/s_b/s_e, in tensor order.
    const unsigned ballot = __ballot_sync(kFullMask, big);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, num_big = 0;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) {
      const int k = s_count[w];
      offset += (w < warp) ? k : 0;
      num_big += k;
    }
    if (big) {
      const int j = offset + __popc(ballot & ((1u << lane) - 1u));
      s_t[j] = t;
      s_b[j] = b;
      s_e[j] = e;
    }
    __syncthreads();
    for (int j = warp; j < num_big; j += kReduceWarps) {  // warp-uniform loop
      const long long tj = s_t[j];
      double S = combine_chunks<KIND>(P, s_b[j] + lane, s_e[j], kWarpSize, bad);
      S = warp_allreduce64<KIND>(S);
      if (lane == 0) P.tensor_norms[tj] = static_cast<float>(finish_norm<KIND>(S, inv, P.p));
      warp_total = fold_tensor<KIND>(warp_total, S);
    }
    __syncthreads();  // s_count / s_t / s_b / s_e are rewritten by the next tile
  }

  double v = warp_allreduce64<KIND>(thread_total);
  v = combine64<KIND>(v, warp_total);
  if (lane == 0) s_total[warp] = v;
  const int found = __syncthreads_or(bad);
  if (tid == 0) {
    double acc = s_total[0];
#pragma unroll
    for (int w = 1; w < kReduceWarps; ++w) acc = combine64<KIND>(acc, s_total[w]);
    const double total = finish_norm<KIND>(acc, inv, P.p);  // L0: acc is already the tensor count
    const double max_norm = P.max_norm_ptr ? static_cast<double>(__ldg(P.max_norm_ptr)) : P.max_norm;
    // On the fp32-rounded total, as every backend does (see _abi.py): the same coef bits everywhere.
    double coef = max_norm / (static_cast<double>(static_cast<float>(total)) + 1e-6);
    if (!(coef != coef)) coef = fmin(coef, 1.0);  // torch.clamp(max=1): NaN stays NaN
    double scale = coef * inv;
    if (found) {
      if (P.policy == POLICY_SKIP) scale = 1.0;
      else if (P.policy == POLICY_ZERO) scale = 0.0;
    }
    P.result[RESULT_TOTAL] = static_cast<float>(total);
    P.result[RESULT_FOUND_INF] = found ? 1.0f : 0.0f;
    P.result[RESULT_COEF] = static_cast<float>(coef);
    P.result[RESULT_SCALE] = static_cast<float>(scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 1 kernel. Grid: min(C, SMs * kReduceBlocksPerSM) blocks (at least 1), kReduceThreads each.
// Blocks need not be co-resident: the last block is found with a ticket, nobody waits.
// ---------------------------------------------------------------------------------------------
template <int KIND>
__global__ void __launch_bounds__(kReduceThreads, kReduceBlocksPerSM) reduce_kernel(const ReduceParams P) {
  // Per-warp partials, double-buffered by chunk parity: a warp may start writing chunk k+1's
  // partial while warp 0 still reads chunk k's; it cannot reach chunk k+2 before warp 0 has passed
  // chunk k+1's barrier, i.e. finished reading chunk k.
  __shared__ float s_warp[2][kReduceWarps];
  __shared__ int s_is_last;
  const int tid = threadIdx.x;
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;
  const long long C = P.num_chunks;
  int parity = 0;

  long long c = blockIdx.x;
  Chunk ch{nullptr, 0, -1};
  if (c < C) ch = resolve(P.addrs, P.numels, P.dtypes, P.chunk_size, load_ref(P.chunk_tensor, P.chunk_start, c));
  while (c < C) {  // block-uniform
    const long long cn = c + gridDim.x;
    ChunkRef next_ref{0, 0};
    if (cn < C) next_ref = load_ref(P.chunk_tensor, P.chunk_start, cn);  // in flight during the body

    float v = identity32<KIND>();
    float z = 0.0f;
    switch (ch.dtype) {
      case DTYPE_F32: reduce_chunk<KIND, DTYPE_F32>(ch.base, ch.n, P.pf, v, z); break;
      case DTYPE_F16: reduce_chunk<KIND, DTYPE_F16>(ch.base, ch.n, P.pf, v, z); break;
      case DTYPE_BF16: reduce_chunk<KIND, DTYPE_BF16>(ch.base, ch.n, P.pf, v, z); break;
      default: v = __int_as_float(0x7fffffff); z = v; break;  // unknown tag: poison (NaN, flagged)
    }

    Chunk next{nullptr, 0, -1};
    if (cn < C) next = resolve(P.addrs, P.numels, P.dtypes, P.chunk_size, next_ref);  // overlaps the reduction

    // Block reduction, fixed tree: shuffle-xor within warps, then warp 0 over the warp partials.
    v = warp_allreduce32<KIND>(v);
    if (lane == 0) s_warp[parity][warp] = v;
    const int bad = __syncthreads_or(z != 0.0f);  // z is 0 or NaN; NaN != 0. Also the barrier.
    if (warp == 0) {
      float w = (lane < kReduceWarps) ? s_warp[parity][lane] : identity32<KIND>();
      w = warp_allreduce32<KIND>(w);
      if (lane == 0) {
        P.partials[c] = w;
        if constexpr (KIND == NORM_INF) P.nonfinite[c] = isfinite(w) ? 0 : 1;
        else P.nonfinite[c] = bad ? 1 : 0;
      }
    }
    parity ^= 1;
    ch = next;
    c = cn;
  }

  // Ticket: thread 0 wrote every partial/flag of this block. Release them device-wide, then count
  // the block in; the block that takes the last ticket acquires everyone's writes and finalizes.
  if (tid == 0) {
    __threadfence();
    const int prev = atomicAdd(P.ticket, 1);
    const int last = (prev == static_cast<int>(gridDim.x) - 1);
    if (last) __threadfence();
    s_is_last = last;
  }
  __syncthreads();
  if (!s_is_last) return;
  finalize<KIND>(P);
  if (tid == 0) atomicExch(P.ticket, 0);  // every other block has taken its ticket: safe to reset
}

// ---------------------------------------------------------------------------------------------
// Phase 2: x = x * s (fp32 math, one rounding) or x = 0, for this block's share of one chunk.
// ---------------------------------------------------------------------------------------------
template <int DT>
__device__ __forceinline__ uint4 scale_vec(const uint4& r, float s) {
  using E = Elem<DT>;
  float f[E::kPerVec];
  E::unpack(r, f);
#pragma unroll
  for (int k = 0; k < E::kPerVec; ++k) f[k] = __fmul_rn(f[k], s);
  return E::pack(f);
}

template <int DT>
__device__ __forceinline__ void scale_chunk(char* __restrict__ base, int n, float s, bool zero) {
  using E = Elem<DT>;
  constexpr int T = kScaleThreads;
  // Gradients are device (global-space) memory. Saying so lets the compiler emit global
  // LDG/STG.E.128 rather than generic LD/ST (the address comes from a table, via a loop phi).
  __builtin_assume(__isGlobal(base));
  constexpr int U = kScaleUnroll;
  const int tid = threadIdx.x;
  const int head = head_elems<DT>(base, n);
  if (tid < head) E::store(base, tid, zero ? 0.0f : __fmul_rn(E::load(base, tid), s));

  uint4* __restrict__ body = reinterpret_cast<uint4*>(base + head * E::kBytes);  // 16-byte aligned
  const int rest = n - head;
  const int nv = rest / E::kPerVec;
  if (zero) {
    for (int i = tid; i < nv; i += T) body[i] = make_uint4(0, 0, 0, 0);
  } else {
    int i = tid;
    for (; i + (U - 1) * T < nv; i += U * T) {
      uint4 r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = body[i + u * T];
#pragma unroll
      for (int u = 0; u < U; ++u) body[i + u * T] = scale_vec<DT>(r[u], s);
    }
    if (i < nv) {  // at most one partial round
      uint4 r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = (i + u * T < nv) ? body[i + u * T] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (i + u * T < nv) body[i + u * T] = scale_vec<DT>(r[u], s);
    }
  }
  const int tail = rest - nv * E::kPerVec;
  char* tail_base = reinterpret_cast<char*>(body + nv);
  if (tid < tail) E::store(tail_base, tid, zero ? 0.0f : __fmul_rn(E::load(tail_base, tid), s));
}

// Grid: min(C, SMs * kScaleBlocksPerSM) blocks of kScaleThreads. Chunks are taken from the end
// (c = C-1-b, C-1-b-G, ...): the reduce's blocks finish on the highest chunks, which are the ones
// most likely still in L2 when this pass starts.
__global__ void __launch_bounds__(kScaleThreads, kScaleBlocksPerSM) scale_kernel(const ScaleParams P) {
  const float s = __ldg(P.scale);  // written by an earlier kernel on this stream
  if (s == 1.0f) return;     // no gradient traffic; NaN is not == 1 and goes on to propagate
  const bool zero = P.zero_if_scale_is_zero && s == 0.0f;
  const long long C = P.num_chunks;

  long long k = blockIdx.x;
  Chunk ch{nullptr, 0, -1};
  if (k < C) ch = resolve(P.addrs, P.numels, P.dtypes, P.chunk_size, load_ref(P.chunk_tensor, P.chunk_start, C - 1 - k));
  while (k < C) {
    const long long kn = k + gridDim.x;
    ChunkRef next_ref{0, 0};
    if (kn < C) next_ref = load_ref(P.chunk_tensor, P.chunk_start, C - 1 - kn);
    switch (ch.dtype) {
      case DTYPE_F32: scale_chunk<DTYPE_F32>(ch.base, ch.n, s, zero); break;
      case DTYPE_F16: scale_chunk<DTYPE_F16>(ch.base, ch.n, s, zero); break;
      case DTYPE_BF16: scale_chunk<DTYPE_BF16>(ch.base, ch.n, s, zero); break;
      default: break;  // unknown tag: leave the memory alone
    }
    Chunk next{nullptr, 0, -1};
    if (kn < C) next = resolve(P.addrs, P.numels, P.dtypes, P.chunk_size, next_ref);
    ch = next;
    k = kn;
  }
}

// =============================================================================================
// Host side.
// =============================================================================================

std::string failed(const char* call, cudaError_t e) {
  return std::string(call) + " failed: " + cudaGetErrorString(e);
}

// Run a CUDA runtime call; on error clear the (non-sticky) error state and return the message.
#define GF_CUDA_TRY(expr, name)                  \
  do {                                           \
    const cudaError_t gf_err_ = (expr);          \
    if (gf_err_ != cudaSuccess) {                \
      (void)cudaGetLastError();                  \
      return failed(name, gf_err_);              \
    }                                            \
  } while (0)

std::string check_device(int device_index) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("no CUDA device (cudaGetDeviceCount failed: ") + cudaGetErrorString(e) + ")";
  }
  if (n <= 0) return "no CUDA device";
  if (device_index < 0 || device_index >= n)
    return "device_index " + std::to_string(device_index) + " is out of range (" + std::to_string(n) +
           " CUDA devices)";
  return "";
}

// SM count per device, queried once (cudaDeviceGetAttribute is cheap but not free).
std::atomic<int> g_sm_count[kMaxCachedDevices];

std::string sm_count(int device_index, int* out) {
  if (device_index < kMaxCachedDevices) {
    const int cached = g_sm_count[device_index].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return "";
    }
  }
  int sms = 0;
  GF_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index),
              "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
  if (sms <= 0) sms = 1;
  if (device_index < kMaxCachedDevices) g_sm_count[device_index].store(sms, std::memory_order_relaxed);
  *out = sms;
  return "";
}

// Driver entry points to save / restore the calling thread's exact current context (possibly
// none), so that leaving the device guard never creates a context on the previous device the way
// cudaSetDevice(prev) would. Null when unavailable; then cudaSetDevice(prev) is the fallback.
struct CtxApi {
  PFN_cuCtxGetCurrent_v4000 get = nullptr;
  PFN_cuCtxSetCurrent_v4000 set = nullptr;
};

const CtxApi& ctx_api() {
  static const CtxApi api = [] {
    CtxApi a;
    void* g = nullptr;
    void* s = nullptr;
#if CUDART_VERSION >= 12050  // the versioned query (CUDA 13 has no other); older toolkits use the fallback
    cudaDriverEntryPointQueryResult qg = cudaDriverEntryPointSymbolNotFound;
    cudaDriverEntryPointQueryResult qs = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t eg = cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &g, 4000, cudaEnableDefault, &qg);
    const cudaError_t es = cudaGetDriverEntryPointByVersion("cuCtxSetCurrent", &s, 4000, cudaEnableDefault, &qs);
    if (eg == cudaSuccess && es == cudaSuccess && qg == cudaDriverEntryPointSuccess &&
        qs == cudaDriverEntryPointSuccess && g && s) {
      a.get = reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(g);
      a.set = reinterpret_cast<PFN_cuCtxSetCurrent_v4000>(s);
    }
    (void)cudaGetLastError();
#endif
    return a;
  }();
  return api;
}

// Makes device_index current for the launch and restores the caller's state afterwards.
class DeviceGuard {
 public:
  std::string enter(int device_index) {
    int prev = -1;
    GF_CUDA_TRY(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev == device_index) return "";
    const CtxApi& api = ctx_api();
    if (api.get && api.get(&saved_ctx_) == CUDA_SUCCESS) have_ctx_ = true;
    prev_ = prev;
    GF_CUDA_TRY(cudaSetDevice(device_index), "cudaSetDevice");
    switched_ = true;
    return "";
  }
  std::string leave() {
    if (!switched_) return "";
    switched_ = false;
    if (have_ctx_ && ctx_api().set && ctx_api().set(saved_ctx_) == CUDA_SUCCESS) return "";
    GF_CUDA_TRY(cudaSetDevice(prev_), "cudaSetDevice (restoring the previous device)");
    return "";
  }

 private:
  bool switched_ = false;
  bool have_ctx_ = false;
  CUcontext saved_ctx_ = nullptr;
  int prev_ = 0;
};

template <typename Params>
std::string launch(void (*kernel)(Params), long long grid, int block, cudaStream_t stream, Params params,
                   const char* kernel_name) {
  void* argv[] = {&params};
  GF_CUDA_TRY(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(grid)),
                               dim3(static_cast<unsigned>(block)), argv, 0, stream),
              "cudaLaunchKernel");
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return std::string("cudaGetLastError after launching ") + kernel_name + " failed: " + cudaGetErrorString(e);
  return "";
}

// Device guard around `body`; an error from the body wins over one from restoring the device.
template <typename F>
std::string on_device(int device_index, F&& body) {
  DeviceGuard guard;
  std::string err = guard.enter(device_index);
  if (!err.empty()) return err;
  err = body();
  std::string restore = guard.leave();
  return err.empty() ? restore : err;
}

template <typename T>
T* dev_ptr(std::uint64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

std::string check_chunking(long long num_chunks, long long chunk_size) {
  if (num_chunks < 0) return "num_chunks must be >= 0, got " + std::to_string(num_chunks);
  if (chunk_size < 1 || chunk_size > kMaxChunkSize)
    return "chunk_size must be in [1, 2^30], got " + std::to_string(chunk_size);
  return "";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points (clip_kernels.h).
// ---------------------------------------------------------------------------------------------

std::string reduce(const ReduceArgs& a) {
  std::string err = check_chunking(a.num_chunks, a.chunk_size);
  if (!err.empty()) return err;
  if (a.num_tensors < 0) return "num_tensors must be >= 0, got " + std::to_string(a.num_tensors);
  if (a.num_chunks > 0 && a.num_tensors == 0) return "num_chunks > 0 with no tensors";
  if (a.max_tensor_chunks < 0 || a.max_tensor_chunks > a.num_chunks)
    return "max_tensor_chunks must be in [0, num_chunks], got " + std::to_string(a.max_tensor_chunks);
  if (a.norm_kind < NORM_L2 || a.norm_kind > NORM_L0) return "unknown norm_kind " + std::to_string(a.norm_kind);
  if (a.norm_kind == NORM_P && !(std::isfinite(a.p) && a.p != 0.0))
    return "NORM_P needs a finite non-zero p, got " + std::to_string(a.p) + " (use NORM_INF/NEG_INF/L0)";
  if (a.policy < POLICY_PROPAGATE || a.policy > POLICY_ZERO) return "unknown policy " + std::to_string(a.policy);
  if (!a.tensor_chunk_begin || !a.ticket || !a.result || (a.num_tensors > 0 && !a.tensor_norms))
    return "null address for tensor_chunk_begin, ticket, tensor_norms or result";
  if (a.num_chunks > 0 && (!a.addrs || !a.numels || !a.dtypes || !a.chunk_tensor || !a.chunk_start ||
                           !a.chunk_partials || !a.chunk_nonfinite))
    return "null address for a chunk table or workspace";
  err = check_device(a.device_index);
  if (!err.empty()) return err;

  ReduceParams P;
  P.addrs = dev_ptr<const long long>(a.addrs);
  P.numels = dev_ptr<const long long>(a.numels);
  P.dtypes = dev_ptr<const long long>(a.dtypes);
  P.tensor_chunk_begin = dev_ptr<const long long>(a.tensor_chunk_begin);
  P.chunk_tensor = dev_ptr<const long long>(a.chunk_tensor);
  P.chunk_start = dev_ptr<const long long>(a.chunk_start);
  P.num_tensors = a.num_tensors;
  P.num_chunks = a.num_chunks;
  P.chunk_size = a.chunk_size;
  P.pf = static_cast<float>(a.p);
  P.p = a.p;
  P.max_norm = a.max_norm;
  P.max_norm_ptr = dev_ptr<const float>(a.max_norm_ptr);
  P.inv_scale_ptr = dev_ptr<const float>(a.inv_scale_ptr);
  P.policy = a.policy;
  P.partials = dev_ptr<float>(a.chunk_partials);
  P.nonfinite = dev_ptr<int>(a.chunk_nonfinite);
  P.ticket = dev_ptr<int>(a.ticket);
  P.tensor_norms = dev_ptr<float>(a.tensor_norms);
  P.result = dev_ptr<float>(a.result);

  void (*kernel)(ReduceParams) = nullptr;
  switch (a.norm_kind) {
    case NORM_L2: kernel = reduce_kernel<NORM_L2>; break;
    case NORM_L1: kernel = reduce_kernel<NORM_L1>; break;
    case NORM_P: kernel = reduce_kernel<NORM_P>; break;
    case NORM_INF: kernel = reduce_kernel<NORM_INF>; break;
    case NORM_NEG_INF: kernel = reduce_kernel<NORM_NEG_INF>; break;
    default: kernel = reduce_kernel<NORM_L0>; break;
  }
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(a.stream));
  return on_device(a.device_index, [&]() -> std::string {
    int sms = 0;
    std::string e = sm_count(a.device_index, &sms);
    if (!e.empty()) return e;
    // One block at least: with no chunks it still writes the outputs (norms 0, found_inf 0, ...).
    long long grid = static_cast<long long>(sms) * kReduceBlocksPerSM;
    if (grid > a.num_chunks) grid = a.num_chunks;
    if (grid < 1) grid = 1;
    return launch(kernel, grid, kReduceThreads, stream, P, "reduce_kernel");
  });
}

std::string scale(const ScaleArgs& a) {
  std::string err = check_chunking(a.num_chunks, a.chunk_size);
  if (!err.empty()) return err;
  if (!a.scale_ptr) return "null scale address";
  if (a.num_chunks > 0 && (!a.addrs || !a.numels || !a.dtypes || !a.chunk_tensor || !a.chunk_start))
    return "null address for a chunk table";
  err = check_device(a.device_index);
  if (!err.empty()) return err;
  if (a.num_chunks == 0) return "";  // nothing to scale: launch nothing

  ScaleParams P;
  P.addrs = dev_ptr<const long long>(a.addrs);
  P.numels = dev_ptr<const long long>(a.numels);
  P.dtypes = dev_ptr<const long long>(a.dtypes);
  P.chunk_tensor = dev_ptr<const long long>(a.chunk_tensor);
  P.chunk_start = dev_ptr<const long long>(a.chunk_start);
  P.num_chunks = a.num_chunks;
  P.chunk_size = a.chunk_size;
  P.scale = dev_ptr<const float>(a.scale_ptr);
  P.zero_if_scale_is_zero = a.zero_if_scale_is_zero ? 1 : 0;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(a.stream));
  return on_device(a.device_index, [&]() -> std::string {
    int sms = 0;
    std::string e = sm_count(a.device_index, &sms);
    if (!e.empty()) return e;
    long long grid = static_cast<long long>(sms) * kScaleBlocksPerSM;
    if (grid > a.num_chunks) grid = a.num_chunks;
    return launch(scale_kernel, grid, kScaleThreads, stream, P, "scale_kernel");
  });
}

std::string device_error(int device_index) {
  return check_device(device_index);
}

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n > 0 ? n : 0;
}

}  // namespace gradfuse_cuda
