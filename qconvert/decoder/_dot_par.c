/* Two-thread products for decoding: the caller computes one half of the rows, one persistent worker thread
 * the other. Part of qconvert.decoder._kernels (qconvert/decoder/products.py calls qc_matmul_ggml /
 * qc_matmul_int).
 *
 * Rule: a decoding product is short, so handing half of it over must cost far less than the product; a
 * Python thread pool does not meet that (a wake-up through a condition variable and the GIL per call), this
 * worker does: it waits for the next job spinning for a short while (decoding calls come back to back), then
 * sleeps on a condition variable. scripts/bench_codecs.py measures the split (default) against one thread
 * (--threads 1). One job at a time: a second caller while one runs computes all its rows itself. After
 * fork() the child starts without a worker and makes a new one on first use. */
#include <pthread.h>
#include <stdint.h>
#include "_dot.h"

#define QC_SPINS 4000  /* the worker's polls before it sleeps: longer than the gap between a decoding step's calls */

typedef struct {  /* the arguments of a qc_dot_ggml / qc_dot_int call */
    int is_int, type, bits, group, flags;
    const uint8_t *W; int64_t rb;
    const void *scales, *offsets; const uint16_t *steps;
    const float *x; int64_t T, cols; float *y; int64_t ldy, r0;
} qc_call;

static void run_rows(const qc_call *c, int64_t a, int64_t b) {  /* rows [a, b) of the call */
    float *y = c->y + (a - c->r0);
    if (c->is_int)
        qc_dot_int(c->W, c->rb, c->scales, c->offsets, c->steps, c->bits, c->group, c->flags, c->x, c->T,
                   c->cols, y, c->ldy, a, b);
    else
        qc_dot_ggml(c->type, c->W, c->rb, c->x, c->T, c->cols, y, c->ldy, a, b);
}

static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* held by the caller of the running job */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;    /* guards sleeping, with wake */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int started, sleeping;
static uint64_t posted, done;  /* job counters (atomic accesses) */
static qc_call job;
static int64_t job_a, job_b;

static inline void pause_once(void) {
#ifdef QC_X86
    _mm_pause();
#endif
}

static void *worker(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (__atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen && spins < QC_SPINS) { pause_once(); spins++; }
        if (__atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen) {
            pthread_mutex_lock(&mu);
            sleeping = 1;
            while (__atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&wake, &mu);
            sleeping = 0;
            pthread_mutex_unlock(&mu);
        }
        seen = __atomic_load_n(&posted, __ATOMIC_ACQUIRE);
        run_rows(&job, job_a, job_b);
        __atomic_store_n(&done, seen, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void after_fork_child(void) {  /* the worker thread does not exist in a forked child */
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&wake, NULL);
    started = sleeping = 0;
    posted = done = 0;
}

static int ensure_worker(void) {  /* called with busy held */
    if (started) return started > 0;
    static int atfork;
    if (!atfork) { pthread_atfork(NULL, NULL, after_fork_child); atfork = 1; }
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    started = pthread_create(&t, &at, worker, NULL) == 0 ? 1 : -1;
    pthread_attr_destroy(&at);
    return started > 0;
}

/* rows [r0, r1) of the call, split over the caller and the worker when threads == 2 */
static void par2(const qc_call *c, int64_t r1, int threads) {
    const int64_t r0 = c->r0;
    if (threads < 2 || r1 - r0 < 2 || pthread_mutex_trylock(&busy) != 0) { run_rows(c, r0, r1); return; }
    if (!ensure_worker()) { pthread_mutex_unlock(&busy); run_rows(c, r0, r1); return; }
    const int64_t mid = r0 + (r1 - r0) / 2;
    job = *c, job_a = mid, job_b = r1;
    const uint64_t n = posted + 1;
    __atomic_store_n(&posted, n, __ATOMIC_RELEASE);
    pthread_mutex_lock(&mu);
    if (sleeping) pthread_cond_signal(&wake);
    pthread_mutex_unlock(&mu);
    run_rows(c, r0, mid);
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) != n) pause_once();
    pthread_mutex_unlock(&busy);
}

/* qc_dot_ggml over rows [r0, r1) (y for row r at y + (r - r0)) on `threads` (1 or 2) threads */
int qc_matmul_ggml(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols,
                   float *y, int64_t ldy, int64_t r0, int64_t r1, int threads) {
    if (qc_dot_ggml(type, W, row_bytes, x, 0, cols, y, ldy, r0, r0)) return -1;  /* type check, no work */
    const qc_call c = {0, type, 0, 0, 0, W, row_bytes, NULL, NULL, NULL, x, T, cols, y, ldy, r0};
    par2(&c, r1, threads);
    return 0;
}

/* qc_dot_int over rows [r0, r1) on `threads` (1 or 2) threads */
int qc_matmul_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
                  const uint16_t *steps, int bits, int group, int flags, const float *x, int64_t T,
                  int64_t cols, float *y, int64_t ldy, int64_t r0, int64_t r1, int threads) {
    if (qc_dot_int(codes, code_row_bytes, scales, offsets, steps, bits, group, flags, x, 0, cols, y, ldy,
                   r0, r0)) return -1;
    const qc_call c = {1, 0, bits, group, flags, codes, code_row_bytes, scales, offsets, steps, x, T, cols,
                       y, ldy, r0};
    par2(&c, r1, threads);
    return 0;
}
