// CPU kernels for the one-token decode step (kaggletrain/infer/fast.py), float32, AVX2 + FMA:
//   kt_wkv7_step: one RWKV-7 recurrent WKV step, one pass over the state;
//   kt_linear:    y = x W^T (+ bias) (+ add) for a few rows x, the weight streamed once.
// Built and loaded by kaggletrain/infer/cpu_kernel.py; checked against float64 in tests/test_cpu_kernel.py.
//
// kt_wkv7_step
// Per head h and value row i of the state S [N x N] (spec section 1, RNN form, with a_in = -kk):
//   sa_i   = -(S_i . kk)
//   S'_i   = S_i * d + sa_i * b + v_i * k        (d: decay, elementwise over the key index j)
//   y_i    = S'_i . r
// PyTorch needs four passes over S (two products, a multiply, a batched matmul-add) plus temporaries;
// at batch 8 on a 0.1B model the state is 18 MB and cold in cache after each layer's weights, so one
// read and one write per element is what matters.
//
// kt_linear: a decode step multiplies a few activation rows by each weight once, so the weight streams
// from memory. Each tile keeps R weight rows x BT batch rows of 8-lane accumulators (8 or 12 ymm
// registers: enough independent FMA chains to hide latency, few enough for the loads), and reads its
// weight rows front to back. On the benchmark VM this beats oneDNN and MKL for every product of the
// decode step at batch 1 and batch 8, and the small LoRA products by 2-3x (kaggletrain/infer/cpu_linear.py).
#include <immintrin.h>
#include <cstdint>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// Rows o0 .. o0+R-1 of W [O, I] against batch rows x[0 .. BT-1] (row stride I); y, add: [*, O].
// PREFETCH: also pull in the next block's rows, one cache line per row every other step. At batch 8 the
// hardware prefetcher alone leaves the FMAs waiting (3072 x 768 took 0.94-0.98 ms without, 0.70-0.95
// with, oneDNN 0.76-1.05 in the same runs); at batch 1 it does better alone.
template <int R, int BT, bool PREFETCH = false>
static inline void linear_tile(const float* __restrict W, const float* __restrict x, const float* bias,
                               const float* add, float* __restrict y, int64_t o0, int64_t O, int64_t I) {
    __m256 acc[R][BT];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_ps();
    const int64_t ahead = o0 + 2 * R <= O ? R : 0;  // no prefetch past the last row
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        __m256 w[R];
        for (int r = 0; r < R; ++r) w[r] = _mm256_loadu_ps(W + (o0 + r) * I + i);
        if (PREFETCH && ahead && (i & 15) == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(W + (o0 + ahead + r) * I + i), _MM_HINT_T0);
        for (int b = 0; b < BT; ++b) {
            const __m256 xv = _mm256_loadu_ps(x + b * I + i);
            for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(w[r], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < BT; ++b) {
            float s = hsum(acc[r][b]);
            for (int64_t j = i; j < I; ++j) s += W[(o0 + r) * I + j] * x[b * I + j];
            if (bias) s += bias[o0 + r];
            if (add) s += add[b * O + o0 + r];
            y[b * O + o0 + r] = s;
        }
}

// All rows of W against BT batch rows: blocks of R rows in parallel, the last O % R rows one at a time.
template <int R, int BT>
static void linear_rows(const float* W, const float* x, const float* bias, const float* add, float* y,
                        int64_t O, int64_t I) {
    const int64_t blocks = O / R;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) linear_tile<R, BT>(W, x, bias, add, y, blk * R, O, I);
    for (int64_t o = blocks * R; o < O; ++o) linear_tile<1, BT>(W, x, bias, add, y, o, O, I);
}

// Eight batch rows: per block of 3 weight rows, two 3 x 4 tiles (the second rereads the rows from L1).
// Against one 1 x 8 tile this halves the loads per FMA; 12 accumulators + 3 weights + 1 input = 16 ymm.
// Both tiles prefetch the next block (the second pass's prefetches measured faster than none there).
static void linear_rows8(const float* W, const float* x, const float* bias, const float* add, float* y,
                         int64_t O, int64_t I) {
    const int64_t blocks = O / 3;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        linear_tile<3, 4, true>(W, x, bias, add, y, blk * 3, O, I);
        linear_tile<3, 4, true>(W, x + 4 * I, bias, add ? add + 4 * O : add, y + 4 * O, blk * 3, O, I);
    }
    for (int64_t o = blocks * 3; o < O; ++o) linear_tile<1, 8>(W, x, bias, add, y, o, O, I);
}

extern "C" {

// Version of the C interface below; the loader refuses a library that reports another.
int kt_decode_abi(void) { return 2; }

// y [B, O] = x [B, I] W [O, I]^T (+ bias [O]) (+ add [B, O]); contiguous float32; bias/add may be null;
// y must not overlap x or W (it may be add). Batch rows in tiles of 8, 4, 2, 1.
void kt_linear(const float* W, const float* x, const float* bias, const float* add, float* y,
               int64_t O, int64_t I, int64_t B) {
    int64_t b = 0;
    for (; b + 8 <= B; b += 8) linear_rows8(W, x + b * I, bias, add ? add + b * O : add, y + b * O, O, I);
    if (b + 4 <= B) { linear_rows<2, 4>(W, x + b * I, bias, add ? add + b * O : add, y + b * O, O, I); b += 4; }
    if (b + 2 <= B) { linear_rows<4, 2>(W, x + b * I, bias, add ? add + b * O : add, y + b * O, O, I); b += 2; }
    if (b < B) linear_rows<8, 1>(W, x + b * I, bias, add ? add + b * O : add, y + b * O, O, I);
}

// S, S_out: [BH, N, N]; d, kk, b, k, r, v, y: [BH, N]; all contiguous float32, N % 8 == 0.
// S_out may equal S (in place). Parallel over heads with the process's OpenMP runtime (torch's).
void kt_wkv7_step(const float* S, float* S_out, const float* d, const float* kk, const float* b,
                  const float* k, const float* r, const float* v, float* y, int64_t BH, int64_t N) {
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < BH; ++h) {
        const float *dh = d + h * N, *kkh = kk + h * N, *bh = b + h * N, *kh = k + h * N, *rh = r + h * N;
        for (int64_t i = 0; i < N; ++i) {
            const float* Si = S + (h * N + i) * N;
            float* Oi = S_out + (h * N + i) * N;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < N; j += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(Si + j), _mm256_loadu_ps(kkh + j), acc);
            const __m256 sa = _mm256_set1_ps(-hsum(acc));
            const __m256 vi = _mm256_set1_ps(v[h * N + i]);
            __m256 yacc = _mm256_setzero_ps();
            for (int64_t j = 0; j < N; j += 8) {
                __m256 s = _mm256_mul_ps(_mm256_loadu_ps(Si + j), _mm256_loadu_ps(dh + j));
                s = _mm256_fmadd_ps(sa, _mm256_loadu_ps(bh + j), s);
                s = _mm256_fmadd_ps(vi, _mm256_loadu_ps(kh + j), s);
                _mm256_storeu_ps(Oi + j, s);
                yacc = _mm256_fmadd_ps(s, _mm256_loadu_ps(rh + j), yacc);
            }
            y[h * N + i] = hsum(yacc);
        }
    }
}

}  // extern "C"
