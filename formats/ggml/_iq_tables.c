/* The i-quant tables of iq.h: registration from gguf-py's grids, and the quantiser's map and neighbour lists.
 *
 * The neighbour lists are ordered as ggml-quants.c's (a qsort of (distance, grid number) pairs), built here by
 * bucketing the small integer distances, which gives the same order. */
#include <stdlib.h>
#include <string.h>
#include "types.h"
#include "iq.h"

uint8_t qc_iq_ksigns[128];

/* slot, grid size, width, index bits, distinct distances kept, map size (ggml-quants.c's kmap_size) */
static qc_iq_table TABLES[6] = {
    {256, 8, 2, 2, 43692, NULL, NULL, NULL, NULL},   /* IQ2_XXS */
    {512, 8, 2, 2, 43692, NULL, NULL, NULL, NULL},   /* IQ2_XS */
    {1024, 8, 2, 1, 43692, NULL, NULL, NULL, NULL},  /* IQ2_S */
    {2048, 8, 2, 3, 43692, NULL, NULL, NULL, NULL},  /* IQ1_S, IQ1_M */
    {256, 4, 3, 2, 4096, NULL, NULL, NULL, NULL},    /* IQ3_XXS */
    {512, 4, 3, 3, 4096, NULL, NULL, NULL, NULL},    /* IQ3_S */
};

static qc_iq_table *slot(int type) {
    switch (type) {
        case QC_IQ2_XXS: return &TABLES[0];
        case QC_IQ2_XS: return &TABLES[1];
        case QC_IQ2_S: return &TABLES[2];
        case QC_IQ1_S: case QC_IQ1_M: return &TABLES[3];
        case QC_IQ3_XXS: return &TABLES[4];
        case QC_IQ3_S: return &TABLES[5];
        default: return NULL;
    }
}

const qc_iq_table *qc_iq_table_get(int type) {
    const qc_iq_table *t = slot(type);
    return t && t->values ? t : NULL;
}

int qc_iq_register_signs(const uint8_t *ksigns) { memcpy(qc_iq_ksigns, ksigns, sizeof qc_iq_ksigns); return 0; }

/* indices [points][width]: each point's level indices (0 .. 2^bits - 1); values: the levels as stored */
int qc_iq_register(int type, const uint8_t *indices, const int8_t *values, int64_t points) {
    qc_iq_table *t = slot(type);
    if (!t || points != t->size) return -1;
    if (t->values) return 0;
    const int64_t n = (int64_t)t->size * t->width;
    uint8_t *v = malloc(n), *p = malloc(n);
    if (!v || !p) { free(v); free(p); return -1; }
    for (int64_t i = 0; i < n; i++) {
        if (indices[i] >= (1u << t->bits)) { free(v); free(p); return -1; }
        v[i] = (uint8_t)values[i];
        p[i] = (uint8_t)(2 * indices[i] + 1);
    }
    t->pos = p;
    t->values = v;
    return 0;
}

/* squared distances from the point with packed indices `key` to every grid point */
static void distances(const qc_iq_table *t, int key, int *d2) {
    int q[8];
    for (int k = 0; k < t->width; k++) q[k] = 2 * ((key >> (t->bits * k)) & ((1 << t->bits) - 1)) + 1;
    for (int j = 0; j < t->size; j++) {
        const uint8_t *g = t->pos + (int64_t)j * t->width;
        int s = 0;
        for (int k = 0; k < t->width; k++) s += (g[k] - q[k]) * (g[k] - q[k]);
        d2[j] = s;
    }
}

/* the nwant smallest distinct distances in d2, ascending, into keep; returns how many there are and, in
 * *count, how many grid points lie at them */
static int nearest(const qc_iq_table *t, const int *d2, int *keep, int *count) {
    enum { MAXD = 8 * 15 * 15 + 1 };
    int hist[MAXD];
    memset(hist, 0, sizeof hist);
    for (int j = 0; j < t->size; j++) hist[d2[j]]++;
    int have = 0, n = 0;
    for (int d = 0; d < MAXD && have < t->nwant; d++)
        if (hist[d]) { keep[have++] = d; n += hist[d]; }
    *count = n;
    return have;
}

/* Builds map and neighbours (once; the caller serialises calls: codec.py holds a lock) */
int qc_iq_prepare(int type) {
    qc_iq_table *t = slot(type);
    if (!t || !t->values) return -1;
    if (t->neighbours) return 0;
    int *map = malloc(sizeof(int) * t->map_size), *d2 = malloc(sizeof(int) * t->size);
    if (!map || !d2) { free(map); free(d2); return -1; }
    for (int i = 0; i < t->map_size; i++) map[i] = -1;
    for (int j = 0; j < t->size; j++) {
        int key = 0;
        for (int k = 0; k < t->width; k++) key |= ((t->pos[(int64_t)j * t->width + k] - 1) / 2) << (t->bits * k);
        if (key < t->map_size) map[key] = j;
    }
    int64_t total = 0;
    for (int i = 0; i < t->map_size; i++) {
        if (map[i] >= 0) continue;
        int n, keep[8];
        distances(t, i, d2);
        nearest(t, d2, keep, &n);
        total += 1 + n;
    }
    uint16_t *nb = malloc(sizeof(uint16_t) * (total ? total : 1));
    if (!nb) { free(map); free(d2); return -1; }
    int64_t at = 0;
    for (int i = 0; i < t->map_size; i++) {
        if (map[i] >= 0) continue;
        int n, keep[8];
        distances(t, i, d2);
        const int have = nearest(t, d2, keep, &n);
        map[i] = -(int)(at + 1);
        nb[at++] = (uint16_t)n;
        for (int h = 0; h < have; h++)
            for (int j = 0; j < t->size; j++)
                if (d2[j] == keep[h]) nb[at++] = (uint16_t)j;
    }
    free(d2);
    t->map = map;
    t->neighbours = nb;
    return 0;
}
