/* Fused exact nearest-code search for x86-64 CPUs with AVX2 and FMA.
 *
 * For every query z_i (row of an (N, D) fp32 matrix) it returns argmin_k (||c_k||^2 - 2 z_i . c_k) over the codes
 * c_k (rows of a (K, D) fp32 matrix), ties going to the lowest index. The distances never leave the registers: a
 * 6 x 16 micro-kernel accumulates the augmented dot products [-2 z_i, 1] . [c_k, ||c_k||^2] of 6 queries and 16
 * codes (k = 0 .. D in order, one fused multiply-add each, so every code's distance is summed in the same order
 * wherever it sits in a tile: identical codes get bit-identical distances) and folds them into per-lane running
 * minima with a strict "less than" (a lane meets its codes in increasing order, so it keeps the first of equal
 * minima). Codes are packed 256 at a time (16-code panels, [k][16], about 257 KiB at D = 256: half of a small L2),
 * queries 6 at a time ([k][6], L1); every packed code chunk meets all the queries of a thread's row chunk.
 *
 * The caller guarantees that every distance is finite (finite inputs that cannot overflow): NaN handling lives in
 * the blocked torch search, which is used otherwise. Threads: each of `num_threads` POSIX threads takes one
 * contiguous slice of the queries and packs its own codes, so no thread waits for another before the end.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6          /* queries per micro-tile */
#define NR 16         /* codes per micro-tile: two 8-lane vectors */
#define CODE_CHUNK 256 /* codes packed at a time */
#define ROW_CHUNK 4096 /* queries packed at a time by one thread */

typedef struct {
    const float *z, *codebook, *code_sq;
    int64_t ldz, ldc, row_start, row_count, num_codes;
    int dim;
    int64_t *out;
    int status;
} task_t;

/* codes [c0, c0 + count) as panels of NR: panel p holds [k][NR] for k = 0 .. D, row D being ||c||^2. Lanes past
 * the end of the codebook get zero vectors and an infinite norm: their distance is +inf, never below a finite one. */
static void pack_codes(const task_t *t, int64_t c0, int64_t count, float *dst) {
    const int d = t->dim;
    const int64_t panels = (count + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++) {
        float *panel = dst + p * (int64_t)(d + 1) * NR;
        for (int j = 0; j < NR; j++) {
            const int64_t c = c0 + p * NR + j;
            if (c < c0 + count) {
                const float *src = t->codebook + c * t->ldc;
                for (int k = 0; k < d; k++) panel[k * NR + j] = src[k];
                panel[d * NR + j] = t->code_sq[c];
            } else {
                for (int k = 0; k < d; k++) panel[k * NR + j] = 0.0f;
                panel[d * NR + j] = INFINITY;
            }
        }
    }
}

/* queries [r0, r0 + count) as tiles of MR: tile q holds [k][MR] of -2 z (exact scaling) and a final 1. Rows past
 * the end are zero and never written back. */
static void pack_queries(const task_t *t, int64_t r0, int64_t count, float *dst) {
    const int d = t->dim;
    const int64_t tiles = (count + MR - 1) / MR;
    for (int64_t q = 0; q < tiles; q++) {
        float *tile = dst + q * (int64_t)(d + 1) * MR;
        for (int i = 0; i < MR; i++) {
            const int64_t r = r0 + q * MR + i;
            if (r < r0 + count) {
                const float *src = t->z + r * t->ldz;
                for (int k = 0; k < d; k++) tile[k * MR + i] = -2.0f * src[k];
                tile[d * MR + i] = 1.0f;
            } else {
                for (int k = 0; k <= d; k++) tile[k * MR + i] = 0.0f;
            }
        }
    }
}

#define FOLD(row, acc, half, lanes)                                                                 \
    {                                                                                               \
        float *bv = best_val + (row) * NR + (half) * 8;                                             \
        float *bi = (float *)(best_idx + (row) * NR + (half) * 8);                                  \
        const __m256 v = _mm256_load_ps(bv);                                                        \
        const __m256 better = _mm256_cmp_ps(acc, v, _CMP_LT_OQ);                                    \
        _mm256_store_ps(bv, _mm256_blendv_ps(v, acc, better));                                      \
        _mm256_store_ps(bi, _mm256_blendv_ps(_mm256_load_ps(bi), _mm256_castsi256_ps(lanes), better)); \
    }

/* distances of one MR x NR tile, folded into the running minima of its MR rows (NR lanes each) */
static inline void tile_min(const float *a, const float *b, int depth, float *best_val, int32_t *best_idx,
                            int32_t first_code) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < depth; k++) {
        const __m256 b0 = _mm256_load_ps(b + k * NR), b1 = _mm256_load_ps(b + k * NR + 8);
        __m256 x;
        x = _mm256_broadcast_ss(a + k * MR + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + k * MR + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + k * MR + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + k * MR + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a + k * MR + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a + k * MR + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(first_code), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i hi = _mm256_add_epi32(lo, _mm256_set1_epi32(8));
    FOLD(0, c00, 0, lo) FOLD(0, c01, 1, hi) FOLD(1, c10, 0, lo) FOLD(1, c11, 1, hi)
    FOLD(2, c20, 0, lo) FOLD(2, c21, 1, hi) FOLD(3, c30, 0, lo) FOLD(3, c31, 1, hi)
    FOLD(4, c40, 0, lo) FOLD(4, c41, 1, hi) FOLD(5, c50, 0, lo) FOLD(5, c51, 1, hi)
}

static void *search_slice(void *arg) {
    task_t *t = (task_t *)arg;
    const int depth = t->dim + 1;
    const int64_t rows_cap = t->row_count < ROW_CHUNK ? t->row_count : ROW_CHUNK;
    const int64_t tiles_cap = (rows_cap + MR - 1) / MR;
    float *queries = aligned_alloc(64, ((size_t)tiles_cap * MR * depth * sizeof(float) + 63) / 64 * 64);
    float *codes = aligned_alloc(64, ((size_t)CODE_CHUNK * depth * sizeof(float) + 63) / 64 * 64);
    float *best_val = aligned_alloc(64, ((size_t)tiles_cap * MR * NR * sizeof(float) + 63) / 64 * 64);
    int32_t *best_idx = aligned_alloc(64, ((size_t)tiles_cap * MR * NR * sizeof(int32_t) + 63) / 64 * 64);
    if (!queries || !codes || !best_val || !best_idx) {
        t->status = 1;
        goto done;
    }
    for (int64_t r0 = t->row_start; r0 < t->row_start + t->row_count; r0 += ROW_CHUNK) {
        const int64_t rows = t->row_start + t->row_count - r0 < ROW_CHUNK ? t->row_start + t->row_count - r0 : ROW_CHUNK;
        const int64_t tiles = (rows + MR - 1) / MR;
        pack_queries(t, r0, rows, queries);
        for (int64_t i = 0; i < tiles * MR * NR; i++) {
            best_val[i] = INFINITY;
            best_idx[i] = 0;
        }
        for (int64_t c0 = 0; c0 < t->num_codes; c0 += CODE_CHUNK) {
            const int64_t count = t->num_codes - c0 < CODE_CHUNK ? t->num_codes - c0 : CODE_CHUNK;
            const int64_t panels = (count + NR - 1) / NR;
            pack_codes(t, c0, count, codes);
            for (int64_t q = 0; q < tiles; q++)
                for (int64_t p = 0; p < panels; p++)
                    tile_min(queries + q * depth * MR, codes + p * depth * NR, depth, best_val + q * MR * NR,
                             best_idx + q * MR * NR, (int32_t)(c0 + p * NR));
        }
        for (int64_t r = 0; r < rows; r++) { /* lowest value, then lowest index among the 16 lanes */
            const float *v = best_val + r * NR;
            const int32_t *ix = best_idx + r * NR;
            float m = v[0];
            int32_t mi = ix[0];
            for (int j = 1; j < NR; j++)
                if (v[j] < m || (v[j] == m && ix[j] < mi)) {
                    m = v[j];
                    mi = ix[j];
                }
            t->out[r0 + r] = mi;
        }
    }
done:
    free(queries);
    free(codes);
    free(best_val);
    free(best_idx);
    return NULL;
}

/* Nearest code of each of the n queries; returns 0, or 1 when scratch memory could not be allocated, 2 when a thread
 * could not be started. Strides are in floats; columns are contiguous. */
int fvq_nearest_codes(const float *z, int64_t n, int64_t ldz, const float *codebook, const float *code_sq,
                      int64_t num_codes, int64_t ldc, int dim, int num_threads, int64_t *out) {
    if (num_threads < 1) num_threads = 1;
    int64_t tiles = (n + MR - 1) / MR;
    if (num_threads > tiles) num_threads = (int)(tiles > 0 ? tiles : 1);
    task_t *tasks = calloc((size_t)num_threads, sizeof(task_t));
    pthread_t *threads = calloc((size_t)num_threads, sizeof(pthread_t));
    int status = 0;
    if (!tasks || !threads) {
        free(tasks);
        free(threads);
        return 1;
    }
    const int64_t per = (tiles + num_threads - 1) / num_threads * MR; /* whole tiles per thread */
    int started = 0;
    for (int i = 0; i < num_threads; i++) {
        task_t *t = &tasks[i];
        t->z = z;
        t->codebook = codebook;
        t->code_sq = code_sq;
        t->ldz = ldz;
        t->ldc = ldc;
        t->dim = dim;
        t->num_codes = num_codes;
        t->out = out;
        t->row_start = i * per < n ? i * per : n;
        t->row_count = t->row_start + per < n ? per : n - t->row_start;
    }
    for (int i = 1; i < num_threads; i++) { /* thread 0 is the caller */
        if (tasks[i].row_count > 0 && pthread_create(&threads[i], NULL, search_slice, &tasks[i]) != 0) {
            status = 2;
            break;
        }
        started = i;
    }
    if (status == 0 && tasks[0].row_count > 0) search_slice(&tasks[0]);
    for (int i = 1; i <= started; i++)
        if (tasks[i].row_count > 0) pthread_join(threads[i], NULL);
    for (int i = 0; i < num_threads && status == 0; i++) status = tasks[i].status;
    free(tasks);
    free(threads);
    return status;
}

/* Exact re-rank of given candidates: for each of the n queries, the candidate of lowest distance among its `width`
 * codes (cand[i * width + j], ascending; a negative entry is padding), distances summed in the same fixed order as
 * the search above (fmaf is one fused multiply-add, rounded once: the same value as a vector lane's), ties to the
 * first, i.e. lowest, candidate. Writes the chosen code to out[i]. */
void fvq_rerank(const float *z, int64_t n, int64_t ldz, const float *codebook, const float *code_sq, int64_t ldc,
                int dim, const int64_t *cand, int64_t width, int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *zi = z + i * ldz;
        float best = INFINITY;
        int64_t best_code = -1;
        for (int64_t j = 0; j < width; j++) {
            const int64_t c = cand[i * width + j];
            if (c < 0) continue;
            const float *cc = codebook + c * ldc;
            float acc = 0.0f;
            for (int k = 0; k < dim; k++) acc = fmaf(-2.0f * zi[k], cc[k], acc);
            acc = fmaf(1.0f, code_sq[c], acc);
            if (best_code < 0 || acc < best) {
                best = acc;
                best_code = c;
            }
        }
        out[i] = best_code;
    }
}
