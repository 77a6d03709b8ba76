/* Fused exact nearest-code search for x86-64 CPUs with AVX-512F: the AVX2 kernel (nearest_codes_avx2.c) with
 * 16-lane vectors.
 *
 * Same contract and same arithmetic as the AVX2 kernel: for every query z_i it returns
 * argmin_k (||c_k||^2 - 2 z_i . c_k), ties going to the lowest index, where every distance is the augmented dot
 * product [-2 z_i, 1] . [c_k, ||c_k||^2] summed k = 0 .. D in order from 0, one fused multiply-add each. FMA rounds
 * once, so each distance is bit-identical to the AVX2 kernel's (and to fvq.quantizers.search.reference), whatever
 * the vector width or tile position. Only the register tile changes: 12 queries x 32 codes (two 16-lane vectors,
 * 24 of the 32 zmm registers as accumulators), folded into per-lane running minima under a strict "less than"
 * mask. Codes are packed 256 at a time (eight 32-code panels), queries 12 at a time.
 *
 * The caller guarantees that every distance is finite; NaN handling lives in the blocked torch search. Threads as in
 * the AVX2 kernel: one contiguous slice of the queries per POSIX thread, each packing its own codes.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 12         /* queries per micro-tile */
#define NR 32         /* codes per micro-tile: two 16-lane vectors */
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

#define FOLD(row, acc, half, lanes)                                                     \
    {                                                                                   \
        float *bv = best_val + (row) * NR + (half) * 16;                                \
        int32_t *bi = best_idx + (row) * NR + (half) * 16;                              \
        const __m512 v = _mm512_load_ps(bv);                                            \
        const __mmask16 better = _mm512_cmp_ps_mask(acc, v, _CMP_LT_OQ);                \
        _mm512_store_ps(bv, _mm512_mask_mov_ps(v, better, acc));                        \
        _mm512_store_si512(bi, _mm512_mask_mov_epi32(_mm512_load_si512(bi), better, lanes)); \
    }

#define ROW(r)                                                                                           \
    x = _mm512_set1_ps(a[k * MR + (r)]);                                                                 \
    c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);                                                           \
    c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1);

/* distances of one MR x NR tile, folded into the running minima of its MR rows (NR lanes each) */
static inline void tile_min(const float *a, const float *b, int depth, float *best_val, int32_t *best_idx,
                            int32_t first_code) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, cA0 = c00, cA1 = c00, cB0 = c00, cB1 = c00;
    for (int k = 0; k < depth; k++) {
        const __m512 b0 = _mm512_load_ps(b + k * NR), b1 = _mm512_load_ps(b + k * NR + 16);
        __m512 x;
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8) ROW(9)
        x = _mm512_set1_ps(a[k * MR + 10]); cA0 = _mm512_fmadd_ps(x, b0, cA0); cA1 = _mm512_fmadd_ps(x, b1, cA1);
        x = _mm512_set1_ps(a[k * MR + 11]); cB0 = _mm512_fmadd_ps(x, b0, cB0); cB1 = _mm512_fmadd_ps(x, b1, cB1);
    }
    const __m512i lo = _mm512_add_epi32(
        _mm512_set1_epi32(first_code), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(16));
    FOLD(0, c00, 0, lo) FOLD(0, c01, 1, hi) FOLD(1, c10, 0, lo) FOLD(1, c11, 1, hi)
    FOLD(2, c20, 0, lo) FOLD(2, c21, 1, hi) FOLD(3, c30, 0, lo) FOLD(3, c31, 1, hi)
    FOLD(4, c40, 0, lo) FOLD(4, c41, 1, hi) FOLD(5, c50, 0, lo) FOLD(5, c51, 1, hi)
    FOLD(6, c60, 0, lo) FOLD(6, c61, 1, hi) FOLD(7, c70, 0, lo) FOLD(7, c71, 1, hi)
    FOLD(8, c80, 0, lo) FOLD(8, c81, 1, hi) FOLD(9, c90, 0, lo) FOLD(9, c91, 1, hi)
    FOLD(10, cA0, 0, lo) FOLD(10, cA1, 1, hi) FOLD(11, cB0, 0, lo) FOLD(11, cB1, 1, hi)
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
        for (int64_t r = 0; r < rows; r++) { /* lowest value, then lowest index among the 32 lanes */
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
