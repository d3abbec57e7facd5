// One RWKV-7 recurrent WKV step on a CPU (decoding), float32, AVX2 + FMA, one pass over the state.
//
// Per head h and value row i of the state S [N x N] (spec section 1, RNN form, with a_in = -kk):
//   sa_i   = -(S_i . kk)
//   S'_i   = S_i * d + sa_i * b + v_i * k        (d: decay, elementwise over the key index j)
//   y_i    = S'_i . r
// PyTorch needs four passes over S (two products, a multiply, a batched matmul-add) plus temporaries;
// at batch 8 on a 0.1B model the state is 18 MB and cold in cache after each layer's weights, so one
// read and one write per element is what matters. Built and loaded by kaggletrain/infer/cpu_kernel.py;
// checked against the float64 reference in tests/test_cpu_kernel.py.
#include <immintrin.h>
#include <cstdint>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

extern "C" {

// Version of the C interface below; the loader refuses a library that reports another.
int kt_wkv7_step_abi(void) { return 1; }

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
