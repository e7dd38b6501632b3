// The chunk walk, written once for the reduce and the scale kernels (apex's multi_tensor_apply
// harness is the model): which chunks a block takes, chunk -> tensor row with the next chunk's
// metadata in flight, and the element loop of one chunk (scalar head, 16-byte vectors, scalar tail)
// for each gradient dtype. The kernels bring the math as a small "op" (see walk_chunk).
//
// Memory access: a chunk starts at addrs[t] + chunk_start[c] * elem_size. Its head is the elements
// before the first 16-byte boundary (a view at an odd storage offset), then a body of 16-byte
// vectors (LDG/STG.E.128, kUnroll independent loads in flight per thread), then a tail; the head is
// computed from the address, so any chunk_size and any element-aligned address work (every torch
// tensor is aligned to its element size). chunk_start and numels are int64 (tensors beyond 2^31
// elements); inside a chunk indices are int32 (chunk_size <= kMaxChunkSize, checked on the host).
//
// Element -> thread map (fixed, so partials are deterministic): head element j -> thread j, body
// vector i -> thread i % THREADS (visited in increasing i), tail element j -> thread j.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "gradfuse_abi.h"
#include "tuning.h"

namespace gradfuse::cuda {

using abi::ClipDesc;

template <class T>
__device__ __forceinline__ T* at(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

// ---- element types: scalar load/store, 16-byte vector unpack/pack ------------------------------
// Element k of a vector lives at the lower address, i.e. in the low bits of its 32-bit word.

template <int DT>
struct Elem;

template <>
struct Elem<abi::DTYPE_F32> {
  static constexpr int kBytes = 4;
  static constexpr int kPerVec = 4;
  __device__ __forceinline__ static float load_ro(const char* p, int i) { return __ldg(reinterpret_cast<const float*>(p) + i); }
  __device__ __forceinline__ static float load(const char* p, int i) { return reinterpret_cast<const float*>(p)[i]; }
  __device__ __forceinline__ static void store(char* p, int i, float x) { reinterpret_cast<float*>(p)[i] = x; }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[kPerVec]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kPerVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
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
struct Elem<abi::DTYPE_F16> {
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
struct Elem<abi::DTYPE_BF16> {
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

// ---- chunk -> tensor row ------------------------------------------------------------------------

struct ChunkRef {
  long long tensor;  // chunk_tensor[c]
  long long start;   // chunk_start[c]
};

// dtype of a chunk the kernels cannot read: an unknown dtype tag, a tensor index outside [0, T) or
// a start outside its tensor. The host cannot check device tables without a sync, and a kernel
// cannot raise: the reduce reports such a chunk as one NaN element (found_inf), the scale skips it,
// and neither touches memory outside a tensor.
constexpr int kUnreadable = -1;

struct Chunk {
  char* base;    // address of the chunk's first element
  int n;         // elements in the chunk, 1..chunk_size (0 when unreadable)
  int dtype;     // DTYPE_*, or kUnreadable
  float factor;  // factors[tensor] when the walk was given per-tensor factors, else 1
};

__device__ __forceinline__ ChunkRef load_ref(const ClipDesc& d, long long c) {
  return ChunkRef{__ldg(at<const long long>(d.chunk_tensor) + c), __ldg(at<const long long>(d.chunk_start) + c)};
}

__device__ __forceinline__ Chunk resolve(const ClipDesc& d, ChunkRef r, const float* __restrict__ factors) {
  Chunk ch{nullptr, 0, kUnreadable, 1.0f};
  if (r.tensor < 0 || r.tensor >= d.num_tensors) return ch;
  const long long addr = __ldg(at<const long long>(d.addrs) + r.tensor);
  const long long numel = __ldg(at<const long long>(d.numels) + r.tensor);
  const long long tag = __ldg(at<const long long>(d.dtypes) + r.tensor);
  if (factors != nullptr) ch.factor = __ldg(factors + r.tensor);
  if ((tag != abi::DTYPE_F32 && tag != abi::DTYPE_F16 && tag != abi::DTYPE_BF16) || r.start < 0 || r.start >= numel)
    return ch;
  const long long left = numel - r.start;
  ch.n = static_cast<int>(left < d.chunk_size ? left : d.chunk_size);
  ch.dtype = static_cast<int>(tag);
  // 64-bit byte offset: chunk_start may exceed 2^31 elements.
  ch.base = reinterpret_cast<char*>(static_cast<uintptr_t>(addr)) + r.start * (tag == abi::DTYPE_F32 ? 4 : 2);
  return ch;
}

// The persistent grid's chunk loop: block b takes the k-th chunks k = b, b + G, b + 2G, ... (chunk
// C-1-k when kFromEnd). For each: body.read(ch), then body.finish(c, ch). The next chunk's two
// dependent levels of table loads are spread so that their latency overlaps this chunk: its
// (tensor, start) is loaded before read, its tensor row (and factor) between read and finish (the
// reduce's block reduction). The loop is block-uniform, so body may use barriers.
template <bool kFromEnd, class Body>
__device__ __forceinline__ void for_each_chunk(const ClipDesc& d, const float* __restrict__ factors, Body& body) {
  const long long C = d.num_chunks;
  auto chunk_of = [C](long long k) { return kFromEnd ? C - 1 - k : k; };
  long long k = blockIdx.x;
  Chunk ch{nullptr, 0, kUnreadable, 1.0f};
  if (k < C) ch = resolve(d, load_ref(d, chunk_of(k)), factors);
  while (k < C) {
    const long long kn = k + gridDim.x;
    ChunkRef next_ref{0, 0};
    if (kn < C) next_ref = load_ref(d, chunk_of(kn));
    body.read(ch);
    Chunk next{nullptr, 0, kUnreadable, 1.0f};
    if (kn < C) next = resolve(d, next_ref, factors);
    body.finish(chunk_of(k), ch);
    ch = next;
    k = kn;
  }
}

// ---- the elements of one chunk ------------------------------------------------------------------
// An op is a functor float -> float applied to every element (as fp32) of the chunk, with
//   static constexpr bool kReads:  load the elements (false: the op gets 0 and no load is issued);
//   static constexpr bool kWrites: store op(x) back, rounded once to the dtype (false: read-only,
//                                  through the non-coherent cache; the op's result is unused).

template <int DT, class Op>
__device__ __forceinline__ void visit_element(char* p, int i, Op& op) {
  using E = Elem<DT>;
  float x = 0.0f;
  if constexpr (Op::kReads) x = Op::kWrites ? E::load(p, i) : E::load_ro(p, i);
  const float y = op(x);
  if constexpr (Op::kWrites) E::store(p, i, y);
}

template <class Op>
__device__ __forceinline__ uint4 load_vector(const uint4* p) {
  if constexpr (!Op::kReads) return make_uint4(0, 0, 0, 0);
  else if constexpr (Op::kWrites) return *p;
  else return __ldg(p);
}

template <int DT, class Op>
__device__ __forceinline__ void visit_vector(uint4& v, Op& op) {
  using E = Elem<DT>;
  float f[E::kPerVec];
  E::unpack(v, f);
#pragma unroll
  for (int k = 0; k < E::kPerVec; ++k) f[k] = op(f[k]);
  if constexpr (Op::kWrites) v = E::pack(f);
}

// Elements before the first 16-byte boundary at `p` (clamped to n). 0 when p is 16-byte aligned.
template <int DT>
__device__ __forceinline__ int head_elems(const char* p, int n) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p)) & 15u;
  const int h = static_cast<int>(((16u - mis) & 15u) / Elem<DT>::kBytes);
  return h < n ? h : n;
}

// This thread's share of the n elements of dtype DT at base, through op.
template <int DT, int THREADS, int UNROLL, class Op>
__device__ __forceinline__ void walk_span(char* __restrict__ base, int n, Op& op) {
  using E = Elem<DT>;
  // Gradients are device (global-space) memory. Saying so lets the compiler emit global LDG/STG.E.128
  // rather than generic LD/ST for the read-write walk (the address comes from a table, via a phi).
  if constexpr (Op::kWrites) __builtin_assume(__isGlobal(base));
  const int tid = threadIdx.x;
  const int head = head_elems<DT>(base, n);
  if (tid < head) visit_element<DT>(base, tid, op);

  uint4* __restrict__ body = reinterpret_cast<uint4*>(base + head * E::kBytes);  // 16-byte aligned
  const int rest = n - head;
  const int nv = rest / E::kPerVec;  // full 16-byte vectors
  int i = tid;
  // Unpredicated main loop: UNROLL independent 16-byte loads, then UNROLL vectors of math.
  for (; i + (UNROLL - 1) * THREADS < nv; i += UNROLL * THREADS) {
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) r[u] = load_vector<Op>(body + i + u * THREADS);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      visit_vector<DT>(r[u], op);
      if constexpr (Op::kWrites) body[i + u * THREADS] = r[u];
    }
  }
  // At most one partial round (i + (UNROLL-1)*THREADS >= nv implies i + UNROLL*THREADS > nv).
  if (i < nv) {
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) r[u] = (i + u * THREADS < nv) ? load_vector<Op>(body + i + u * THREADS) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * THREADS < nv) {
        visit_vector<DT>(r[u], op);
        if constexpr (Op::kWrites) body[i + u * THREADS] = r[u];
      }
    }
  }
  const int tail = rest - nv * E::kPerVec;  // < kPerVec
  if (tid < tail) visit_element<DT>(reinterpret_cast<char*>(body + nv), tid, op);
}

// walk_span for the chunk's dtype; an unreadable chunk is not visited.
template <int THREADS, int UNROLL, class Op>
__device__ __forceinline__ void walk_chunk(const Chunk& ch, Op& op) {
  switch (ch.dtype) {
    case abi::DTYPE_F32: walk_span<abi::DTYPE_F32, THREADS, UNROLL>(ch.base, ch.n, op); break;
    case abi::DTYPE_F16: walk_span<abi::DTYPE_F16, THREADS, UNROLL>(ch.base, ch.n, op); break;
    case abi::DTYPE_BF16: walk_span<abi::DTYPE_BF16, THREADS, UNROLL>(ch.base, ch.n, op); break;
    default: break;
  }
}

}  // namespace gradfuse::cuda
