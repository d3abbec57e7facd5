// WKV-7 kernels: launchers and instantiations. Compiles standalone (no torch headers):
//   nvcc -c -arch=sm_75 wkv7.cu                          (fp32 + fp16; the chunk backward on CUDA cores)
//   nvcc -c -arch=sm_90 -DWKV7_WITH_BF16=1 wkv7.cu       (fp32 + fp16 + bf16; the chunk backward and the chunk
//                                                         forward on tensor cores)
// and on the CPU with -x c++ -DWKV7_EMU (cuda_emu.h) for the emulated tests.
// bf16 is only instantiated when WKV7_WITH_BF16 is set, which the loader does for sm_80 and newer only.
#ifdef WKV7_EMU
#include "cuda_emu.h"
#ifndef WKV7_WITH_BF16
#define WKV7_WITH_BF16 1
#endif
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#if WKV7_WITH_BF16
#include <cuda_bf16.h>
#endif
#define WKV7_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <cstdlib>
#include <cstring>

#include "wkv7_api.h"
#include "wkv7_kernels.cuh"
#include "wkv7_chunk.cuh"
#include "wkv7_scan.cuh"

namespace wkv7 {

static_assert(detail::kChunk == kCkptLen, "checkpoint length mismatch");

namespace {

constexpr int kHead = 64;  // the head size instantiated (RWKV-7's; see spec "head size")
#ifndef WKV7_FWD_ROWS
#define WKV7_FWD_ROWS 2  // 4 also works (2 warps per head): 1.83 ms vs 1.79 ms bf16 fwd on an H200
#endif
constexpr int kFwdRows = WKV7_FWD_ROWS;  // forward: value rows per thread (a 2 x 16 register tile of S)
constexpr int kTpr = 4;    // lanes sharing a row/column: 16 keys (rows) each at N=64
constexpr int kSub = 4;    // backward: exact state every 4 tokens, at most 3 backsteps
#ifndef WKV7_SUB_NEW
#define WKV7_SUB_NEW 8
#endif
constexpr int kSubNew = WKV7_SUB_NEW;  // new backward: exact state every kSubNew tokens
constexpr int kSegChunks = kBwdSegChunks;  // new backward: chunks per bwd_cols_kernel block (and dS checkpoint)

// Rows per thread of the split kernels: RS=1 keeps the 128-thread tiling (kFwdRows rows in the forward, 2 in
// the backward row kernel); with RS=2 or 4 a thread holds ONE row (a 1 x 16 tile: 128 threads at RS=2, 64 at
// RS=4), so the block still has >= 2 warps and the chunk prefetch arrays stay at 2 or 4 float4 per input.
// The per-row arithmetic (tile rows are independent; the key slices, TPR and the sum order are unchanged)
// is the same, which keeps every split bitwise equal.
constexpr int split_rows(int RS, int rows1) { return RS == 1 ? rows1 : 1; }

template <typename T, int RS>
int forward_rs(const FwdArgs& p, cudaStream_t stream) {
  constexpr int R = split_rows(RS, kFwdRows);
  auto kernel = detail::fwd_kernel<T, kHead, R, kTpr, RS>;
  const dim3 grid((unsigned)((long long)p.B * p.H * RS));
  const dim3 block((kHead / RS / R) * kTpr);
  WKV7_LAUNCH(kernel, grid, block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w, p.w_f32,
              static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<const T*>(p.a),
              static_cast<const T*>(p.b), p.s0, static_cast<T*>(p.y), p.sT, p.ckpt, p.sa);
  return (int)cudaGetLastError();
}

// The chunked tensor-core scans (wkv7_scan.cuh: the forward and the backward's dS recursion) need TF32 (sm_80+):
// built where bf16 is (the loader sets WKV7_WITH_BF16 for sm_80 and newer) unless WKV7_CHUNK_TC=0 asks for CUDA
// cores only.
#if WKV7_WITH_BF16 && WKV7_CHUNK_TC
constexpr bool kHaveScan = true;
#else
constexpr bool kHaveScan = false;
#endif

template <typename T>
detail::ScanIO<T> scan_io(int T_len, int H, const void* r, const void* w, bool w_f32, const void* k, const void* a,
                          const void* b, const void* vin, const float* s_in, void* out, float* s_out, float* ck,
                          float* sub) {
  detail::ScanIO<T> io;
  io.T_len = T_len; io.H = H;
  io.r = static_cast<const T*>(r); io.k = static_cast<const T*>(k); io.a = static_cast<const T*>(a);
  io.b = static_cast<const T*>(b); io.vin = static_cast<const T*>(vin);
  io.w = w; io.w_f32 = w_f32;
  io.s_in = s_in; io.out = static_cast<T*>(out); io.s_out = s_out; io.ck = ck; io.sub = sub;
  return io;
}

template <typename T>
int forward_chunk_t(const FwdArgs& p, cudaStream_t stream) {
  const detail::ScanIO<T> io = scan_io<T>(p.T, p.H, p.r, p.w, p.w_f32, p.k, p.a, p.b, p.v, p.s0, p.y, p.sT, p.ckpt, p.sa);
  auto kernel = detail::fwd_chunk_kernel<T, kHead>;
  WKV7_LAUNCH(kernel, dim3((unsigned)((long long)p.B * p.H)), dim3(detail::kScanThreads), 0, stream, io);
  return (int)cudaGetLastError();
}

template <typename T>
int forward_t(const FwdArgs& p, cudaStream_t stream) {
  if constexpr (kHaveScan) {  // not instantiated at all where it cannot run (the sm_75 build)
    if (resolve_fwd_variant(p.variant) == kFwdChunk) return forward_chunk_t<T>(p, stream);
  }
  switch (resolve_split(p.split, (long long)p.B * p.H)) {
    case 2: return forward_rs<T, 2>(p, stream);
    case 4: return forward_rs<T, 4>(p, stream);
    default: return forward_rs<T, 1>(p, stream);
  }
}

template <typename T>
int backward_old_t(const BwdArgs& p, cudaStream_t stream) {
  auto kernel = detail::bwd_kernel<T, kHead, kTpr, kSub>;
  const dim3 grid((unsigned)((long long)p.B * p.H));
  const dim3 block((kHead / 2) * kTpr);
  WKV7_LAUNCH(kernel, grid, block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w, p.w_f32,
              static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<const T*>(p.a),
              static_cast<const T*>(p.b), static_cast<const T*>(p.dy), p.dsT, p.ckpt, p.sa, p.scratch,
              static_cast<T*>(p.dr), p.dw, static_cast<T*>(p.dk), static_cast<T*>(p.dv), static_cast<T*>(p.da),
              static_cast<T*>(p.db), p.ds0);
  return (int)cudaGetLastError();
}

// The sequential dS row recursion, with a dS checkpoint every CPB chunks.
template <typename T, int CPB, int RS>
int backward_rows_rs(const BwdArgs& p, float* dsa, float* dsck, cudaStream_t stream) {
  constexpr int C = split_rows(RS, 2);
  auto rows = detail::bwd_rows_kernel<T, kHead, kTpr, CPB, C, RS>;
  const dim3 grid((unsigned)((long long)p.B * p.H * RS));
  const dim3 block((kHead / RS / C) * kTpr);
  WKV7_LAUNCH(rows, grid, block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w, p.w_f32,
              static_cast<const T*>(p.k), static_cast<const T*>(p.a), static_cast<const T*>(p.b),
              static_cast<const T*>(p.dy), p.dsT, dsa, static_cast<T*>(p.dv), dsck, p.ds0);
  return (int)cudaGetLastError();
}

// The backward scratch (bwd_scratch_floats): dsa [B,T,H,N] float32, then nCk dS checkpoints per head
// [B*H, nCk, N, N], then (fused backward only) its sync ints.
struct Scratch {
  float* dsa;
  float* dsck;
  int* sync;
  Scratch(const BwdArgs& p, long long nCk)
      : dsa(p.scratch), dsck(dsa + (long long)p.B * p.T * p.H * p.N),
        sync(reinterpret_cast<int*>(dsck + (long long)p.B * p.H * nCk * p.N * p.N)) {}
};

// Two kernels: the sequential dS row recursion (B*H*split blocks), then the column sums parallel over
// segments of kSegChunks chunks (B*H*nSeg blocks). Scratch: dsa [B,T,H,N], then the dS checkpoints [B*H, nSeg, N, N].
template <typename T>
int backward_new_t(const BwdArgs& p, cudaStream_t stream) {
  const long long BH = (long long)p.B * p.H;
  const int nC = (p.T + kCkptLen - 1) / kCkptLen;
  const int nSeg = (nC + kSegChunks - 1) / kSegChunks;
  const Scratch sc(p, nSeg);
  int err;
  switch (resolve_split(p.split, BH)) {
    case 2: err = backward_rows_rs<T, kSegChunks, 2>(p, sc.dsa, sc.dsck, stream); break;
    case 4: err = backward_rows_rs<T, kSegChunks, 4>(p, sc.dsa, sc.dsck, stream); break;
    default: err = backward_rows_rs<T, kSegChunks, 1>(p, sc.dsa, sc.dsck, stream); break;
  }
  if (err || nSeg == 0) return err;
  const dim3 block((kHead / 2) * kTpr);
  auto cols = detail::bwd_cols_kernel<T, kHead, kTpr, kSubNew, kSegChunks>;
  WKV7_LAUNCH(cols, dim3((unsigned)(BH * nSeg)), block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w,
              p.w_f32, static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<const T*>(p.a),
              static_cast<const T*>(p.b), static_cast<const T*>(p.dy), p.ckpt, p.sa, sc.dsa, sc.dsck,
              static_cast<T*>(p.dr), p.dw, static_cast<T*>(p.dk), static_cast<T*>(p.da), static_cast<T*>(p.db));
  return (int)cudaGetLastError();
}

template <typename T>
detail::ChunkIO<T> chunk_io(const BwdArgs& p, const float* dsa, const float* dsck) {
  detail::ChunkIO<T> io;
  io.T_len = p.T; io.H = p.H;
  io.r = static_cast<const T*>(p.r); io.k = static_cast<const T*>(p.k); io.v = static_cast<const T*>(p.v);
  io.a = static_cast<const T*>(p.a); io.b = static_cast<const T*>(p.b); io.dy = static_cast<const T*>(p.dy);
  io.w = p.w; io.w_f32 = p.w_f32;
  io.ckpt = p.ckpt; io.sa = p.sa; io.dsa = dsa; io.dsck = dsck;
  io.dr = static_cast<T*>(p.dr); io.dk = static_cast<T*>(p.dk); io.da = static_cast<T*>(p.da); io.db = static_cast<T*>(p.db);
  io.dw = p.dw;
  return io;
}

// One block per (head, chunk) forming dr, dw, dk, da, db from dense products (bwd_chunk_kernel), after a row
// recursion wrote dsa and a dS checkpoint per chunk into the scratch.
template <typename T>
int launch_chunk_blocks(const BwdArgs& p, const Scratch& sc, long long BH, int nC, cudaStream_t stream) {
  const detail::ChunkIO<T> io = chunk_io<T>(p, sc.dsa, sc.dsck);
  auto chunk = detail::bwd_chunk_kernel<T, kHead>;
  WKV7_LAUNCH(chunk, dim3((unsigned)(BH * nC)), dim3(detail::kChunkThreads), 0, stream, io);
  return (int)cudaGetLastError();
}

// Chunk-parallel columns: the row recursion (one block per head) with a dS checkpoint at every chunk end,
// then one block per (head, chunk) forms dr, dw, dk, da, db from dense products (bwd_chunk_kernel). Scratch:
// dsa [B,T,H,N], then the dS checkpoints [B*H, nC, N, N] (4x the new backward's: 16 KB per head and chunk).
template <typename T>
int backward_chunk_t(const BwdArgs& p, cudaStream_t stream) {
  const long long BH = (long long)p.B * p.H;
  const int nC = (p.T + kCkptLen - 1) / kCkptLen;
  const Scratch sc(p, nC);
  const int err = backward_rows_rs<T, 1, 1>(p, sc.dsa, sc.dsck, stream);  // no row split: it measured slower
  if (err || nC == 0) return err;
  return launch_chunk_blocks<T>(p, sc, BH, nC, stream);
}

// kBwdChunk with the dS recursion in chunks too (bwd_scan_kernel: dense products on tensor cores, per head), then
// the same chunk blocks. Scratch as kBwdChunk.
template <typename T>
int backward_scan_t(const BwdArgs& p, cudaStream_t stream) {
  const long long BH = (long long)p.B * p.H;
  const int nC = (p.T + kCkptLen - 1) / kCkptLen;
  const Scratch sc(p, nC);
  const detail::ScanIO<T> sio = scan_io<T>(p.T, p.H, p.r, p.w, p.w_f32, p.k, p.a, p.b, p.dy, p.dsT, p.dv, p.ds0,
                                           sc.dsck, sc.dsa);
  auto scan = detail::bwd_scan_kernel<T, kHead>;
  WKV7_LAUNCH(scan, dim3((unsigned)BH), dim3(detail::kScanThreads), 0, stream, sio);
  if (int err = (int)cudaGetLastError()) return err;
  return nC == 0 ? 0 : launch_chunk_blocks<T>(p, sc, BH, nC, stream);
}

// kBwdChunk's two kernels as one launch (bwd_fused_kernel): B*H row-recursion blocks, then B*H*nC chunk blocks
// that each wait for their chunk's flag. Scratch: as kBwdChunk, then 2 + B*H*nC ints (zeroed here).
template <typename T>
int backward_fused_t(const BwdArgs& p, cudaStream_t stream) {
  const long long BH = (long long)p.B * p.H;
  const int nC = (p.T + kCkptLen - 1) / kCkptLen;
  if (nC == 0) return backward_chunk_t<T>(p, stream);  // T = 0: only ds0 = dsT, which the row kernel writes
  const Scratch sc(p, nC);
  if (int err = (int)cudaMemsetAsync(sc.sync, 0, (size_t)(2 + BH * nC) * sizeof(int), stream)) return err;
  const detail::ChunkIO<T> io = chunk_io<T>(p, sc.dsa, sc.dsck);
  auto fused = detail::bwd_fused_kernel<T, kHead, kTpr>;
  WKV7_LAUNCH(fused, dim3((unsigned)(BH * (nC + 1))), dim3(detail::kChunkThreads), 0, stream, io, p.dsT,
              static_cast<T*>(p.dv), p.ds0, sc.dsa, sc.dsck, sc.sync);
  return (int)cudaGetLastError();
}

template <typename T>
int backward_t(const BwdArgs& p, cudaStream_t stream) {
  if (p.variant == kBwdOld) return backward_old_t<T>(p, stream);
  if (p.variant == kBwdChunk) return backward_chunk_t<T>(p, stream);
  if (p.variant == kBwdFused) return backward_fused_t<T>(p, stream);
  if constexpr (kHaveScan) {
    if (p.variant == kBwdScan) return backward_scan_t<T>(p, stream);
  }
  return backward_new_t<T>(p, stream);
}

bool shape_ok(int B, int T, int H, int N) { return B > 0 && T >= 0 && H > 0 && N == kHead; }

}  // namespace

long long bwd_scratch_floats(int B, int T, int H, int N, int variant) {
  variant = resolve_bwd_variant(variant);
  if (variant == kBwdOld) return (long long)B * H * (kCkptLen / kSub - 1) * N * N;
  const long long nC = (T + kCkptLen - 1) / kCkptLen;
  const bool every_chunk = variant == kBwdChunk || variant == kBwdFused || variant == kBwdScan;
  const long long nSeg = every_chunk ? nC : (nC + kSegChunks - 1) / kSegChunks;
  const long long sync_ints = variant == kBwdFused ? 2 + (long long)B * H * nC : 0;  // int and float: 4 bytes
  return (long long)B * T * H * N + (long long)B * H * nSeg * N * N + sync_ints;
}

int resolve_fwd_variant(int variant) {
  if (variant != kFwdSeq && variant != kFwdChunk) {
    const char* env = std::getenv("KAGGLETRAIN_WKV_FWD");
    variant = env && std::strcmp(env, "chunk") == 0 ? kFwdChunk
              : env && std::strcmp(env, "seq") == 0 ? kFwdSeq
                                                    : kFwdDefault;
  }
  return variant == kFwdChunk && !kHaveScan ? kFwdSeq : variant;
}

int resolve_bwd_variant(int variant) {
  if (variant != kBwdOld && variant != kBwdNew && variant != kBwdChunk && variant != kBwdFused && variant != kBwdScan) {
    const char* env = std::getenv("KAGGLETRAIN_WKV_BWD");
    variant = kBwdDefault;
    if (env && std::strcmp(env, "old") == 0) variant = kBwdOld;
    if (env && std::strcmp(env, "new") == 0) variant = kBwdNew;
    if (env && std::strcmp(env, "chunk") == 0) variant = kBwdChunk;
    if (env && std::strcmp(env, "fused") == 0) variant = kBwdFused;
    if (env && std::strcmp(env, "scan") == 0) variant = kBwdScan;
  }
  return variant == kBwdScan && !kHaveScan ? kBwdChunk : variant;  // the same scratch either way
}

// SMs of the current device, queried once per device (the emulator has no device: it assumes an H100/H200).
static int sm_count() {
#ifdef WKV7_EMU
  return 132;
#else
  static int cached[64] = {};  // 0: not queried yet (a racing second query is harmless)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // do not leave the error for the launch check to find
      n = 132;
    }
    cached[dev] = n;
  }
  return cached[dev];
#endif
}

int resolve_split(int split, long long BH) {
  if (split == 1 || split == 2 || split == 4) return split;
  const char* env = std::getenv("KAGGLETRAIN_WKV_SPLIT");
  if (env && (std::strcmp(env, "1") == 0 || std::strcmp(env, "2") == 0 || std::strcmp(env, "4") == 0))
    return env[0] - '0';
  if (!env || std::strcmp(env, "auto") != 0) return kSplitDefault;
  // auto: at least two blocks per SM when that takes at most 4 blocks per head (below that, a head's rows
  // are the only parallelism left; above it, more blocks only add staging work).
  const long long want = 2LL * sm_count();
  int rs = 1;
  while (rs < kMaxSplit && BH * rs < want) rs *= 2;
  return rs;
}

bool supported(int N, int dtype) {
  if (N != kHead) return false;
  if (dtype == kF32 || dtype == kF16) return true;
#if WKV7_WITH_BF16
  if (dtype == kBF16) return true;
#endif
  return false;
}

int forward(const FwdArgs& p, cudaStream_t stream) {
  if (!shape_ok(p.B, p.T, p.H, p.N) || !supported(p.N, p.dtype)) return (int)cudaErrorInvalidValue;
  if ((p.ckpt == nullptr) != (p.sa == nullptr)) return (int)cudaErrorInvalidValue;
  switch (p.dtype) {
    case kF32: return forward_t<float>(p, stream);
    case kF16: return forward_t<__half>(p, stream);
#if WKV7_WITH_BF16
    case kBF16: return forward_t<__nv_bfloat16>(p, stream);
#endif
    default: return (int)cudaErrorInvalidValue;
  }
}

int backward(const BwdArgs& p, cudaStream_t stream) {
  if (!shape_ok(p.B, p.T, p.H, p.N) || !supported(p.N, p.dtype)) return (int)cudaErrorInvalidValue;
  if (!p.ckpt || !p.sa || !p.scratch || !p.dy) return (int)cudaErrorInvalidValue;
  BwdArgs q = p;
  q.variant = resolve_bwd_variant(p.variant);  // must match the bwd_scratch_floats call that sized scratch
  q.split = resolve_split(p.split, (long long)p.B * p.H);  // scratch does not depend on it
  switch (q.dtype) {
    case kF32: return backward_t<float>(q, stream);
    case kF16: return backward_t<__half>(q, stream);
#if WKV7_WITH_BF16
    case kBF16: return backward_t<__nv_bfloat16>(q, stream);
#endif
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace wkv7
