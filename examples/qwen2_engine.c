/* qwen2_engine.c - a tiny plain-float32 C99 Qwen2 engine that dumps every llamadiff site.
 *
 * Reads an F32 qwen2 GGUF (v3), runs the prefill of --tokens and --steps decode steps with an F32
 * KV cache (greedy, or teacher-forced on --decode-tokens), and writes a llamadiff trace to OUT_DIR
 * with the C writer (writers/llamadiff_trace.h).
 *
 *   gcc -std=c99 -O2 -o qwen2_engine examples/qwen2_engine.c -lm
 *   qwen2_engine MODEL.gguf OUT_DIR --tokens 1,2,3 --steps N [--decode-tokens 4,5] [--bug NAME]
 *                [--bug-layer L] [--store SITE=f16|bf16] [--last-logits]
 *
 * Planted bugs (--bug), the seed team's real mistakes:
 *   no_qkv_bias         q/k/v biases skipped (q == q_proj): first wrong op (0, 0, blk.0.q)
 *   kv_pos_stuck        decode steps (k >= 1) rotate their Q and K at position 0 instead of their
 *                       position (the prefill is right; cached K of earlier steps is untouched):
 *                       first wrong op (1, 0, blk.0.q_rope)
 *   lm_head_transposed  logits read output.weight (V rows of D) as if it were (D, V) row-major:
 *                       logits[t][v] = sum_d h[t][d] * W[d*V + v]: first wrong op (0, -, logits)
 *   q_wrong_lane        when forming scores, query head h reads q_rope head (h+1) % H (the dumped
 *                       q_rope is right): first wrong op (0, 0, blk.0.kq)
 * --bug-layer L plants a layer's bug (all but lm_head_transposed) in layer L only.
 * --store SITE=f16|bf16 holds one activation (a full site name, e.g. embd or blk.0.attn_norm) in
 * half precision: rounded where it is made, used rounded downstream, dumped with that dtype (a
 * small upstream numeric difference that is not a bug). --last-logits dumps the last logits row only.
 * Exit 0 on success, 1 with one line on stderr on bad input or failure.
 */
#define LLAMADIFF_TRACE_IMPLEMENTATION
#include "../writers/llamadiff_trace.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static void die(const char *fmt, const char *a) {
    fprintf(stderr, "qwen2_engine: ");
    fprintf(stderr, fmt, a);
    fputc('\n', stderr);
    exit(1);
}

/* ---- GGUF ---------------------------------------------------------------------------------- */
static unsigned char *G; static size_t GN, GP;
static void need(size_t n) { if (GP + n > GN || GP + n < GP) die("%s: truncated GGUF", "model"); }
static uint64_t rd(int n) { uint64_t v = 0; int i; need(n); for (i = 0; i < n; i++) v |= (uint64_t)G[GP + i] << (8 * i); GP += n; return v; }
static const char *rstr(uint64_t *len) { const char *s; *len = rd(8); need(*len); s = (const char *)G + GP; GP += *len; return s; }
static size_t type_size(uint32_t t) {
    switch (t) { case 0: case 1: case 7: return 1; case 2: case 3: return 2; case 4: case 5: case 6: return 4;
                 case 10: case 11: case 12: return 8; default: return 0; }
}
static double num_value(uint32_t t) {  /* reads one scalar of type t */
    uint64_t v; float f; double d;
    switch (t) {
    case 6: v = rd(4); { uint32_t u = (uint32_t)v; memcpy(&f, &u, 4); } return f;
    case 12: v = rd(8); memcpy(&d, &v, 8); return d;
    case 1: return (int8_t)rd(1); case 3: return (int16_t)rd(2); case 5: return (int32_t)rd(4);
    case 11: return (double)(int64_t)rd(8);
    default: { size_t s = type_size(t); if (!s) die("%s: bad GGUF value type", "model"); return (double)rd((int)s); }
    }
}
static void skip_value(uint32_t t) {
    uint64_t n, i, len;
    if (t == 8) { rstr(&len); return; }
    if (t == 9) {
        uint32_t et = (uint32_t)rd(4); n = rd(8);
        if (et == 8) { for (i = 0; i < n; i++) rstr(&len); }
        else if (et == 9) die("%s: nested GGUF arrays are not supported", "model");
        else { size_t s = type_size(et); if (!s) die("%s: bad GGUF array type", "model");
               if (n > (GN - GP) / s) die("%s: truncated GGUF", "model");
               GP += n * s; }
        return;
    }
    if (!type_size(t)) die("%s: bad GGUF value type", "model");
    rd((int)type_size(t));
}

typedef struct { char name[96]; int nd; uint64_t ne[4]; uint32_t type; uint64_t off; } tinfo;
static tinfo *TI; static uint64_t NT; static size_t DATA;

static const float *tensor(const char *name, uint64_t n0, uint64_t n1) {
    uint64_t i;
    for (i = 0; i < NT; i++) if (!strcmp(TI[i].name, name)) {
        tinfo *t = &TI[i];
        if (t->type != 0) die("tensor %s is not F32 (this example reads F32 GGUFs only)", name);
        if (t->ne[0] != n0 || (t->nd > 1 ? t->ne[1] : 1) != n1) die("tensor %s has an unexpected shape", name);
        if (DATA + t->off + n0 * n1 * 4 > GN) die("tensor %s lies past the end of the file", name);
        return (const float *)(G + DATA + t->off);
    }
    die("tensor %s is missing", name);
    return NULL;
}

static int has_tensor(const char *name) {
    uint64_t i; for (i = 0; i < NT; i++) if (!strcmp(TI[i].name, name)) return 1;
    return 0;
}

/* ---- model --------------------------------------------------------------------------------- */
static int NL, D, F, H, HKV, DH, V; static double BASE = 10000.0, EPS = 1e-6;
typedef struct { const float *an, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *fn, *wg, *wu, *wd; } layer;

static void matmul(float *y, const float *x, const float *w, int T, int n_in, int n_out) {  /* y = x W^T */
    int t, o, i;
    for (t = 0; t < T; t++) for (o = 0; o < n_out; o++) {
        const float *wr = w + (size_t)o * n_in, *xr = x + (size_t)t * n_in; double s = 0;
        for (i = 0; i < n_in; i++) s += (double)xr[i] * wr[i];
        y[(size_t)t * n_out + o] = (float)s;
    }
}
static void rmsnorm(float *y, const float *x, const float *w, int T) {
    int t, i;
    for (t = 0; t < T; t++) {
        double ss = 0; float sc;
        for (i = 0; i < D; i++) ss += (double)x[t * D + i] * x[t * D + i];
        sc = (float)(1.0 / sqrt(ss / D + EPS));
        for (i = 0; i < D; i++) y[t * D + i] = x[t * D + i] * sc * w[i];
    }
}
static void rope(float *x, int T, int nh, const int *pos) {  /* NEOX: dim i pairs with i + Dh/2 */
    int t, h, i, half = DH / 2;
    for (t = 0; t < T; t++) for (h = 0; h < nh; h++) {
        float *v = x + ((size_t)t * nh + h) * DH;
        for (i = 0; i < half; i++) {
            double th = pos[t] * pow(BASE, -2.0 * i / DH), c = cos(th), s = sin(th);
            float a = v[i], b = v[i + half];
            v[i] = (float)(a * c - b * s); v[i + half] = (float)(a * s + b * c);
        }
    }
}

static ldt_trace *TR;
/* --store SITE=f16|bf16: the engine holds that activation in half precision (rounded in place,
 * used so downstream) and dumps it with that dtype; --last-logits: logits of the last row only. */
static const char *STORE_SITE = ""; static ldt_dtype STORE_TYPE = LDT_F32; static int LAST_LOGITS = 0;
static float half_to_f32(uint16_t h, ldt_dtype dt) {
    uint32_t u, sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023; float f;
    if (dt == LDT_BF16) u = (uint32_t)h << 16;
    else if (e == 31) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else { f = ldexpf((float)m, -24); return sign ? -f : f; }
    memcpy(&f, &u, 4); return f;
}
static void dump(int step, const char *site, int layer_i, float *data, int nd, int64_t a, int64_t b, int64_t c) {
    char name[64]; int64_t shape[3], n = a * (nd > 1 ? b : 1) * (nd > 2 ? c : 1), i; int rc;
    shape[0] = a; shape[1] = b; shape[2] = c;
    if (layer_i >= 0) sprintf(name, "blk.%d.%s", layer_i, site); else sprintf(name, "%s", site);
    if (LAST_LOGITS && !strcmp(name, "logits") && a > 1) { data += (a - 1) * b; shape[0] = a = 1; n = b; }
    if (STORE_TYPE != LDT_F32 && !strcmp(name, STORE_SITE)) {
        uint16_t *h = malloc((size_t)n * 2);
        for (i = 0; i < n; i++) {
            h[i] = STORE_TYPE == LDT_F16 ? ldt_f32_to_f16(data[i]) : ldt_f32_to_bf16(data[i]);
            data[i] = half_to_f32(h[i], STORE_TYPE);
        }
        rc = ldt_add(TR, step, name, shape, nd, STORE_TYPE, h); free(h);
    } else rc = ldt_add(TR, step, name, shape, nd, LDT_F32, data);
    if (rc) { fprintf(stderr, "qwen2_engine: %s\n", ldt_last_error(TR)); ldt_abort(TR); exit(1); }
}

static int parse_list(const char *s, int **out) {
    int n = 0, cap = 16; char *end; *out = malloc(cap * sizeof **out);
    if (!*s) return 0;
    for (;;) {
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 0x7fffffff) die("bad token list: %s", s);
        if (n == cap) *out = realloc(*out, (cap *= 2) * sizeof **out);
        (*out)[n++] = (int)v;
        if (*end == 0) return n;
        if (*end != ',') die("bad token list: %s", s);
        s = end + 1;
    }
}

int main(int argc, char **argv) {
    const char *model = NULL, *outdir = NULL, *bug = "", *toks = NULL, *dtoks = NULL;
    int steps = 0, n_prompt, n_forced = 0, *prompt = NULL, *forced = NULL, a, i;
    int b_bias = 0, b_pos = 0, b_lm = 0, b_lane = 0, bug_layer = -1;
    uint64_t n_kv, k; uint32_t align = 32; FILE *fp; long sz;
    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--tokens") && a + 1 < argc) toks = argv[++a];
        else if (!strcmp(argv[a], "--decode-tokens") && a + 1 < argc) dtoks = argv[++a];
        else if (!strcmp(argv[a], "--steps") && a + 1 < argc) { char *e; steps = (int)strtol(argv[++a], &e, 10);
            if (*e || steps < 0 || steps > 100000) die("bad --steps: %s", argv[a]); }
        else if (!strcmp(argv[a], "--bug") && a + 1 < argc) bug = argv[++a];
        else if (!strcmp(argv[a], "--bug-layer") && a + 1 < argc) { char *e; bug_layer = (int)strtol(argv[++a], &e, 10);
            if (*e || bug_layer < 0) die("bad --bug-layer: %s", argv[a]); }
        else if (!strcmp(argv[a], "--last-logits")) LAST_LOGITS = 1;
        else if (!strcmp(argv[a], "--store") && a + 1 < argc) { char *eq = strchr(argv[++a], '=');
            if (!eq || (strcmp(eq + 1, "f16") && strcmp(eq + 1, "bf16"))) die("bad --store (want SITE=f16 or SITE=bf16): %s", argv[a]);
            *eq = 0; STORE_SITE = argv[a]; STORE_TYPE = strcmp(eq + 1, "f16") ? LDT_BF16 : LDT_F16; }
        else if (argv[a][0] == '-' && argv[a][1] == '-') die("unknown or incomplete option: %s", argv[a]);
        else if (!model) model = argv[a];
        else if (!outdir) outdir = argv[a];
        else die("unexpected argument: %s", argv[a]);
    }
    if (!model || !outdir || !toks) die("%s", "usage: qwen2_engine MODEL.gguf OUT_DIR --tokens 1,2,3 --steps N [--decode-tokens ..] [--bug NAME [--bug-layer L]] [--store SITE=f16|bf16] [--last-logits]");
    if (!strcmp(bug, "no_qkv_bias")) b_bias = 1; else if (!strcmp(bug, "kv_pos_stuck")) b_pos = 1;
    else if (!strcmp(bug, "lm_head_transposed")) b_lm = 1; else if (!strcmp(bug, "q_wrong_lane")) b_lane = 1;
    else if (*bug) die("unknown --bug %s (no_qkv_bias, kv_pos_stuck, lm_head_transposed, q_wrong_lane)", bug);
    n_prompt = parse_list(toks, &prompt);
    if (n_prompt < 1) die("%s", "empty --tokens");
    if (dtoks) { n_forced = parse_list(dtoks, &forced); if (n_forced > steps) die("%s", "more --decode-tokens than --steps"); }

    /* read the whole file */
    if (!(fp = fopen(model, "rb"))) die("cannot open %s", model);
    fseek(fp, 0, SEEK_END); sz = ftell(fp); fseek(fp, 0, SEEK_SET);
    if (sz <= 0) die("%s: empty or unreadable", model);
    G = malloc((size_t)sz); GN = (size_t)sz;
    if (!G || fread(G, 1, GN, fp) != GN) die("%s: read failed", model);
    fclose(fp);
    if (GN < 24 || memcmp(G, "GGUF", 4)) die("%s: not a GGUF file", model);
    GP = 4; if (rd(4) != 3) die("%s: only GGUF version 3 is supported", model);
    NT = rd(8); n_kv = rd(8);
    if (NT > GN / 24) die("%s: bad tensor count", model);
    D = F = H = HKV = NL = 0;
    for (k = 0; k < n_kv; k++) {
        uint64_t len; const char *key = rstr(&len); char kb[128]; uint32_t t = (uint32_t)rd(4);
        int n = len < sizeof kb - 1 ? (int)len : (int)sizeof kb - 1; memcpy(kb, key, n); kb[n] = 0;
        if (!strcmp(kb, "general.architecture")) {
            uint64_t l; const char *s; if (t != 8) die("%s: bad general.architecture", model);
            s = rstr(&l); if (l != 5 || memcmp(s, "qwen2", 5)) die("%s: not a qwen2 GGUF", model);
        }
        else if (t != 8 && t != 9 && (!strcmp(kb, "general.alignment") || !strncmp(kb, "qwen2.", 6))) {
            double v = num_value(t);
            if (!strcmp(kb, "general.alignment")) align = (uint32_t)v;
            else if (!strcmp(kb, "qwen2.block_count")) NL = (int)v;
            else if (!strcmp(kb, "qwen2.embedding_length")) D = (int)v;
            else if (!strcmp(kb, "qwen2.feed_forward_length")) F = (int)v;
            else if (!strcmp(kb, "qwen2.attention.head_count")) H = (int)v;
            else if (!strcmp(kb, "qwen2.attention.head_count_kv")) HKV = (int)v;
            else if (!strcmp(kb, "qwen2.rope.freq_base")) BASE = v;
            else if (!strcmp(kb, "qwen2.attention.layer_norm_rms_epsilon")) EPS = v;
        } else skip_value(t);
    }
    if (align == 0 || (align & (align - 1))) die("%s: bad general.alignment", model);
    if (bug_layer >= 0 && !*bug) die("%s", "--bug-layer needs --bug");
    if (NL < 1 || D < 1 || F < 1 || H < 1 || HKV < 1 || H % HKV || D % H) die("%s: missing or bad qwen2 hyperparameters", model);
    DH = D / H; if (DH % 2) die("%s: odd head size", model);
    TI = calloc((size_t)NT, sizeof *TI);
    for (k = 0; k < NT; k++) {
        uint64_t len; const char *nm = rstr(&len); int d;
        if (len >= sizeof TI[k].name) die("%s: tensor name too long", model);
        memcpy(TI[k].name, nm, len); TI[k].nd = (int)rd(4);
        if (TI[k].nd < 1 || TI[k].nd > 4) die("%s: bad tensor rank", model);
        for (d = 0; d < TI[k].nd; d++) TI[k].ne[d] = rd(8);
        TI[k].type = (uint32_t)rd(4); TI[k].off = rd(8);
    }
    DATA = (GP + align - 1) / align * align;
    V = 0; for (k = 0; k < NT; k++) if (!strcmp(TI[k].name, "token_embd.weight")) V = (int)TI[k].ne[1];
    if (V < 1) die("%s: no token_embd.weight", model);
    for (i = 0; i < n_prompt; i++) if (prompt[i] >= V) die("token id out of range: %s", toks);
    for (i = 0; i < n_forced; i++) if (forced[i] >= V) die("token id out of range: %s", dtoks);

    {
        const float *emb = tensor("token_embd.weight", D, V), *onw = tensor("output_norm.weight", D, 1);
        const float *wout = has_tensor("output.weight") ? tensor("output.weight", D, V) : emb;  /* tied */
        layer *L = calloc(NL, sizeof *L); int l, n_tok = n_prompt + steps, step, P_max = n_tok;
        int KD = HKV * DH, g = H / HKV;
        int32_t *all = malloc(n_tok * sizeof *all);
        float **kc = malloc(NL * sizeof *kc), **vc = malloc(NL * sizeof *vc);
        size_t TD = (size_t)n_prompt * D;
        float *x = malloc(TD * 4), *hN = malloc(TD * 4), *q = malloc(TD * 4), *qp = malloc(TD * 4), *qr = malloc(TD * 4);
        float *kp = malloc(n_prompt * KD * 4), *kk = malloc(n_prompt * KD * 4), *kr = malloc(n_prompt * KD * 4);
        float *vp = malloc(n_prompt * KD * 4), *vv = malloc(n_prompt * KD * 4);
        float *kq = malloc((size_t)H * n_prompt * P_max * 4), *aw = malloc((size_t)H * n_prompt * P_max * 4);
        float *kqv = malloc(TD * 4), *ao = malloc(TD * 4), *r = malloc(TD * 4), *fo = malloc(TD * 4);
        float *ga = malloc((size_t)n_prompt * F * 4), *up = malloc((size_t)n_prompt * F * 4), *ac = malloc((size_t)n_prompt * F * 4);
        float *lo = malloc((size_t)n_prompt * V * 4);
        int *pos = malloc(n_prompt * sizeof *pos);
        char nm[64];
        for (l = 0; l < NL; l++) {
#define W(f, s, a0, a1) sprintf(nm, "blk.%d." s, l), L[l].f = tensor(nm, a0, a1)
            W(an, "attn_norm.weight", D, 1); W(wq, "attn_q.weight", D, D); W(bq, "attn_q.bias", D, 1);
            W(wk, "attn_k.weight", D, KD); W(bk, "attn_k.bias", KD, 1); W(wv, "attn_v.weight", D, KD);
            W(bv, "attn_v.bias", KD, 1); W(wo, "attn_output.weight", D, D); W(fn, "ffn_norm.weight", D, 1);
            W(wg, "ffn_gate.weight", D, F); W(wu, "ffn_up.weight", D, F); W(wd, "ffn_down.weight", F, D);
            kc[l] = malloc((size_t)P_max * KD * 4); vc[l] = malloc((size_t)P_max * KD * 4);
        }
        for (i = 0; i < n_prompt; i++) all[i] = prompt[i];
        /* Greedy tokens are only known as decoding goes: the trace opens with placeholders (0) for
         * the decode inputs and each is set with ldt_set_token as it is picked. */
        for (i = n_prompt; i < n_tok; i++) all[i] = 0;
        TR = ldt_open(outdir, NL, all, n_tok, n_prompt, "qwen2_engine.c");
        if (!TR) exit(1);
        ldt_set_dim(TR, "H", H); ldt_set_dim(TR, "Hkv", HKV); ldt_set_dim(TR, "Dh", DH);
        for (step = 0; step <= steps; step++) {
            int T = step == 0 ? n_prompt : 1, p0 = step == 0 ? 0 : n_prompt + step - 1, P = p0 + T, t, h, p, j;
            const int32_t *tk = all + p0;
            for (t = 0; t < T; t++) pos[t] = p0 + t;
            for (t = 0; t < T; t++) memcpy(x + (size_t)t * D, emb + (size_t)tk[t] * D, D * 4);
            dump(step, "embd", -1, x, 2, T, D, 0);
            for (l = 0; l < NL; l++) {
                layer *y = &L[l];
                int on = bug_layer < 0 || l == bug_layer;   /* the layer bugs act in this layer */
                int *rp = pos, stuck[1] = {0};
                if (b_pos && on && step > 0) rp = stuck;      /* T == 1 at decode steps */
                rmsnorm(hN, x, y->an, T); dump(step, "attn_norm", l, hN, 2, T, D, 0);
                matmul(qp, hN, y->wq, T, D, D); dump(step, "q_proj", l, qp, 3, T, H, DH);
                matmul(kp, hN, y->wk, T, D, KD); dump(step, "k_proj", l, kp, 3, T, HKV, DH);
                matmul(vp, hN, y->wv, T, D, KD); dump(step, "v_proj", l, vp, 3, T, HKV, DH);
                for (t = 0; t < T; t++) {
                    for (j = 0; j < D; j++) q[t * D + j] = qp[t * D + j] + (b_bias && on ? 0.f : y->bq[j]);
                    for (j = 0; j < KD; j++) { kk[t * KD + j] = kp[t * KD + j] + (b_bias && on ? 0.f : y->bk[j]);
                                               vv[t * KD + j] = vp[t * KD + j] + (b_bias && on ? 0.f : y->bv[j]); }
                }
                dump(step, "q", l, q, 3, T, H, DH); dump(step, "k", l, kk, 3, T, HKV, DH); dump(step, "v", l, vv, 3, T, HKV, DH);
                memcpy(qr, q, (size_t)T * D * 4); memcpy(kr, kk, (size_t)T * KD * 4);
                rope(qr, T, H, rp); rope(kr, T, HKV, rp);
                dump(step, "q_rope", l, qr, 3, T, H, DH); dump(step, "k_rope", l, kr, 3, T, HKV, DH);
                memcpy(kc[l] + (size_t)p0 * KD, kr, (size_t)T * KD * 4);
                memcpy(vc[l] + (size_t)p0 * KD, vv, (size_t)T * KD * 4);
                for (h = 0; h < H; h++) for (t = 0; t < T; t++) {
                    const float *qv = qr + (size_t)t * D + (size_t)(b_lane && on ? (h + 1) % H : h) * DH;
                    float *row = kq + ((size_t)h * T + t) * P, *wr = aw + ((size_t)h * T + t) * P;
                    double mx = -INFINITY, sum = 0;
                    for (p = 0; p < P; p++) {
                        const float *kv = kc[l] + (size_t)p * KD + (size_t)(h / g) * DH; double s = 0;
                        for (j = 0; j < DH; j++) s += (double)qv[j] * kv[j];
                        row[p] = (float)s;
                    }
                    for (p = 0; p <= p0 + t; p++) { double s = row[p] / sqrt((double)DH); if (s > mx) mx = s; }
                    for (p = 0; p < P; p++) { double e = p <= p0 + t ? exp(row[p] / sqrt((double)DH) - mx) : 0; wr[p] = (float)e; sum += e; }
                    for (p = 0; p < P; p++) wr[p] = (float)(wr[p] / sum);
                }
                dump(step, "kq", l, kq, 3, H, T, P); dump(step, "attn_weights", l, aw, 3, H, T, P);
                for (t = 0; t < T; t++) for (h = 0; h < H; h++) for (j = 0; j < DH; j++) {
                    double s = 0;
                    for (p = 0; p < P; p++) s += (double)aw[((size_t)h * T + t) * P + p] * vc[l][(size_t)p * KD + (size_t)(h / g) * DH + j];
                    kqv[(size_t)t * D + h * DH + j] = (float)s;
                }
                dump(step, "kqv", l, kqv, 3, T, H, DH);
                matmul(ao, kqv, y->wo, T, D, D); dump(step, "attn_out", l, ao, 2, T, D, 0);
                for (j = 0; j < T * D; j++) r[j] = x[j] + ao[j];
                dump(step, "ffn_inp", l, r, 2, T, D, 0);
                rmsnorm(hN, r, y->fn, T); dump(step, "ffn_norm", l, hN, 2, T, D, 0);
                matmul(ga, hN, y->wg, T, D, F); dump(step, "ffn_gate", l, ga, 2, T, F, 0);
                matmul(up, hN, y->wu, T, D, F); dump(step, "ffn_up", l, up, 2, T, F, 0);
                for (j = 0; j < T * F; j++) ac[j] = (float)(ga[j] / (1.0 + exp(-(double)ga[j])) * up[j]);
                dump(step, "ffn_act", l, ac, 2, T, F, 0);
                matmul(fo, ac, y->wd, T, F, D); dump(step, "ffn_out", l, fo, 2, T, D, 0);
                for (j = 0; j < T * D; j++) x[j] = r[j] + fo[j];
                dump(step, "l_out", l, x, 2, T, D, 0);
            }
            rmsnorm(hN, x, onw, T); dump(step, "output_norm", -1, hN, 2, T, D, 0);
            if (!b_lm) matmul(lo, hN, wout, T, D, V);
            else for (t = 0; t < T; t++) for (j = 0; j < V; j++) {   /* BUG: W read as (D, V) row-major */
                double s = 0; int d; for (d = 0; d < D; d++) s += (double)hN[t * D + d] * wout[(size_t)d * V + j];
                lo[(size_t)t * V + j] = (float)s;
            }
            dump(step, "logits", -1, lo, 2, T, V, 0);
            if (step < steps) {
                int next = 0;
                if (step < n_forced) next = forced[step];
                else { const float *last = lo + (size_t)(T - 1) * V; for (j = 1; j < V; j++) if (last[j] > last[next]) next = j; }
                all[n_prompt + step] = next;
                if (ldt_set_token(TR, n_prompt + step, next)) { fprintf(stderr, "qwen2_engine: %s\n", ldt_last_error(TR)); ldt_abort(TR); return 1; }
            }
        }
        return ldt_close(TR) ? 1 : 0;
    }
}
