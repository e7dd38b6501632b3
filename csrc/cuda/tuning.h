// Launch shape of the CUDA kernels, shared by the device code and the host driver (plain C++).
//
// Measured on an H200; the figures, the alternatives tried and why these won are in
// benchmarks/NOTES.md ("CUDA backend"). In short: 512 threads x 2 blocks per SM x 4 independent
// 16-byte loads per thread keep ~64 KB in flight per SM, ~2.8x what Little's law asks at ~4.3 TB/s
// and ~700 ns, and __launch_bounds__(512, 2) caps registers at 64 per thread (no spills; see the
// -Xptxas -v table there). Each can be overridden at build time (-DGRADFUSE_REDUCE_THREADS=...) for
// tuning sweeps.
#pragma once

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

namespace gradfuse::cuda {

constexpr int kReduceThreads = GRADFUSE_REDUCE_THREADS;            // threads per reduce block
constexpr int kReduceBlocksPerSM = GRADFUSE_REDUCE_BLOCKS_PER_SM;  // persistent grid = SMs * this
constexpr int kReduceUnroll = GRADFUSE_REDUCE_UNROLL;              // 16-byte loads in flight per thread
constexpr int kScaleThreads = GRADFUSE_SCALE_THREADS;
constexpr int kScaleBlocksPerSM = GRADFUSE_SCALE_BLOCKS_PER_SM;
constexpr int kScaleUnroll = GRADFUSE_SCALE_UNROLL;

// Finalize (the reduce's last block): a tensor of at most kFinalizeSmallChunks chunks is combined by
// one thread (kReduceThreads tensors at once), a larger one by a warp; kFinalizeUnroll partials are
// loaded before they are combined, to keep L2 reads in flight.
constexpr int kFinalizeSmallChunks = 32;
constexpr int kFinalizeUnroll = 8;

// In-chunk indices are int32 (with the unroll's slack); tensor offsets are int64.
constexpr long long kMaxChunkSize = 1LL << 30;

constexpr int kWarpSize = 32;

static_assert(kReduceThreads % kWarpSize == 0 && kReduceThreads <= 1024, "bad kReduceThreads");
static_assert(kReduceThreads / kWarpSize <= kWarpSize, "a block reduction combines the warp results in one warp");
static_assert(kScaleThreads % kWarpSize == 0 && kScaleThreads <= 1024, "bad kScaleThreads");
static_assert(kReduceThreads >= 16 && kScaleThreads >= 16, "heads and tails need up to 7 threads");
static_assert(kReduceUnroll >= 1 && kScaleUnroll >= 1 && kFinalizeUnroll >= 1, "bad unroll");

}  // namespace gradfuse::cuda
