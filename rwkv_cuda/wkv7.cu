// WKV-7 kernels: launchers and instantiations. Compiles standalone (no torch headers):
//   nvcc -c -arch=sm_75 wkv7.cu                          (fp32 + fp16)
//   nvcc -c -arch=sm_90 -DWKV7_WITH_BF16=1 wkv7.cu       (fp32 + fp16 + bf16)
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
#if WKV7_WITH_BF16
#include <cuda_bf16.h>
#endif
#define WKV7_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <cstdlib>
#include <cstring>

#include "wkv7_api.h"
#include "wkv7_kernels.cuh"

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

template <typename T>
int forward_t(const FwdArgs& p, cudaStream_t stream) {
  auto kernel = detail::fwd_kernel<T, kHead, kFwdRows, kTpr>;
  const dim3 grid((unsigned)((long long)p.B * p.H));
  const dim3 block((kHead / kFwdRows) * kTpr);
  WKV7_LAUNCH(kernel, grid, block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w, p.w_f32,
              static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<const T*>(p.a),
              static_cast<const T*>(p.b), p.s0, static_cast<T*>(p.y), p.sT, p.ckpt, p.sa);
  return (int)cudaGetLastError();
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

// Two kernels: the sequential dS row recursion (B*H blocks), then the column sums parallel over segments of
// kSegChunks chunks (B*H*nSeg blocks). Scratch: dsa [B,T,H,N], then the dS checkpoints [B*H, nSeg, N, N].
template <typename T>
int backward_new_t(const BwdArgs& p, cudaStream_t stream) {
  const long long BH = (long long)p.B * p.H;
  const int nC = (p.T + kCkptLen - 1) / kCkptLen;
  const int nSeg = (nC + kSegChunks - 1) / kSegChunks;
  float* dsa = p.scratch;
  float* dsck = p.scratch + (long long)p.B * p.T * p.H * p.N;
  const dim3 block((kHead / 2) * kTpr);
  auto rows = detail::bwd_rows_kernel<T, kHead, kTpr, kSegChunks>;
  WKV7_LAUNCH(rows, dim3((unsigned)BH), block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w, p.w_f32,
              static_cast<const T*>(p.k), static_cast<const T*>(p.a), static_cast<const T*>(p.b),
              static_cast<const T*>(p.dy), p.dsT, dsa, static_cast<T*>(p.dv), dsck, p.ds0);
  int err = (int)cudaGetLastError();
  if (err || nSeg == 0) return err;
  auto cols = detail::bwd_cols_kernel<T, kHead, kTpr, kSubNew, kSegChunks>;
  WKV7_LAUNCH(cols, dim3((unsigned)(BH * nSeg)), block, 0, stream, p.T, p.H, static_cast<const T*>(p.r), p.w,
              p.w_f32, static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<const T*>(p.a),
              static_cast<const T*>(p.b), static_cast<const T*>(p.dy), p.ckpt, p.sa, dsa, dsck,
              static_cast<T*>(p.dr), p.dw, static_cast<T*>(p.dk), static_cast<T*>(p.da), static_cast<T*>(p.db));
  return (int)cudaGetLastError();
}

template <typename T>
int backward_t(const BwdArgs& p, cudaStream_t stream) {
  return p.variant == kBwdOld ? backward_old_t<T>(p, stream) : backward_new_t<T>(p, stream);
}

bool shape_ok(int B, int T, int H, int N) { return B > 0 && T >= 0 && H > 0 && N == kHead; }

}  // namespace

long long bwd_scratch_floats(int B, int T, int H, int N, int variant) {
  variant = resolve_bwd_variant(variant);
  if (variant == kBwdOld) return (long long)B * H * (kCkptLen / kSub - 1) * N * N;
  const long long nC = (T + kCkptLen - 1) / kCkptLen, nSeg = (nC + kSegChunks - 1) / kSegChunks;
  return (long long)B * T * H * N + (long long)B * H * nSeg * N * N;
}

int resolve_bwd_variant(int variant) {
  if (variant == kBwdOld || variant == kBwdNew) return variant;
  const char* env = std::getenv("KAGGLETRAIN_WKV_BWD");
  if (env && std::strcmp(env, "old") == 0) return kBwdOld;
  if (env && std::strcmp(env, "new") == 0) return kBwdNew;
  return kBwdDefault;
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
