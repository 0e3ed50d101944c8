/* Multi-threaded products for decoding: the rows of a product are cut into `threads` contiguous ranges; the
 * caller computes the first, persistent worker threads the others. Part of qconvert.decoder._kernels
 * (qconvert/decoder/products.py calls qc_matmul_ggml / qc_matmul_int; _step.c those and qc_parallel).
 *
 * Rule: a decoding product is short, so handing part of it over must cost far less than the product; a
 * Python thread pool does not meet that (a wake-up through a condition variable and the GIL per call), these
 * workers do: each waits for its next range spinning for QC_SPIN_NS (decoding calls come back to back, a
 * wake-up from sleep costs tens of microseconds), then sleeps on its condition variable. When more threads
 * are asked for than the process has CPUs, nobody spins (a spinning thread would hold the CPU the others
 * need): workers sleep at once and the caller yields while it waits. Each row is computed by the same code
 * whatever range holds it, so results do not depend on the thread count (tests/test_threads.py);
 * `qconvert generate --threads N` reports the decode speed it gives.
 * One job at a time: a second caller while one runs computes all its rows itself. After fork() the child
 * starts without workers and makes new ones on first use. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include "_dot.h"

#define QC_SPIN_NS 3000000  /* how long a worker polls before it sleeps: longer than the gap between a decoding
                              * step's calls, one token's Python between two forward passes included */
#define QC_MAX_THREADS 64   /* the caller and up to 63 workers */

typedef void (*qc_rows_fn)(const void *ctx, int64_t a, int64_t b);

typedef struct {  /* the arguments of a qc_dot_ggml / qc_dot_int call, or of any row function (qc_parallel) */
    qc_rows_fn fn; const void *ctx;
    int is_int, type, bits, group, flags;
    const uint8_t *W; int64_t rb;
    const void *scales, *offsets; const uint16_t *steps;
    const float *x; int64_t T, cols; float *y; int64_t ldy, r0;
} qc_call;

typedef struct {  /* one worker's mailbox: its range of the current job and the job counters */
    uint64_t posted, done;  /* atomic accesses */
    int64_t a, b;
    int sleeping;           /* guarded by mu */
    pthread_cond_t wake;
} QC_ALIGN qc_slot;

static void run_rows(const qc_call *c, int64_t a, int64_t b) {  /* rows [a, b) of the call */
    float *y = c->y + (a - c->r0);
    if (c->fn)
        c->fn(c->ctx, a, b);
    else if (c->is_int)
        qc_dot_int(c->W, c->rb, c->scales, c->offsets, c->steps, c->bits, c->group, c->flags, c->x, c->T,
                   c->cols, y, c->ldy, a, b);
    else
        qc_dot_ggml(c->type, c->W, c->rb, c->x, c->T, c->cols, y, c->ldy, a, b);
}

static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* held by the caller of the running job */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;    /* guards the slots' sleeping flags */
static qc_slot slots[QC_MAX_THREADS];                     /* slots[1..workers]: slot 0 is the caller's */
static int workers, spins, n_cpus;                        /* written with busy held, before a job is posted */
static qc_call job;

static inline void pause_once(void) {
#ifdef QC_X86
    _mm_pause();
#endif
}

static int cpus(void) {  /* the CPUs this process may run on, read once (as formats/threads.py reads them) */
    if (n_cpus) return n_cpus;
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return n_cpus = CPU_COUNT(&set);
#endif
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n_cpus = n > 0 ? (int)n : 1;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *worker(void *arg) {
    qc_slot *s = arg;
    uint64_t seen = __atomic_load_n(&s->done, __ATOMIC_ACQUIRE);  /* = posted when the slot is made */
    for (;;) {
        if (__atomic_load_n(&spins, __ATOMIC_RELAXED)) {
            const int64_t t0 = now_ns();
            for (int i = 1; __atomic_load_n(&s->posted, __ATOMIC_ACQUIRE) == seen; i++) {
                pause_once();
                if (i % 64 == 0 && (now_ns() - t0 > QC_SPIN_NS || !__atomic_load_n(&spins, __ATOMIC_RELAXED))) break;
            }
        }
        if (__atomic_load_n(&s->posted, __ATOMIC_ACQUIRE) == seen) {
            pthread_mutex_lock(&mu);
            s->sleeping = 1;
            while (__atomic_load_n(&s->posted, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&s->wake, &mu);
            s->sleeping = 0;
            pthread_mutex_unlock(&mu);
        }
        seen = __atomic_load_n(&s->posted, __ATOMIC_ACQUIRE);
        run_rows(&job, s->a, s->b);
        __atomic_store_n(&s->done, seen, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void after_fork_child(void) {  /* the worker threads do not exist in a forked child */
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&mu, NULL);
    for (int i = 0; i < QC_MAX_THREADS; i++) {
        slots[i].posted = slots[i].done = 0;
        slots[i].sleeping = 0;
        pthread_cond_init(&slots[i].wake, NULL);
    }
    workers = n_cpus = 0;
}

static int ensure_workers(int n) {  /* at least n workers (called with busy held); returns how many exist */
    static int atfork;
    if (!atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        for (int i = 0; i < QC_MAX_THREADS; i++) pthread_cond_init(&slots[i].wake, NULL);
        atfork = 1;
    }
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    while (workers < n) {
        pthread_t t;
        if (pthread_create(&t, &at, worker, &slots[workers + 1]) != 0) break;
        workers++;
    }
    pthread_attr_destroy(&at);
    return workers;
}

/* rows [c->r0, r1) of the call, cut into `threads` contiguous ranges run at once */
static void run_split(const qc_call *c, int64_t r1, int threads) {
    const int64_t r0 = c->r0, n = r1 - r0;
    int parts = threads < QC_MAX_THREADS ? threads : QC_MAX_THREADS;
    if (parts > n) parts = (int)n;
    if (parts < 2 || pthread_mutex_trylock(&busy) != 0) { run_rows(c, r0, r1); return; }
    const int have = ensure_workers(parts - 1);
    if (have < parts - 1) parts = 1 + have;
    __atomic_store_n(&spins, threads <= cpus(), __ATOMIC_RELAXED);
    job = *c;
    for (int i = 1; i < parts; i++) {
        qc_slot *s = &slots[i];
        s->a = r0 + n * i / parts, s->b = r0 + n * (i + 1) / parts;
        __atomic_store_n(&s->posted, s->posted + 1, __ATOMIC_RELEASE);
        pthread_mutex_lock(&mu);
        if (s->sleeping) pthread_cond_signal(&s->wake);
        pthread_mutex_unlock(&mu);
    }
    run_rows(c, r0, r0 + n / parts);
    int spin = __atomic_load_n(&spins, __ATOMIC_RELAXED);
    const int64_t t0 = spin ? now_ns() : 0;
    for (int i = 1; i < parts; i++)
        for (int k = 1; __atomic_load_n(&slots[i].done, __ATOMIC_ACQUIRE) != slots[i].posted; k++) {
            if (!spin) { sched_yield(); continue; }
            pause_once();
            if (k % 64 == 0 && now_ns() - t0 > QC_SPIN_NS) spin = 0;
        }
    pthread_mutex_unlock(&busy);
}

/* qc_dot_ggml over rows [r0, r1) (y for row r at y + (r - r0)) on `threads` threads */
int qc_matmul_ggml(int type, const uint8_t *W, int64_t row_bytes, const float *x, int64_t T, int64_t cols,
                   float *y, int64_t ldy, int64_t r0, int64_t r1, int threads) {
    if (qc_dot_ggml(type, W, row_bytes, x, 0, cols, y, ldy, r0, r0)) return -1;  /* type check, no work */
    const qc_call c = {NULL, NULL, 0, type, 0, 0, 0, W, row_bytes, NULL, NULL, NULL, x, T, cols, y, ldy, r0};
    run_split(&c, r1, threads);
    return 0;
}

/* qc_dot_int over rows [r0, r1) on `threads` threads */
int qc_matmul_int(const uint8_t *codes, int64_t code_row_bytes, const void *scales, const void *offsets,
                  const uint16_t *steps, int bits, int group, int flags, const float *x, int64_t T,
                  int64_t cols, float *y, int64_t ldy, int64_t r0, int64_t r1, int threads) {
    if (qc_dot_int(codes, code_row_bytes, scales, offsets, steps, bits, group, flags, x, 0, cols, y, ldy,
                   r0, r0)) return -1;
    const qc_call c = {NULL, NULL, 1, 0, bits, group, flags, codes, code_row_bytes, scales, offsets, steps, x, T,
                       cols, y, ldy, r0};
    run_split(&c, r1, threads);
    return 0;
}

/* fn(ctx, a, b) over [0, n) cut into `threads` contiguous ranges run at once (the same workers): for work
 * whose rows are independent, e.g. the attention heads of a decoding step (_step.c) */
void qc_parallel(qc_rows_fn fn, const void *ctx, int64_t n, int threads) {
    const qc_call c = {fn, ctx, 0, 0, 0, 0, 0, NULL, 0, NULL, NULL, NULL, NULL, 0, 0, NULL, 0, 0};
    run_split(&c, n, threads);
}

/* ---- bfloat16 rows for the products of a prompt in the q8 mode (products.py _product_bf16) ---- */
int qc_dequant_ggml(int type, const uint8_t *W, int64_t row_bytes, int64_t cols, int64_t r0, int64_t r1, float *out);
void qc_f32_to_bf16(const float *src, uint16_t *dst, int64_t n);  /* _kernels.c */

typedef struct { int type; const uint8_t *W; int64_t rb, cols, r0; uint16_t *out; int *failed; } qc_bf16_job;
static __thread struct { int64_t cap; float *row; } bf16_row;

static void bf16_rows(const void *ctx, int64_t a, int64_t b) {
    const qc_bf16_job *j = ctx;
    if (bf16_row.cap < j->cols) {
        float *m = realloc(bf16_row.row, (size_t)j->cols * sizeof(float));
        if (!m) { __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED); return; }
        bf16_row.row = m, bf16_row.cap = j->cols;
    }
    for (int64_t r = a; r < b; r++) {
        qc_dequant_ggml(j->type, j->W, j->rb, j->cols, j->r0 + r, j->r0 + r + 1, bf16_row.row);
        qc_f32_to_bf16(bf16_row.row, j->out + r * j->cols, j->cols);
    }
}

/* out [r1 - r0, cols] = bfloat16 (nearest, ties to even) of rows [r0, r1) of the GGML matrix W, dequantised
 * exactly as qc_dequant_ggml, on `threads` threads. 0, -1 for an unknown type, -2 out of memory */
int qc_dequant_ggml_bf16(int type, const uint8_t *W, int64_t row_bytes, int64_t cols, int64_t r0, int64_t r1,
                         uint16_t *out, int threads) {
    if (qc_dequant_ggml(type, W, row_bytes, cols, r0, r0, NULL)) return -1;
    int failed = 0;
    const qc_bf16_job j = {type, W, row_bytes, cols, r0, out, &failed};
    qc_parallel(bf16_rows, &j, r1 - r0, threads);
    __atomic_store_n(&spins, 0, __ATOMIC_RELAXED);  /* torch's threads take the cores next: the workers sleep */
    return __atomic_load_n(&failed, __ATOMIC_RELAXED) ? -2 : 0;
}
