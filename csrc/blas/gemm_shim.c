/* torch_mlx's BLAS shim for MLX's Linux CPU backend: the code it runs itself. torch_mlx/blas.py
 * says why the shim exists and how it is loaded; csrc/blas/build_shims.py how setup.py builds it
 * (with a tail jump to scipy-openblas32's prefixed function for every other BLAS/LAPACK function
 * libmlx imports, generated at build time).
 *
 * MLX's CPU matmul calls cblas_sgemm for every float product, including matrix-vector ones (a
 * decode step's x @ W.T has M = 1). OpenBLAS runs those through its packed GEMM path on this
 * machine's kernels (0.3.21 and 0.3.34 alike): 5x slower than its GEMV (a 1x1536 @ 1536x4096
 * product: 7.8 ms vs 1.5 ms), so the shim's cblas_sgemm takes x @ W.T with up to 12 rows of x
 * (decode steps of up to 12 sequences) to its own kernel below, forwards the other M == 1 /
 * N == 1 products to cblas_sgemv, and everything else to cblas_sgemm. */
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *,
                       int, float, float *, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float *, int, const float *, int, float,
                       float *, int);
void scipy_openblas_set_num_threads(int);
/* torch_mlx's own kernel for products with few rows: Y = alpha * X W^T + beta * Y for X [M, K]
 * with M <= 12 (a decode step's x @ W.T for M sequences) and a row-major W [N, K] whose rows are
 * contiguous. Threads read chunks of W's rows as sequential streams and take each W row once
 * from memory for all M rows of X (4x4 blocks of dot products share each load of W and X).
 * OpenBLAS's sgemv interleaves rows and stays well below the memory bandwidth on these machines,
 * and its GEMM packs W for small M: 3.4-3.6 ms for M = 2..8 against 1.2-2.2 here (8192x1536 W).
 * Past M = 12 X no longer stays in L1 and OpenBLAS's packed GEMM is as fast or faster. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { const float *W; const float *x; float *y; long N, K, ld, chunk, M, ldx, ldy;
                 float alpha, beta; unsigned long id; } tmx_job;
/* The current job, written by the calling thread under a sequence lock (odd while written). Rows
 * are claimed through tmx_claim = job id << 32 | next row, so a worker that wakes late, after
 * its job is done, cannot claim rows of a later job with the earlier job's pointers. */
static tmx_job tmx_current;
static atomic_uint tmx_seq;
static atomic_ulong tmx_claim;
static atomic_long tmx_done;
static atomic_int tmx_generation, tmx_sleeping;
static int tmx_threads = 1, tmx_started;
static pthread_mutex_t tmx_lock = PTHREAD_MUTEX_INITIALIZER;

static inline void tmx_store(const tmx_job *j, long m, long r, float s) {
  float *y = j->y + m * j->ldy + r, out = j->alpha * s;
  *y = j->beta == 0.0f ? out : out + j->beta * *y;
}

/* Row m of X against rows [r0, r1) of W, four accumulators. */
__attribute__((target("avx512f"))) static void tmx_rows1(const tmx_job *j, long r0, long r1,
                                                        long m) {
  const float *x = j->x + m * j->ldx;
  for (long r = r0; r < r1; r++) {
    const float *w = j->W + r * j->ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 64 <= j->K; k += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k + 16 <= j->K; k += 16)
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < j->K; k++) s += w[k] * x[k];
    tmx_store(j, m, r, s);
  }
}

/* Rows r..r+nr-1 of W against rows m..m+nm-1 of X (nr, nm <= 4): up to sixteen dot products,
 * each load of W or X feeding four of them (X stays in cache while W streams). Short blocks
 * repeat their last row (a cached reload) and store only their own results. */
__attribute__((target("avx512f"))) static void tmx_block4x4(const tmx_job *j, long r, long nr,
                                                           long m, long nm) {
  const float *w0 = j->W + r * j->ld, *w1 = w0 + (nr > 1) * j->ld, *w2 = w0 + (nr > 2) * 2 * j->ld,
              *w3 = w0 + (nr > 3) * 3 * j->ld;
  const float *x0 = j->x + m * j->ldx, *x1 = x0 + (nm > 1) * j->ldx,
              *x2 = x0 + (nm > 2) * 2 * j->ldx, *x3 = x0 + (nm > 3) * 3 * j->ldx;
  __m512 c[16];
  for (int i = 0; i < 16; i++) c[i] = _mm512_setzero_ps();
  for (long k = 0; k < j->K; k += 16) {
    __mmask16 mask = j->K - k >= 16 ? 0xffff : (__mmask16)((1u << (j->K - k)) - 1);
    __m512 a0 = _mm512_maskz_loadu_ps(mask, w0 + k), a1 = _mm512_maskz_loadu_ps(mask, w1 + k);
    __m512 a2 = _mm512_maskz_loadu_ps(mask, w2 + k), a3 = _mm512_maskz_loadu_ps(mask, w3 + k);
    __m512 b0 = _mm512_maskz_loadu_ps(mask, x0 + k), b1 = _mm512_maskz_loadu_ps(mask, x1 + k);
    __m512 b2 = _mm512_maskz_loadu_ps(mask, x2 + k), b3 = _mm512_maskz_loadu_ps(mask, x3 + k);
    c[0] = _mm512_fmadd_ps(a0, b0, c[0]);
    c[1] = _mm512_fmadd_ps(a0, b1, c[1]);
    c[2] = _mm512_fmadd_ps(a0, b2, c[2]);
    c[3] = _mm512_fmadd_ps(a0, b3, c[3]);
    c[4] = _mm512_fmadd_ps(a1, b0, c[4]);
    c[5] = _mm512_fmadd_ps(a1, b1, c[5]);
    c[6] = _mm512_fmadd_ps(a1, b2, c[6]);
    c[7] = _mm512_fmadd_ps(a1, b3, c[7]);
    c[8] = _mm512_fmadd_ps(a2, b0, c[8]);
    c[9] = _mm512_fmadd_ps(a2, b1, c[9]);
    c[10] = _mm512_fmadd_ps(a2, b2, c[10]);
    c[11] = _mm512_fmadd_ps(a2, b3, c[11]);
    c[12] = _mm512_fmadd_ps(a3, b0, c[12]);
    c[13] = _mm512_fmadd_ps(a3, b1, c[13]);
    c[14] = _mm512_fmadd_ps(a3, b2, c[14]);
    c[15] = _mm512_fmadd_ps(a3, b3, c[15]);
  }
  for (int i = 0; i < 16; i++)
    if ((i & 3) < nm && (i >> 2) < nr)
      tmx_store(j, m + (i & 3), r + (i >> 2), _mm512_reduce_add_ps(c[i]));
}

static void tmx_rows(const tmx_job *j, long r0, long r1) {
  if (j->M == 1) {
    tmx_rows1(j, r0, r1, 0);
    return;
  }
  for (long r = r0; r < r1; r += 4)
    for (long m = 0; m < j->M; m += 4)
      tmx_block4x4(j, r, r1 - r < 4 ? r1 - r : 4, m, j->M - m < 4 ? j->M - m : 4);
}

/* Claim chunks of the job's rows until none are left. Threads share the rows dynamically: one
 * that starts late or loses its core for a while (a VM's vCPU, the Python thread) is covered by
 * the others instead of being waited for. */
static void tmx_claim_rows(const tmx_job *j) {
  unsigned long c = atomic_load(&tmx_claim);
  for (;;) {
    long r0 = (long)(c & 0xffffffffUL);
    if ((c >> 32) != (j->id & 0xffffffffUL) || r0 >= j->N) return;
    long r1 = r0 + j->chunk < j->N ? r0 + j->chunk : j->N;
    if (!atomic_compare_exchange_weak(&tmx_claim, &c, c + (unsigned long)(r1 - r0))) continue;
    tmx_rows(j, r0, r1);
    atomic_fetch_add(&tmx_done, r1 - r0);
    c = atomic_load(&tmx_claim);
  }
}

/* A worker's consistent copy of the current job (0 if it is being replaced). */
static int tmx_read_job(tmx_job *j) {
  unsigned s1 = atomic_load(&tmx_seq);
  if (s1 & 1) return 0;
  *j = tmx_current;
  atomic_thread_fence(memory_order_acquire);
  return atomic_load(&tmx_seq) == s1;
}

static double tmx_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* How long an idle worker spins before it sleeps. The GEMVs of one decode step follow each
 * other within a few hundred microseconds (attention, norms between them), and waking a
 * sleeping thread costs tens of microseconds on a VM (its vCPU halts): so a worker spins through
 * a step and sleeps between bursts. TORCH_MLX_GEMV_SPIN_US overrides it. */
static double tmx_spin_us = 2000.0;

static void *tmx_worker(void *arg) {
  int seen = 0;
  for (;;) {
    double until = tmx_now_us() + tmx_spin_us;
    for (int i = 0; atomic_load(&tmx_generation) == seen; i++) {
      _mm_pause();
      if ((i & 255) == 255 && tmx_now_us() > until) break;
    }
    while (atomic_load(&tmx_generation) == seen) {
      atomic_fetch_add(&tmx_sleeping, 1);
      syscall(SYS_futex, &tmx_generation, FUTEX_WAIT_PRIVATE, seen, 0, 0, 0);
      atomic_fetch_sub(&tmx_sleeping, 1);
    }
    seen = atomic_load(&tmx_generation);
    tmx_job job;
    if (tmx_read_job(&job)) tmx_claim_rows(&job);
  }
  return 0;
}

static void tmx_gemv_set_threads(int n) {
  if (!tmx_started && n > 0) tmx_threads = n > 8 ? 8 : n;
  const char *spin = getenv("TORCH_MLX_GEMV_SPIN_US");
  if (spin && *spin) tmx_spin_us = atof(spin);
}

static atomic_flag tmx_busy = ATOMIC_FLAG_INIT;
static int tmx_enabled = -1;

/* Y [M, N] (row stride ldy) = alpha * X [M, K] (row stride ldx) W^T + beta * Y, W [N, K] with
 * row stride ld. Returns 0 when it does not apply (the caller uses OpenBLAS): no AVX-512, a small
 * product, more than 12 rows, TORCH_MLX_GEMV=openblas, or another thread inside it. */
static int tmx_gemm_small(const float *W, long N, long K, long ld, const float *x, long M,
                          long ldx, float alpha, float beta, float *y, long ldy) {
  if (tmx_enabled < 0) {
    const char *choice = getenv("TORCH_MLX_GEMV");
    tmx_enabled = __builtin_cpu_supports("avx512f") && !(choice && !strcmp(choice, "openblas"));
  }
  if (!tmx_enabled || N * K < 65536 || M < 1 || M > 12 || atomic_flag_test_and_set(&tmx_busy))
    return 0;
  int n = tmx_threads;
  if (n > 1 && !tmx_started) {
    pthread_mutex_lock(&tmx_lock);
    if (!tmx_started) {
      for (int t = 1; t < n; t++) {
        pthread_t th;
        pthread_create(&th, 0, tmx_worker, 0);
        pthread_detach(th);
      }
      tmx_started = 1;
    }
    pthread_mutex_unlock(&tmx_lock);
  }
  /* chunks of about 256 KiB of W: few claims per GEMV, and long sequential reads */
  long chunk = 65536 / K > 8 ? 65536 / K : 8;
  unsigned long id = tmx_current.id + 1;
  atomic_fetch_add(&tmx_seq, 1);
  tmx_current = (tmx_job){W, x, y, N, K, ld, chunk, M, ldx, ldy, alpha, beta, id};
  atomic_fetch_add(&tmx_seq, 1);
  atomic_store(&tmx_done, 0);
  atomic_store(&tmx_claim, (id & 0xffffffffUL) << 32);
  if (n > 1) {
    atomic_fetch_add(&tmx_generation, 1);
    /* a worker announces itself before it sleeps, so the syscall is made only when needed */
    if (atomic_load(&tmx_sleeping))
      syscall(SYS_futex, &tmx_generation, FUTEX_WAKE_PRIVATE, n, 0, 0, 0);
  }
  tmx_claim_rows(&tmx_current);
  while (atomic_load(&tmx_done) < N) _mm_pause();  /* chunks other threads are finishing */
  atomic_flag_clear(&tmx_busy);
  return 1;
}
#else
static void tmx_gemv_set_threads(int n) {}
static int tmx_gemm_small(const float *W, long N, long K, long ld, const float *x, long M,
                          long ldx, float alpha, float beta, float *y, long ldy) { return 0; }
#endif
/* torch_mlx's first-use hook gives both thread pools their size. */
void tmx_set_num_threads(int n) {
  scipy_openblas_set_num_threads(n);
  tmx_gemv_set_threads(n);
}
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (order == RowMajor && K > 0 && M == 1 && N > 1) {
    /* C[1, N] = alpha * a[1, K] op(B)[K, N] + beta * C: y = op(B)^T a */
    int inc_a = ta == NoTrans ? 1 : lda;
    if (tb == Trans && inc_a == 1 && tmx_gemm_small(B, N, K, ldb, A, 1, K, alpha, beta, C, N))
      return;
    if (tb == NoTrans) scipy_cblas_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
    else scipy_cblas_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
    return;
  }
  if (order == RowMajor && K > 0 && N == 1 && M > 1) {
    /* C[M, 1] (stride ldc) = alpha * op(A)[M, K] b[K, 1] + beta * C */
    int inc_b = tb == NoTrans ? ldb : 1;
    if (ta == NoTrans && inc_b == 1 && ldc == 1 &&
        tmx_gemm_small(A, M, K, lda, B, 1, K, alpha, beta, C, M))
      return;
    if (ta == NoTrans) scipy_cblas_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
    else scipy_cblas_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
    return;
  }
  /* C [M, N] = alpha * A [M, K] B^T + beta * C with B's rows contiguous: a few rows of
   * activations against a weight matrix */
  if (order == RowMajor && K > 0 && ta == NoTrans && tb == Trans && M <= 12 &&
      tmx_gemm_small(B, N, K, ldb, A, M, lda, alpha, beta, C, ldc))
    return;
  scipy_cblas_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
