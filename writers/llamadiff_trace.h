/* llamadiff_trace.h - drop-in writer of the llamadiff trace format, version 1
 * (spec: docs/trace-format.md). C99, header-only, libc only (plus POSIX mkdir/rmdir/getpid),
 * usable from C++. In exactly one translation unit:
 *
 *     #define LLAMADIFF_TRACE_IMPLEMENTATION
 *     #include "llamadiff_trace.h"
 *
 * Usage:
 *     ldt_trace *t = ldt_open("my-run", n_layer, tokens, n_tokens, n_prompt, "my-engine");
 *     ldt_add(t, 0, "blk.0.q", shape, 3, LDT_F32, host_ptr);    // data is copied
 *     if (ldt_close(t) != 0) { ... }                             // frees t in every case
 *
 * The data at the pointer is already in the given dtype (F32: float; F16/BF16: uint16_t bits,
 * see ldt_f32_to_f16 / ldt_f32_to_bf16), row-major, little-endian host assumed. Tensors are kept
 * in memory until ldt_close, which writes step-NNNN.safetensors per step and manifest.json (last)
 * into a hidden temporary folder next to the target, then renames it into place. On any error
 * ldt_close returns nonzero, removes the temporary folder and leaves the target untouched.
 * ldt_last_error(t) / ldt_close's stderr line say why.
 *
 * With CUDA (__CUDACC__ or LLAMADIFF_TRACE_CUDA defined): ldt_add_device takes a device pointer
 * and copies it to the host with cudaMemcpy (synchronous).
 */
#ifndef LLAMADIFF_TRACE_H
#define LLAMADIFF_TRACE_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LDT_F32 = 0, LDT_F16 = 1, LDT_BF16 = 2 } ldt_dtype;
typedef struct ldt_trace ldt_trace;

/* NULL on error (bad arguments, target exists, out of memory; a line on stderr). */
ldt_trace *ldt_open(const char *out_dir, int n_layer, const int32_t *tokens, int n_tokens,
                    int n_prompt, const char *engine_name);
/* 0 on success; nonzero (and a message in ldt_last_error) for a step out of range, a site twice,
 * an invalid name, a bad shape or dtype. A failed add leaves the trace usable. */
int ldt_add(ldt_trace *t, int step, const char *site, const int64_t *shape, int ndim,
            ldt_dtype dtype, const void *host_data);
int ldt_close(ldt_trace *t);                /* 0 on success; always frees t */
void ldt_abort(ldt_trace *t);               /* drop everything, write nothing; frees t */
const char *ldt_last_error(const ldt_trace *t);
/* Optional: state a layout dim ("D", "F", "H", "Hkv", "Dh", "V") in the manifest's "dims". The
 * reader checks the tensors against them, and with H/Hkv and Dh it accepts projections stored flat
 * as (T, n_head * head_dim) for the (T, H, Dh) sites. 0 on success. */
int ldt_set_dim(ldt_trace *t, const char *name, int64_t value);
/* Set token i of the run (a decode input an engine picks greedily while it runs: open the trace
 * with placeholders, set each as it is chosen, before close). 0 on success. */
int ldt_set_token(ldt_trace *t, int i, int32_t token);
uint16_t ldt_f32_to_f16(float x);           /* round to nearest even */
uint16_t ldt_f32_to_bf16(float x);          /* round to nearest even */

#if defined(__CUDACC__) || defined(LLAMADIFF_TRACE_CUDA)
int ldt_add_device(ldt_trace *t, int step, const char *site, const int64_t *shape, int ndim,
                   ldt_dtype dtype, const void *device_data);
#endif

#ifdef __cplusplus
}
#endif
#endif /* LLAMADIFF_TRACE_H */

#ifdef LLAMADIFF_TRACE_IMPLEMENTATION
#ifndef LLAMADIFF_TRACE_IMPLEMENTED
#define LLAMADIFF_TRACE_IMPLEMENTED
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <time.h>
#include <sys/stat.h>
#ifdef _WIN32
#include <direct.h>
#include <process.h>
#define ldt__mkdir(p) _mkdir(p)
#define ldt__rmdir(p) _rmdir(p)
#define ldt__getpid() _getpid()
#else
#include <unistd.h>
#define ldt__mkdir(p) mkdir((p), 0755)
#define ldt__rmdir(p) rmdir(p)
#define ldt__getpid() getpid()
#endif
#if defined(__CUDACC__) || defined(LLAMADIFF_TRACE_CUDA)
#include <cuda_runtime.h>
#endif

#define LDT__MAXDIM 8

typedef struct {
    int step, ndim;
    char *site;
    int64_t shape[LDT__MAXDIM];
    ldt_dtype dtype;
    void *data;
    size_t nbytes;
} ldt__tensor;

struct ldt_trace {
    char *out_dir, *engine;
    int n_layer, n_tokens, n_prompt;
    int32_t *tokens;
    ldt__tensor *tensors;
    size_t n, cap;
    char dim_names[8][4];
    int64_t dim_values[8];
    int n_dims;
    char err[512];
};

static const char *ldt__tags[3] = {"F32", "F16", "BF16"};

static char *ldt__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = (char *)malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int ldt__exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

const char *ldt_last_error(const ldt_trace *t) { return t ? t->err : "no trace"; }

int ldt_set_token(ldt_trace *t, int i, int32_t token) {
    if (!t) return 1;
    if (i < 0 || i >= t->n_tokens || token < 0) {
        snprintf(t->err, sizeof t->err, "token %d at index %d out of range (0..%d)", (int)token, i, t->n_tokens - 1);
        return 1;
    }
    t->tokens[i] = token;
    return 0;
}

int ldt_set_dim(ldt_trace *t, const char *name, int64_t value) {
    static const char *known[6] = {"D", "F", "H", "Hkv", "Dh", "V"};
    int i, k;
    if (!t || !name) return 1;
    for (k = 0; k < 6 && strcmp(name, known[k]) != 0; ++k) {}
    if (k == 6 || value < 1) { snprintf(t->err, sizeof t->err, "bad dim %.20s = %lld", name, (long long)value); return 1; }
    for (i = 0; i < t->n_dims && strcmp(t->dim_names[i], name) != 0; ++i) {}
    if (i == t->n_dims) t->n_dims++;
    strcpy(t->dim_names[i], name);
    t->dim_values[i] = value;
    return 0;
}

ldt_trace *ldt_open(const char *out_dir, int n_layer, const int32_t *tokens, int n_tokens,
                    int n_prompt, const char *engine_name) {
    ldt_trace *t;
    if (!out_dir || !*out_dir || n_layer < 1 || !tokens || n_prompt < 1 || n_prompt > n_tokens) {
        fprintf(stderr, "llamadiff_trace: bad arguments to ldt_open (need n_layer >= 1, "
                        "1 <= n_prompt <= n_tokens)\n");
        return NULL;
    }
    if (ldt__exists(out_dir)) {
        fprintf(stderr, "llamadiff_trace: %s already exists\n", out_dir);
        return NULL;
    }
    t = (ldt_trace *)calloc(1, sizeof *t);
    if (!t) return NULL;
    t->out_dir = ldt__strdup(out_dir);
    t->engine = ldt__strdup(engine_name ? engine_name : "unknown");
    t->tokens = (int32_t *)malloc(sizeof(int32_t) * (size_t)n_tokens);
    if (!t->out_dir || !t->engine || !t->tokens) { ldt_abort(t); return NULL; }
    memcpy(t->tokens, tokens, sizeof(int32_t) * (size_t)n_tokens);
    t->n_layer = n_layer; t->n_tokens = n_tokens; t->n_prompt = n_prompt;
    return t;
}

/* Site names are written into JSON unescaped: allow only [a-z0-9_.] and check the layer. */
static int ldt__check_site(ldt_trace *t, const char *site) {
    const char *p;
    if (!*site) return 0;
    for (p = site; *p; ++p)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '.')) return 0;
    if (strncmp(site, "blk.", 4) == 0) {
        char *end;
        long layer = strtol(site + 4, &end, 10);
        if (end == site + 4 || *end != '.' || layer < 0 || layer >= t->n_layer) return 0;
    }
    return 1;
}

int ldt_add(ldt_trace *t, int step, const char *site, const int64_t *shape, int ndim,
            ldt_dtype dtype, const void *host_data) {
    size_t i, count = 1;
    ldt__tensor *x;
    if (!t || !site || !shape || !host_data) return 1;
    if (step < 0 || step > t->n_tokens - t->n_prompt) {
        snprintf(t->err, sizeof t->err, "step %d out of range 0..%d", step, t->n_tokens - t->n_prompt);
        return 1;
    }
    if (!ldt__check_site(t, site)) {
        snprintf(t->err, sizeof t->err, "%d/%.200s: invalid site name or layer", step, site);
        return 1;
    }
    if (ndim < 1 || ndim > LDT__MAXDIM || (int)dtype < 0 || (int)dtype > 2) {
        snprintf(t->err, sizeof t->err, "%d/%s: bad ndim or dtype", step, site);
        return 1;
    }
    for (i = 0; i < (size_t)ndim; ++i) {
        if (shape[i] < 1) { snprintf(t->err, sizeof t->err, "%d/%s: bad shape", step, site); return 1; }
        count *= (size_t)shape[i];
    }
    for (i = 0; i < t->n; ++i)
        if (t->tensors[i].step == step && strcmp(t->tensors[i].site, site) == 0) {
            snprintf(t->err, sizeof t->err, "%d/%s added twice", step, site);
            return 1;
        }
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        ldt__tensor *grown = (ldt__tensor *)realloc(t->tensors, cap * sizeof *grown);
        if (!grown) { snprintf(t->err, sizeof t->err, "out of memory"); return 1; }
        t->tensors = grown; t->cap = cap;
    }
    x = &t->tensors[t->n];
    memset(x, 0, sizeof *x);
    x->step = step; x->ndim = ndim; x->dtype = dtype;
    x->nbytes = count * (dtype == LDT_F32 ? 4 : 2);
    memcpy(x->shape, shape, sizeof(int64_t) * (size_t)ndim);
    x->site = ldt__strdup(site);
    x->data = malloc(x->nbytes);
    if (!x->site || !x->data) {
        free(x->site); free(x->data);
        snprintf(t->err, sizeof t->err, "out of memory");
        return 1;
    }
    memcpy(x->data, host_data, x->nbytes);
    t->n++;
    return 0;
}

#if defined(__CUDACC__) || defined(LLAMADIFF_TRACE_CUDA)
int ldt_add_device(ldt_trace *t, int step, const char *site, const int64_t *shape, int ndim,
                   ldt_dtype dtype, const void *device_data) {
    size_t i, nbytes = dtype == LDT_F32 ? 4 : 2;
    void *host;
    int rc;
    cudaError_t ce;
    if (!t || !shape || ndim < 1 || ndim > LDT__MAXDIM) return 1;
    for (i = 0; i < (size_t)ndim; ++i) nbytes *= (size_t)(shape[i] > 0 ? shape[i] : 0);
    host = malloc(nbytes ? nbytes : 1);
    if (!host) { snprintf(t->err, sizeof t->err, "out of memory"); return 1; }
    ce = cudaMemcpy(host, device_data, nbytes, cudaMemcpyDeviceToHost);
    if (ce != cudaSuccess) {
        snprintf(t->err, sizeof t->err, "%d/%s: cudaMemcpy: %s", step, site, cudaGetErrorString(ce));
        free(host);
        return 1;
    }
    rc = ldt_add(t, step, site, shape, ndim, dtype, host);
    free(host);
    return rc;
}
#endif

/* Growable string for headers and the manifest. */
typedef struct { char *s; size_t n, cap; int oom; } ldt__buf;

static void ldt__put(ldt__buf *b, const char *fmt, ...) {
    va_list ap;
    int k;
    if (b->oom) return;
    for (;;) {
        size_t room = b->cap - b->n;
        va_start(ap, fmt);
        k = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (k < 0) { b->oom = 1; return; }
        if (b->s && (size_t)k < room) { b->n += (size_t)k; return; }
        {
            size_t cap = (b->cap ? 2 * b->cap : 1024) + (size_t)k + 1;
            char *s = (char *)realloc(b->s, cap);
            if (!s) { b->oom = 1; return; }
            b->s = s; b->cap = cap;
        }
    }
}

static void ldt__shape(ldt__buf *b, const ldt__tensor *x) {
    int d;
    ldt__put(b, "[");
    for (d = 0; d < x->ndim; ++d) ldt__put(b, "%s%lld", d ? "," : "", (long long)x->shape[d]);
    ldt__put(b, "]");
}

/* One safetensors file with the tensors of `step`, in the order they were added. */
static int ldt__write_step(ldt_trace *t, const char *path, int step) {
    ldt__buf h = {NULL, 0, 0, 0};
    size_t i;
    uint64_t off = 0, n;
    unsigned char len[8];
    int d, ok;
    FILE *f;
    ldt__put(&h, "{\"__metadata__\":{\"format\":\"pt\",\"step\":\"%d\"}", step);
    for (i = 0; i < t->n; ++i) {
        const ldt__tensor *x = &t->tensors[i];
        if (x->step != step) continue;
        ldt__put(&h, ",\"%d/%s\":{\"dtype\":\"%s\",\"shape\":", step, x->site, ldt__tags[x->dtype]);
        ldt__shape(&h, x);
        ldt__put(&h, ",\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                 (unsigned long long)(off + x->nbytes));
        off += x->nbytes;
    }
    ldt__put(&h, "}");
    while (!h.oom && (8 + h.n) % 8) ldt__put(&h, " ");     /* data starts 8-aligned */
    if (h.oom) { free(h.s); return 1; }
    n = h.n;
    for (d = 0; d < 8; ++d) len[d] = (unsigned char)(n >> (8 * d));
    f = fopen(path, "wb");
    if (!f) { free(h.s); return 1; }
    ok = fwrite(len, 1, 8, f) == 8 && fwrite(h.s, 1, h.n, f) == h.n;
    for (i = 0; ok && i < t->n; ++i)
        if (t->tensors[i].step == step)
            ok = fwrite(t->tensors[i].data, 1, t->tensors[i].nbytes, f) == t->tensors[i].nbytes;
    ok = (fclose(f) == 0) && ok;
    free(h.s);
    return !ok;
}

static void ldt__free(ldt_trace *t) {
    size_t i;
    if (!t) return;
    for (i = 0; i < t->n; ++i) { free(t->tensors[i].site); free(t->tensors[i].data); }
    free(t->tensors); free(t->tokens); free(t->engine); free(t->out_dir); free(t);
}

void ldt_abort(ldt_trace *t) { ldt__free(t); }

int ldt_close(ldt_trace *t) {
    int n_steps, s, rc = 1, made_dir = 0;
    size_t i, len;
    char *tmp = NULL, *path = NULL, *slash;
    ldt__buf m = {NULL, 0, 0, 0};
    FILE *f;
    if (!t) return 1;
    n_steps = t->n_tokens - t->n_prompt;
    if (t->n == 0) { snprintf(t->err, sizeof t->err, "no tensors were added"); goto done; }
    /* temporary folder next to the target: DIR/.NAME.tmp-PID-RANDOM */
    len = strlen(t->out_dir);
    while (len > 1 && t->out_dir[len - 1] == '/') t->out_dir[--len] = 0;
    tmp = (char *)malloc(len + 64);
    path = (char *)malloc(len + 96);
    if (!tmp || !path) { snprintf(t->err, sizeof t->err, "out of memory"); goto done; }
    slash = strrchr(t->out_dir, '/');
    srand((unsigned)time(NULL) ^ (unsigned)(size_t)t);
    snprintf(tmp, len + 64, "%.*s.%s.tmp-%ld-%08x", slash ? (int)(slash - t->out_dir + 1) : 0,
             t->out_dir, slash ? slash + 1 : t->out_dir, (long)ldt__getpid(),
             (unsigned)rand() ^ ((unsigned)rand() << 16));
    if (ldt__mkdir(tmp) != 0) { snprintf(t->err, sizeof t->err, "cannot create %s", tmp); goto done; }
    made_dir = 1;
    for (s = 0; s <= n_steps; ++s) {
        for (i = 0; i < t->n && t->tensors[i].step != s; ++i) {}
        if (i == t->n) continue;                                /* no tensors at this step */
        snprintf(path, len + 96, "%s/step-%04d.safetensors", tmp, s);
        if (ldt__write_step(t, path, s)) { snprintf(t->err, sizeof t->err, "cannot write %s", path); goto done; }
    }
    /* the manifest, written last */
    ldt__put(&m, "{\n \"format\": \"llamadiff-trace\",\n \"format_version\": 1,\n \"n_layer\": %d,\n \"tokens\": [",
             t->n_layer);
    for (s = 0; s < t->n_tokens; ++s) ldt__put(&m, "%s%ld", s ? ", " : "", (long)t->tokens[s]);
    ldt__put(&m, "],\n \"n_prompt\": %d,\n \"steps\": %d,\n \"engine\": {\"name\": \"", t->n_prompt, n_steps);
    for (slash = t->engine; *slash; ++slash)                     /* JSON-escape the engine name */
        if (*slash == '"' || *slash == '\\') ldt__put(&m, "\\%c", *slash);
        else if ((unsigned char)*slash < 0x20) ldt__put(&m, "\\u%04x", (unsigned)*slash);
        else ldt__put(&m, "%c", *slash);
    ldt__put(&m, "\"},\n");
    if (t->n_dims) {
        ldt__put(&m, " \"dims\": {");
        for (s = 0; s < t->n_dims; ++s)
            ldt__put(&m, "%s\"%s\": %lld", s ? ", " : "", t->dim_names[s], (long long)t->dim_values[s]);
        ldt__put(&m, "},\n");
    }
    ldt__put(&m, " \"tensors\": [");
    for (s = 0; s <= n_steps; ++s)
        for (i = 0; i < t->n; ++i) {
            const ldt__tensor *x = &t->tensors[i];
            if (x->step != s) continue;
            ldt__put(&m, "%s\n  {\"name\": \"%d/%s\", \"file\": \"step-%04d.safetensors\", \"dtype\": \"%s\", \"shape\": ",
                     m.s[m.n - 1] == '[' ? "" : ",", s, x->site, s, ldt__tags[x->dtype]);
            ldt__shape(&m, x);
            ldt__put(&m, "}");
        }
    ldt__put(&m, "\n ]\n}\n");
    if (m.oom) { snprintf(t->err, sizeof t->err, "out of memory"); goto done; }
    snprintf(path, len + 96, "%s/manifest.json", tmp);
    f = fopen(path, "wb");
    if (!f) { snprintf(t->err, sizeof t->err, "cannot write %s", path); goto done; }
    s = fwrite(m.s, 1, m.n, f) == m.n;
    if ((fclose(f) != 0) || !s) { snprintf(t->err, sizeof t->err, "cannot write %s", path); goto done; }
    if (ldt__exists(t->out_dir) || rename(tmp, t->out_dir) != 0) {
        snprintf(t->err, sizeof t->err, "cannot move the trace into place at %s", t->out_dir);
        goto done;
    }
    made_dir = 0;
    rc = 0;
done:
    if (made_dir) {                                              /* remove what was written */
        for (s = 0; s <= n_steps; ++s) {
            snprintf(path, len + 96, "%s/step-%04d.safetensors", tmp, s);
            remove(path);
        }
        snprintf(path, len + 96, "%s/manifest.json", tmp);
        remove(path);
        ldt__rmdir(tmp);
    }
    if (rc) fprintf(stderr, "llamadiff_trace: %s\n", t->err);
    free(m.s); free(tmp); free(path);
    ldt__free(t);
    return rc;
}

uint16_t ldt_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t ldt_f32_to_f16(float x) {
    uint32_t u, sign, mant, r;
    int32_t e;
    memcpy(&u, &x, 4);
    sign = (u >> 16) & 0x8000u;
    e = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    mant = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);                             /* overflow: inf */
    if (e <= 0) {                                                              /* subnormal or 0 */
        uint32_t shift;
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        shift = (uint32_t)(14 - e);
        r = mant >> shift;
        if ((mant & ((1u << shift) - 1)) > (1u << (shift - 1)) ||
            ((mant & ((1u << shift) - 1)) == (1u << (shift - 1)) && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    r = ((uint32_t)e << 10) | (mant >> 13);
    if ((mant & 0x1fffu) > 0x1000u || ((mant & 0x1fffu) == 0x1000u && (r & 1u))) r++;   /* may carry into inf */
    return (uint16_t)(sign | r);
}
#endif /* LLAMADIFF_TRACE_IMPLEMENTED */
#endif /* LLAMADIFF_TRACE_IMPLEMENTATION */
