/* GradPower CPU kernels: phi_p(x) = sign(x) |x|^p in place (times a clip coefficient), the sum of squares of
   phi_p(x) (read only: the norm that clipping needs), and one AdamW step on coef * phi_p(g) that reads each
   gradient once. Built at first use by hf_gradpower/kernels/cpu.py (no torch headers, plain C99 + OpenMP).

   One of three implementations is compiled, chosen by what the compiler targets:
     GP_IMPL 2  AVX-512F/DQ (x86-64-v4): p-form 2^(p e + p log2 m), getexp/getmant, 32-entry in-register
                table (a float pair) + quartic for log2 m, scalef.     ~30 vector ops per 16 floats
     GP_IMPL 3  AVX2 + FMA (x86-64-v3): q-form x 2^(q e + q log2 m), q = p - 1, exponent and mantissa by
                integer ops, polynomials only (no gathers: they are slow on AMD), log2 polynomial of degree 7,
                8 or 9 by |q| and the exp2 one evaluated by pairs (Estrin: about half the dependent fmas of
                Horner), 2^n by an integer add, four vectors per loop iteration.  About 33 / 36 / 37 vector ops
                per 8 floats (18 / 21 / 22 of them fma/mul; window check included)
     GP_IMPL 1  portable C (ARM NEON, other ISAs, or -DGP_PORTABLE): the same q-form per element, written so
                that the compiler auto-vectorises it (no libm calls in the loop).
   k[0..2] = (qh, ql, qf): q = p - 1 split so that qh * e is exact; k[3..5] = (ph, pl, pf): the same split of p.
   k[6], k[7]: the AVX2 fast path's input window [k6, k7) = [2^-E, 2^(E+1)) (see _window in kernels/cpu.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(GP_PORTABLE) && !defined(GP_AVX2)
#define GP_IMPL 2
#elif defined(__AVX2__) && defined(__FMA__) && !defined(GP_PORTABLE)
#define GP_IMPL 3
#else
#define GP_IMPL 1
#endif

#if GP_IMPL != 1
#include <immintrin.h>
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* round to nearest for |v| < 2^22 without SSE4.1 roundps; fmaf only where the hardware has FMA */
static inline float rnd(float v) { return (v + 12582912.0f) - 12582912.0f; }
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define GP_FMA(a, b, c) fmaf(a, b, c)
#else
#define GP_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* log2(1 + t), t in [sqrt(.5) - 1, sqrt(2) - 1): least-squares fit, abs. error 4e-9 */
#define GP_L1 1.4426948569633933f
#define GP_L2 -0.7213473797342324f
#define GP_L3 0.4809233950618538f
#define GP_L4 -0.3607061473839342f
#define GP_L5 0.2876271062024314f
#define GP_L6 -0.2387847038669843f
#define GP_L7 0.21787121693052805f
#define GP_L8 -0.20885216242562984f
#define GP_L9 0.1225040321092694f
/* 2^f, f in [-0.5, 0.5]: rel. error 2e-9 */
#define GP_E0 0.9999999999595286f
#define GP_E1 0.6931472067218104f
#define GP_E2 0.24022651213786558f
#define GP_E3 0.055503271903370205f
#define GP_E4 0.009618025577416789f
#define GP_E5 0.0013400441714101908f
#define GP_E6 0.00015469740156558607f

/* phi_p of one float, q-form: |x|^p = |x| * 2^(q*e + q*log2 m) with m in [sqrt(.5), sqrt(2)). Exact for zero,
   inf, nan; subnormal inputs and outputs handled. The portable loop and the AVX2 path's rare lanes use it. */
static inline float gp_phi1(float xi, float qh, float ql, float qf) {
  uint32_t b = f2u(xi);
  uint32_t a = b & 0x7fffffffu;
  int special = (a - 1u) >= 0x7f7fffffu;                /* zero, inf or nan: unchanged */
  int sub = a < 0x00800000u;
  float af = u2f(a) * (sub ? 16777216.0f : 1.0f);       /* normalise subnormals */
  int32_t ab = (int32_t)f2u(af) - 0x3f3504f3;
  int32_t e = (ab >> 23) - (sub ? 24 : 0);
  float m = u2f((uint32_t)(ab & 0x007fffff) + 0x3f3504f3u);
  float t = m - 1.0f;
  float L = t * (GP_L1 + t * (GP_L2 + t * (GP_L3 + t * (GP_L4 + t * (GP_L5 + t * (GP_L6 + t * (GP_L7
            + t * (GP_L8 + t * GP_L9))))))));
  float ef = (float)e;
  float ph = qh * ef;                                   /* exact */
  float n1 = rnd(ph);
  float f = GP_FMA(qf, L, (ph - n1) + ql * ef);
  float n2 = rnd(f);
  f = f - n2;
  float P = GP_E0 + f * (GP_E1 + f * (GP_E2 + f * (GP_E3 + f * (GP_E4 + f * (GP_E5 + f * GP_E6)))));
  float M = m * P;
  int32_t E = e + (int32_t)(n1 + n2);
  E = E < -252 ? -252 : (E > 254 ? 254 : E);
  int32_t E1 = E >> 1, E2 = E - E1;
  float r = (M * u2f((uint32_t)(E1 + 127) << 23)) * u2f((uint32_t)(E2 + 127) << 23);
  float res = u2f(f2u(r) | (b & 0x80000000u));
  return special ? xi : res;
}

/* ---------------------------------------------------------------------------------------------------- */
#if GP_IMPL == 2
typedef struct { __m512 inv0, inv1, lg0, lg1, lo0, lo1, ph, pl, pf, one, l1, l2, l3, l4, e[7]; __m512i sgn; } gp_consts;

static void gp_init(gp_consts *c, const float *k) {
  float tinv[32], tlog[32], tlo[32];
  for (int i = 0; i < 32; i++) {         /* centres of 32 mantissa cells; log2 of the rounded inverse */
    double ctr = 1.0 + (i + 0.5) / 32.0;  /* as a float pair: its rounding, times p, would cost 0.7 ulp */
    tinv[i] = (float)(1.0 / ctr);
    double lg = -log2((double)tinv[i]);
    tlog[i] = (float)lg;
    tlo[i] = (float)(lg - (double)tlog[i]);
  }
  c->inv0 = _mm512_loadu_ps(tinv); c->inv1 = _mm512_loadu_ps(tinv + 16);
  c->lg0 = _mm512_loadu_ps(tlog); c->lg1 = _mm512_loadu_ps(tlog + 16);
  c->lo0 = _mm512_loadu_ps(tlo); c->lo1 = _mm512_loadu_ps(tlo + 16);
  c->ph = _mm512_set1_ps(k[3]); c->pl = _mm512_set1_ps(k[4]); c->pf = _mm512_set1_ps(k[5]);
  c->one = _mm512_set1_ps(1.0f);
  /* log2(1+r), |r| <= 1/64: Taylor / ln 2 (truncation 3e-10) */
  c->l1 = _mm512_set1_ps(1.4426950408889634f); c->l2 = _mm512_set1_ps(-0.7213475204444817f);
  c->l3 = _mm512_set1_ps(0.48089834696298783f); c->l4 = _mm512_set1_ps(-0.36067376022224085f);
  /* 2^f on [-0.5, 0.5], least squares on Chebyshev nodes, rel. error 1.9e-9 */
  static const float ec[7] = {1.000000000592169f, 0.6931472056058905f, 0.24022646608042247f,
                              0.05550328985744751f, 0.009618519562708776f, 0.0013399865143695364f,
                              0.00015337580963355483f};
  for (int i = 0; i < 7; i++) c->e[i] = _mm512_set1_ps(ec[i]);
  c->sgn = _mm512_set1_epi32((int)0x80000000u);
}

/* phi_p on 16 lanes: |x|^p = 2^(p*e + p*log2 m), |x| = m 2^e; p*e = ph*e (exact) + pl*e. Zero, inf and
   nan lanes come back unchanged; the sign of x is copied onto |x|^p. */
static inline __m512 gp_phi16(__m512 v, const gp_consts *c) {
  __mmask16 ok = _mm512_fpclass_ps_mask(v, 0x9f) ^ (__mmask16)0xffff;
  __m512 e = _mm512_getexp_ps(v);                                       /* floor(log2|x|), subnormals ok */
  __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero); /* |x| / 2^e in [1, 2) */
  __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 18);           /* low 5 bits: mantissa top */
  __m512 r = _mm512_fmsub_ps(m, _mm512_permutex2var_ps(c->inv0, idx, c->inv1), c->one);
  __m512 tlog = _mm512_permutex2var_ps(c->lg0, idx, c->lg1);
  __m512 poly = _mm512_fmadd_ps(c->l4, r, c->l3);                        /* log2(1 + r) */
  poly = _mm512_fmadd_ps(poly, r, c->l2);
  poly = _mm512_mul_ps(_mm512_fmadd_ps(poly, r, c->l1), r);
  __m512 L = _mm512_add_ps(tlog, poly);                                  /* log2 m, for n and pl (e + L) */
  __m512 ph = _mm512_mul_ps(c->ph, e);                                   /* exact */
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(c->pf, L, ph), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  /* f = p (e + L) - n, summed so that the large terms cancel first (each rounding is then relative to |f|):
     (ph e - n) exact, + ph tlog, + ph poly, + pf tlo (tlog's rounding), + pl (e + L) */
  __m512 f = _mm512_fmadd_ps(c->ph, tlog, _mm512_sub_ps(ph, n));
  f = _mm512_fmadd_ps(c->ph, poly, f);
  f = _mm512_fmadd_ps(c->pf, _mm512_permutex2var_ps(c->lo0, idx, c->lo1), f);
  f = _mm512_fmadd_ps(c->pl, _mm512_add_ps(e, L), f);
  __m512 P = _mm512_fmadd_ps(c->e[6], f, c->e[5]);
  for (int i = 4; i >= 0; i--) P = _mm512_fmadd_ps(P, f, c->e[i]);
  __m512 res = _mm512_scalef_ps(P, n);                                   /* P * 2^n, one rounding */
  /* ok lanes: res | (x & sign); others keep x */
  return _mm512_castsi512_ps(_mm512_mask_ternarylogic_epi32(_mm512_castps_si512(v), ok,
                                                            _mm512_castps_si512(res), c->sgn, 0xEC));
}

static void kern(float *restrict x, int64_t n, const float *k) {
  gp_consts c;
  gp_init(&c, k);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gp_phi16(_mm512_loadu_ps(x + i), &c));
  if (i < n) {
    __mmask16 lm = (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, lm, gp_phi16(_mm512_maskz_loadu_ps(lm, x + i), &c));
  }
}

/* AdamW on 16 lanes given g = phi_p(grad) in registers (h's row, see gp_adamw_power_many; the gradient in memory
   is left as it is). vsqrtps + vdivps stay: they run on the divider beside phi's FMAs. Replacing them by
   rsqrt14/rcp14 plus one Newton step each (2^-22 relative, 12 more FP-pipe ops) made the step slower on AMD EPYC
   Zen 4 (KVM), 1 thread, 34M params: 32.4 -> 38.3 ms here, 49.4 -> 57.1 ms for the AVX2 loop with rsqrtps/rcpps;
   even with no Newton step it was no faster. */
typedef struct { __m512 decay, b1, omb1, b2, omb2, step, ibc2, eps, coef; } gp_hyper;

static inline gp_hyper gp_hyper_init(const float *h, float coef) {
  const gp_hyper a = {_mm512_set1_ps(h[0]), _mm512_set1_ps(h[1]), _mm512_set1_ps(h[2]), _mm512_set1_ps(h[3]),
                      _mm512_set1_ps(h[4]), _mm512_set1_ps(h[5]), _mm512_set1_ps(h[6]), _mm512_set1_ps(h[7]),
                      _mm512_set1_ps(coef)};
  return a;
}

static inline __attribute__((always_inline)) void gp_adamw16(float *pp, __m512 g, float *mp, float *vp,
                                                             __mmask16 lm, const gp_hyper *a) {
  g = _mm512_mul_ps(g, a->coef);                                         /* the clip coefficient: 1 is exact */
  __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, pp), a->decay);
  __m512 m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lm, mp), a->b1, _mm512_mul_ps(g, a->omb1));
  __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lm, vp), a->b2, _mm512_mul_ps(_mm512_mul_ps(g, g), a->omb2));
  __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(v), a->ibc2, a->eps);
  p = _mm512_fnmadd_ps(a->step, _mm512_div_ps(m, den), p);
  _mm512_mask_storeu_ps(mp, lm, m);
  _mm512_mask_storeu_ps(vp, lm, v);
  _mm512_mask_storeu_ps(pp, lm, p);
}

/* Software-pipelined: phi of the vector two ahead is computed before the AdamW update of the current one, so
   the sqrt and divide (divider) of one vector run beside the FMAs of the next phi instead of after them
   (phi's dependency chain is too long for the out-of-order window to find that overlap on its own). Zen 4,
   1 thread, 4096 floats in L2: 0.84 -> 0.73 ns/element (distance 1: 0.76; two vectors per iteration: 0.79). */
static void kern_adamw(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                       int64_t n, const float *k, const float *h, float coef) {
  gp_consts c;
  gp_init(&c, k);
  const gp_hyper a = gp_hyper_init(h, coef);
  const __mmask16 all = (__mmask16)0xffff;
  int64_t i = 0;
  if (n >= 32) {
    __m512 g0 = gp_phi16(_mm512_loadu_ps(gp), &c), g1 = gp_phi16(_mm512_loadu_ps(gp + 16), &c);
    for (; i + 48 <= n; i += 16) {
      __m512 g2 = gp_phi16(_mm512_loadu_ps(gp + i + 32), &c);
      gp_adamw16(pp + i, g0, mp + i, vp + i, all, &a);
      g0 = g1;
      g1 = g2;
    }
    gp_adamw16(pp + i, g0, mp + i, vp + i, all, &a);
    gp_adamw16(pp + i + 16, g1, mp + i + 16, vp + i + 16, all, &a);
    i += 32;
  }
  for (; i + 16 <= n; i += 16) gp_adamw16(pp + i, gp_phi16(_mm512_loadu_ps(gp + i), &c), mp + i, vp + i, all, &a);
  if (i < n) {
    __mmask16 lm = (__mmask16)((1u << (n - i)) - 1u);
    gp_adamw16(pp + i, gp_phi16(_mm512_maskz_loadu_ps(lm, gp + i), &c), mp + i, vp + i, lm, &a);
  }
}

/* AdamW on coef * grad, no phi (the gradients already hold phi: clipping wrote it) */
static void kern_adamw_plain(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                             int64_t n, const float *h, float coef) {
  const gp_hyper a = gp_hyper_init(h, coef);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) gp_adamw16(pp + i, _mm512_loadu_ps(gp + i), mp + i, vp + i, (__mmask16)0xffff, &a);
  if (i < n) {
    __mmask16 lm = (__mmask16)((1u << (n - i)) - 1u);
    gp_adamw16(pp + i, _mm512_maskz_loadu_ps(lm, gp + i), mp + i, vp + i, lm, &a);
  }
}

/* sum of phi_p(x)^2: each phi widened to double (its square is then exact) and accumulated in double */
static inline void gp_acc16(__m512d *acc, __m512 y) {
  __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(y)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(y, 1));
  acc[0] = _mm512_fmadd_pd(lo, lo, acc[0]);
  acc[1] = _mm512_fmadd_pd(hi, hi, acc[1]);
}

static inline __attribute__((always_inline)) double gp_sumsq(float *restrict x, int64_t n, const float *k,
                                                              const int write) {
  gp_consts c;
  gp_init(&c, k);
  __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 y = gp_phi16(_mm512_loadu_ps(x + i), &c);
    if (write) _mm512_storeu_ps(x + i, y);
    gp_acc16(acc, y);
  }
  if (i < n) {                                                           /* zero lanes: phi(0) = 0 */
    __mmask16 lm = (__mmask16)((1u << (n - i)) - 1u);
    __m512 y = gp_phi16(_mm512_maskz_loadu_ps(lm, x + i), &c);
    if (write) _mm512_mask_storeu_ps(x + i, lm, y);
    gp_acc16(acc, y);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]));
}

/* ---------------------------------------------------------------------------------------------------- */
#elif GP_IMPL == 3
#if defined(__GNUC__) && !defined(__clang__)
/* gcc's pre-register-allocation scheduler, pressure-aware: with 16 ymm registers the four-vector loops spill,
   and this ordering spills less (Zen 4, 1 thread, in L2: phi 0.51 -> 0.46, AdamPower 0.76 -> 0.73 ns/element;
   no change on the AVX-512 path, so only here) */
#pragma GCC optimize("schedule-insns", "sched-pressure")
#endif
/* log2(1 + t) = t (c1 + c2 t + ... + cd t^(d-1)) on t in [C - 1, 2C - 1), C = 0x3f3504f3 as a float: minimax
   in absolute error (Lawson's iteratively reweighted least squares in numpy, float64, 1e5 points). The error
   enters the result as ln2 |q| err, so the degree is chosen per call from |q| (gp_init): 9 for |q| > 0.5,
   8 for |q| in (0.25, 0.5], 7 for |q| <= 0.25 (p in [0.75, 1.25], the default 1.2 included). Max error for
   p in [0.5, 1.5]: 1.27 ulp on tests/test_kernels.py's sweep, 1.59 on a denser one (p step 0.005, 920k x; 1.42
   before the short form of gp_pow8); over all p the maximum, 2.54 at p = 3.992, is in the per-lane path.
   gp_init multiplies them by q in double and rounds once (q log2 m directly, no separate multiply by q). */
#define GP_Q7 0.25
#define GP_Q8 0.5
static const double gp_log7[7] = {1.442699726142174, -0.7213758705494525, 0.4804650437019051, -0.3589618863391761,
                                  0.2972624739926402, -0.2726975883257129, 0.1706345051480801};      /* 3.0e-7 */
static const double gp_log8[8] = {1.4426947724326156, -0.7213571487498992, 0.4809394443167206,
                                  -0.3600872232811773, 0.2867074702592957, -0.2500689679804027,
                                  0.2368902494538592, -0.14574455415863383};                         /* 4.8e-8 */
static const double gp_log9[9] = {1.4426948685570822, -0.7213471284648025, 0.4809225287859596,
                                  -0.36072119567407507, 0.28765667863683947, -0.2385194310408956,
                                  0.21737934440694914, -0.21030337639247557, 0.12541258602245814};  /* 6.7e-9 */
/* 2^f - 1 = f (x1 + x2 f + ... + x6 f^5): minimax in relative error (same method, Chebyshev-spaced points), each
   coefficient rounded to float32 in turn and the higher ones refitted. gp_x: |f| <= 0.5 + 2^-16, rel. error
   3.0e-9; gp_w: |f| <= 0.64 (the short form's range, gp_pow8), rel. error 1.3e-8 */
static const float gp_x[6] = {0.6931471824645996f, 0.24022647738456726f, 0.05550359934568405f,
                               0.009618505835533142f, 0.0013390807434916496f, 0.0001532645255792886f};
static const float gp_w[6] = {0.6931473f, 0.2402265f, 0.05550192f, 0.009618256f, 0.0013441133f, 0.00015418118f};
/* y + GP_MAGIC rounds y to an integer n (|y| < 2^22: the sum lies in [2^23, 2^24), where the float spacing is
   1, round to nearest even) and (y + GP_MAGIC) - GP_MAGIC = n exactly. The low bits of y + GP_MAGIC are
   0x4b400000 + n, so shifting them left by 23 gives n << 23 (0x4b400000 << 23 is 0 mod 2^32): the integer that
   multiplies a normal float by 2^n when added to its bits, as long as the product is normal. */
#define GP_MAGIC 12582912.0f /* 1.5 * 2^23 */

typedef struct { __m256 lq[9], qh, ql; __m256i lo, last; int deg; float k0, k1, k2; } gp_consts;

static void gp_init(gp_consts *c, const float *k) {
  double q = (double)k[0] + (double)k[1];
  double aq = fabs(q);
  const double *lc = aq <= GP_Q7 ? gp_log7 : aq <= GP_Q8 ? gp_log8 : gp_log9;
  c->deg = aq <= GP_Q7 ? 7 : aq <= GP_Q8 ? 8 : 9;
  for (int i = 0; i < 9; i++) c->lq[i] = _mm256_set1_ps(i < c->deg ? (float)(q * lc[i]) : 0.0f);
  c->qh = _mm256_set1_ps(k[0]); c->ql = _mm256_set1_ps(k[1]);
  /* fast lanes: lo <= bits(|x|) < hi, as one signed compare: bits - lo + INT_MIN <= hi - lo - 1 + INT_MIN */
  uint32_t lo = f2u(k[6]), hi = f2u(k[7]);
  c->lo = _mm256_set1_epi32((int32_t)(0x80000000u - lo));
  c->last = _mm256_set1_epi32((int32_t)(hi - lo - 1u + 0x80000000u));
  c->k0 = k[0]; c->k1 = k[1]; c->k2 = k[2];
}

/* sign(x) |x|^p = x 2^(q e + q log2 m), |x| = m 2^e, for 8 lanes whose |x| lies in the window [2^-E, 2^(E+1))
   (_window in kernels/cpu.py): no special values, and x, x 2^f and |x|^p are all normal.
   y = q (e + L) = n + f with qh e exact and the small terms (q L, ql e) added last. Two forms:
   * short (deg 7, i.e. |q| <= 1/4): n = round(qh e) from the exponent alone, so the rounding is off the
     dependency chain: f = ((qh e - n) + ql e) + QL t, |f| <= 1/2 + |q| / 2 + |ql| E < 0.64 (|log2 m| <= 1/2,
     |ql| <= 2^-12 |q|), the gp_w polynomial. phi alone 0.67 -> 0.52 ns/element (Zen 4, 1 thread, in L2).
   * long (|q| > 1/4, where |q| / 2 would widen f too far): n = round(y), f = ((qh e - n) + QL t) + ql e,
     |f| <= 1/2 + 2^-18 (in the window |y| < 128, so fl(y) is within 2^-18 of y), the gp_x polynomial.
   Result (x + (x f) Q(f)) 2^n: one rounding (the fma), the sign comes with x, and the scaling by 2^n is exact
   (an integer add to the exponent field). deg is a constant where it is inlined (one loop per degree). */
static inline __attribute__((always_inline)) __m256 gp_pow8(__m256 x, __m256 ax, const gp_consts *c, int deg) {
  __m256i ab = _mm256_sub_epi32(_mm256_castps_si256(ax), _mm256_set1_epi32(0x3f3504f3));
  __m256 ef = _mm256_cvtepi32_ps(_mm256_srai_epi32(ab, 23));
  __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(ab, _mm256_set1_epi32(0x007fffff)),
                                                  _mm256_set1_epi32(0x3f3504f3)));   /* [C, 2C) */
  __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));                                /* exact */
  /* QL = c0 + t R(t), R = c1 + c2 t + ... by pairs (Estrin), c0 added last (its rounding alone at that scale) */
  __m256 s = _mm256_mul_ps(t, t);
  __m256 P[4];
  for (int j = 0; j < (deg - 1) / 2; j++) P[j] = _mm256_fmadd_ps(c->lq[2 * j + 2], t, c->lq[2 * j + 1]);
  __m256 R;
  if (deg == 7) {        /* c1..c6: P0 + s (P1 + s P2) */
    R = _mm256_fmadd_ps(_mm256_fmadd_ps(P[2], s, P[1]), s, P[0]);
  } else if (deg == 8) { /* c1..c7: (P0 + s P1) + s^2 (P2 + s c7) */
    R = _mm256_fmadd_ps(_mm256_fmadd_ps(c->lq[7], s, P[2]), _mm256_mul_ps(s, s), _mm256_fmadd_ps(P[1], s, P[0]));
  } else {               /* c1..c8: (P0 + s P1) + s^2 (P2 + s P3) */
    R = _mm256_fmadd_ps(_mm256_fmadd_ps(P[3], s, P[2]), _mm256_mul_ps(s, s), _mm256_fmadd_ps(P[1], s, P[0]));
  }
  __m256 QL = _mm256_fmadd_ps(R, t, c->lq[0]);
  /* QL t = q log2 m, never rounded on its own: it enters f through one fma */
  __m256 ph = _mm256_mul_ps(c->qh, ef);                                              /* exact */
  __m256 tn, f;
  if (deg == 7) {
    tn = _mm256_add_ps(ph, _mm256_set1_ps(GP_MAGIC));
    __m256 n = _mm256_sub_ps(tn, _mm256_set1_ps(GP_MAGIC));
    f = _mm256_fmadd_ps(QL, t, _mm256_fmadd_ps(c->ql, ef, _mm256_sub_ps(ph, n)));
  } else {
    tn = _mm256_add_ps(_mm256_fmadd_ps(QL, t, ph), _mm256_set1_ps(GP_MAGIC));
    __m256 n = _mm256_sub_ps(tn, _mm256_set1_ps(GP_MAGIC));
    f = _mm256_fmadd_ps(c->ql, ef, _mm256_fmadd_ps(QL, t, _mm256_sub_ps(ph, n)));
  }
  /* Q = (w1 + w2 f) + f^2 ((w3 + w4 f) + f^2 (w5 + w6 f)), 2^f = 1 + f Q */
  const float *w = deg == 7 ? gp_w : gp_x;
  __m256 f2 = _mm256_mul_ps(f, f);
  __m256 Q = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(w[5]), f, _mm256_set1_ps(w[4])), f2,
                                             _mm256_fmadd_ps(_mm256_set1_ps(w[3]), f, _mm256_set1_ps(w[2]))), f2,
                             _mm256_fmadd_ps(_mm256_set1_ps(w[1]), f, _mm256_set1_ps(w[0])));
  __m256 u = _mm256_fmadd_ps(Q, _mm256_mul_ps(f, x), x);                             /* x 2^f */
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(u),
                                              _mm256_slli_epi32(_mm256_castps_si256(tn), 23)));
}

/* Lanes outside the window (zero, subnormal, inf, nan, or |x| so far from 1 that 2^n would leave the normal
   range): all-zero-or-window vectors stay vectorised (zero lanes take x, i.e. +-0), anything else goes lane
   by lane through gp_phi1. */
static __attribute__((noinline)) __m256 gp_phi8_rare(__m256 x, __m256 ax, __m256i bad, const gp_consts *c) {
  __m256 zero = _mm256_cmp_ps(ax, _mm256_setzero_ps(), _CMP_EQ_OQ);
  if (_mm256_testc_si256(_mm256_castps_si256(zero), bad))      /* every bad lane is +-0 */
    return _mm256_blendv_ps(gp_pow8(x, ax, c, c->deg), x, zero);
  float buf[8];
  _mm256_storeu_ps(buf, x);
  for (int j = 0; j < 8; j++) buf[j] = gp_phi1(buf[j], c->k0, c->k1, c->k2);
  return _mm256_loadu_ps(buf);
}

static inline __m256 gp_abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline __m256i gp_bad8(__m256 ax, const gp_consts *c) {   /* all ones where |x| is outside the window */
  return _mm256_cmpgt_epi32(_mm256_add_epi32(_mm256_castps_si256(ax), c->lo), c->last);
}

static inline __attribute__((always_inline)) __m256 gp_phi8(__m256 x, const gp_consts *c, int deg) {
  __m256 ax = gp_abs8(x);
  __m256i bad = gp_bad8(ax, c);
  if (__builtin_expect(!_mm256_testz_si256(bad, bad), 0)) return gp_phi8_rare(x, ax, bad, c);
  return gp_pow8(x, ax, c, deg);
}

/* phi of four vectors held in registers, one window test for all of them: four independent chains in flight
   per loop iteration (kern: with the shorter polynomial chains 0.72 -> 0.67 ns/element; kern_adamw: the sqrt
   and divide of the AdamW tail overlap the next phi, 46 -> 34 ms on 34M floats, Zen 4, 1 thread) */
static inline __attribute__((always_inline)) void gp_phi32v(__m256 *x, const gp_consts *c, int deg) {
  __m256 a[4];
  for (int j = 0; j < 4; j++) a[j] = gp_abs8(x[j]);
  __m256i bad = _mm256_or_si256(_mm256_or_si256(gp_bad8(a[0], c), gp_bad8(a[1], c)),
                                _mm256_or_si256(gp_bad8(a[2], c), gp_bad8(a[3], c)));
  if (__builtin_expect(!_mm256_testz_si256(bad, bad), 0)) {
    for (int j = 0; j < 4; j++) x[j] = gp_phi8(x[j], c, deg);
  } else {
    for (int j = 0; j < 4; j++) x[j] = gp_pow8(x[j], a[j], c, deg);
  }
}

/* 32 floats in place */
static inline __attribute__((always_inline)) void gp_phi32(float *p, const gp_consts *c, int deg) {
  __m256 x[4];
  for (int j = 0; j < 4; j++) x[j] = _mm256_loadu_ps(p + 8 * j);
  gp_phi32v(x, c, deg);
  for (int j = 0; j < 4; j++) _mm256_storeu_ps(p + 8 * j, x[j]);
}

/* one copy of a loop per polynomial degree, so that deg is a constant inside it */
#define GP_BY_DEG(c, LOOP) \
  do { if ((c).deg == 7) { LOOP(7); } else if ((c).deg == 8) { LOOP(8); } else { LOOP(9); } } while (0)

static void kern(float *restrict x, int64_t n, const float *k) {
  gp_consts c;
  gp_init(&c, k);
  int64_t i = 0;
#define GP_PHI_LOOP(D)                                     \
  for (; i + 32 <= n; i += 32) gp_phi32(x + i, &c, D);     \
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gp_phi8(_mm256_loadu_ps(x + i), &c, D))
  GP_BY_DEG(c, GP_PHI_LOOP);
#undef GP_PHI_LOOP
  for (; i < n; i++) x[i] = gp_phi1(x[i], k[0], k[1], k[2]);
}

/* AdamW on 8 lanes given g = phi_p(grad) in registers (h's row, see gp_adamw_power_many) */
typedef struct { __m256 decay, b1, omb1, b2, omb2, step, ibc2, eps, coef; } gp_hyper;

static inline gp_hyper gp_hyper_init(const float *h, float coef) {
  const gp_hyper a = {_mm256_set1_ps(h[0]), _mm256_set1_ps(h[1]), _mm256_set1_ps(h[2]), _mm256_set1_ps(h[3]),
                      _mm256_set1_ps(h[4]), _mm256_set1_ps(h[5]), _mm256_set1_ps(h[6]), _mm256_set1_ps(h[7]),
                      _mm256_set1_ps(coef)};
  return a;
}

/* the same update on one element (the tails of the vector loops) */
static inline void gp_adamw1(float *pp, float g, float *mp, float *vp, const float *h) {
  float m = fmaf(*mp, h[1], g * h[2]), v = fmaf(*vp, h[3], (g * g) * h[4]);
  *mp = m;
  *vp = v;
  *pp = fmaf(-h[5], m / fmaf(sqrtf(v), h[6], h[7]), *pp * h[0]);
}

static inline __attribute__((always_inline)) void gp_adamw8(float *pp, __m256 g, float *mp, float *vp,
                                                            const gp_hyper *a) {
  g = _mm256_mul_ps(g, a->coef);                                         /* the clip coefficient: 1 is exact */
  __m256 p = _mm256_mul_ps(_mm256_loadu_ps(pp), a->decay);
  __m256 m = _mm256_fmadd_ps(_mm256_loadu_ps(mp), a->b1, _mm256_mul_ps(g, a->omb1));
  __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(vp), a->b2, _mm256_mul_ps(_mm256_mul_ps(g, g), a->omb2));
  __m256 den = _mm256_fmadd_ps(_mm256_sqrt_ps(v), a->ibc2, a->eps);
  p = _mm256_fnmadd_ps(a->step, _mm256_div_ps(m, den), p);
  _mm256_storeu_ps(mp, m);
  _mm256_storeu_ps(vp, v);
  _mm256_storeu_ps(pp, p);
}

/* Software-pipelined by one 32-float block: phi of block k+1 is computed before the AdamW updates of block k,
   so their sqrt and divide run beside the next phi's FMAs (Zen 4, 1 thread, 4096 floats in L2: 0.96 -> 0.90
   ns/element). */
static void kern_adamw(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                       int64_t n, const float *k, const float *h, float coef) {
  gp_consts c;
  gp_init(&c, k);
  const gp_hyper a = gp_hyper_init(h, coef);
  int64_t i = 0;
#define GP_ADAMW_LOOP(D)                                                                          \
  if (n >= 64) {                                                                                  \
    __m256 cur[4], next[4];                                                                       \
    for (int j = 0; j < 4; j++) cur[j] = _mm256_loadu_ps(gp + 8 * j);                             \
    gp_phi32v(cur, &c, D);                                                                        \
    for (; i + 64 <= n; i += 32) {                                                                \
      for (int j = 0; j < 4; j++) next[j] = _mm256_loadu_ps(gp + i + 32 + 8 * j);                 \
      gp_phi32v(next, &c, D);                                                                     \
      for (int j = 0; j < 4; j++) gp_adamw8(pp + i + 8 * j, cur[j], mp + i + 8 * j, vp + i + 8 * j, &a); \
      for (int j = 0; j < 4; j++) cur[j] = next[j];                                               \
    }                                                                                             \
    for (int j = 0; j < 4; j++) gp_adamw8(pp + i + 8 * j, cur[j], mp + i + 8 * j, vp + i + 8 * j, &a); \
    i += 32;                                                                                      \
  }                                                                                               \
  for (; i + 8 <= n; i += 8) gp_adamw8(pp + i, gp_phi8(_mm256_loadu_ps(gp + i), &c, D), mp + i, vp + i, &a)
  GP_BY_DEG(c, GP_ADAMW_LOOP);
#undef GP_ADAMW_LOOP
  for (; i < n; i++) gp_adamw1(pp + i, gp_phi1(gp[i], k[0], k[1], k[2]) * coef, mp + i, vp + i, h);
}

/* AdamW on coef * grad, no phi (the gradients already hold phi: clipping wrote it) */
static void kern_adamw_plain(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                             int64_t n, const float *h, float coef) {
  const gp_hyper a = gp_hyper_init(h, coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) gp_adamw8(pp + i, _mm256_loadu_ps(gp + i), mp + i, vp + i, &a);
  for (; i < n; i++) gp_adamw1(pp + i, gp[i] * coef, mp + i, vp + i, h);
}

/* sum of phi_p(x)^2: each phi widened to double (its square is then exact) and accumulated in double */
static inline __attribute__((always_inline)) void gp_acc8(__m256d *acc, __m256 y) {
  __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
  acc[0] = _mm256_fmadd_pd(lo, lo, acc[0]);
  acc[1] = _mm256_fmadd_pd(hi, hi, acc[1]);
}

static inline __attribute__((always_inline)) double gp_sumsq(float *restrict x, int64_t n, const float *k,
                                                              const int write) {
  gp_consts c;
  gp_init(&c, k);
  __m256d acc[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
#define GP_SUMSQ_LOOP(D)                                                                          \
  for (; i + 32 <= n; i += 32) {                                                                  \
    __m256 v[4];                                                                                  \
    for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(x + i + 8 * j);                            \
    gp_phi32v(v, &c, D);                                                                          \
    for (int j = 0; j < 4; j++) {                                                                 \
      if (write) _mm256_storeu_ps(x + i + 8 * j, v[j]);                                           \
      gp_acc8(acc, v[j]);                                                                         \
    }                                                                                             \
  }                                                                                               \
  for (; i + 8 <= n; i += 8) {                                                                    \
    __m256 y = gp_phi8(_mm256_loadu_ps(x + i), &c, D);                                            \
    if (write) _mm256_storeu_ps(x + i, y);                                                        \
    gp_acc8(acc, y);                                                                              \
  }
  GP_BY_DEG(c, GP_SUMSQ_LOOP);
#undef GP_SUMSQ_LOOP
  __m256d s4 = _mm256_add_pd(acc[0], acc[1]);
  __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
  double s = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
  for (; i < n; i++) {
    float y = gp_phi1(x[i], k[0], k[1], k[2]);
    if (write) x[i] = y;
    s += (double)y * y;
  }
  return s;
}

/* ---------------------------------------------------------------------------------------------------- */
#else
static void kern(float *restrict x, int64_t n, const float *k) {
  const float qh = k[0], ql = k[1], qf = k[2];
#pragma omp simd
  for (int64_t i = 0; i < n; i++) x[i] = gp_phi1(x[i], qh, ql, qf);
}

/* AdamW on coef * phi_p(grad), or on coef * grad where k is NULL (the gradients already hold phi) */
static inline __attribute__((always_inline)) void gp_adamw_loop(float *restrict pp, const float *restrict gp,
                                                                float *restrict mp, float *restrict vp, int64_t n,
                                                                const float *k, const float *h, float coef,
                                                                const int phi) {
  const float qh = phi ? k[0] : 0.0f, ql = phi ? k[1] : 0.0f, qf = phi ? k[2] : 0.0f;
  const float decay = h[0], b1 = h[1], omb1 = h[2], b2 = h[3], omb2 = h[4], step = h[5], ibc2 = h[6], eps = h[7];
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    float g = (phi ? gp_phi1(gp[i], qh, ql, qf) : gp[i]) * coef;
    float m = mp[i] * b1 + g * omb1, v = vp[i] * b2 + (g * g) * omb2;
    mp[i] = m;
    vp[i] = v;
    pp[i] = pp[i] * decay - step * (m / (sqrtf(v) * ibc2 + eps));
  }
}

static void kern_adamw(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                       int64_t n, const float *k, const float *h, float coef) {
  gp_adamw_loop(pp, gp, mp, vp, n, k, h, coef, 1);
}

static void kern_adamw_plain(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                             int64_t n, const float *h, float coef) {
  gp_adamw_loop(pp, gp, mp, vp, n, NULL, h, coef, 0);
}

/* sum of phi_p(x)^2 in double (the square of a float widened to double is exact); write: x <- phi_p(x) too */
static inline __attribute__((always_inline)) double gp_sumsq(float *restrict x, int64_t n, const float *k,
                                                              const int write) {
  const float qh = k[0], ql = k[1], qf = k[2];
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) {
    float y = gp_phi1(x[i], qh, ql, qf);
    if (write) x[i] = y;
    s += (double)y * y;
  }
  return s;
}
#endif

/* ---------------------------------------------------------------------------------------------------- */
int gp_impl(void) { return GP_IMPL; }

/* Multi-tensor entries: every tensor is cut into chunks of GP_CHUNK elements and ONE OpenMP region deals the
   chunks of all tensors to the threads (one call per optimizer step, not one per tensor). */
#define GP_CHUNK 16384

static int64_t gp_prefix(const int64_t *ns, int count, int64_t *offs, int64_t *total) {
  int64_t c = 0, t = 0;
  for (int i = 0; i < count; i++) {
    offs[i] = c;
    c += (ns[i] + GP_CHUNK - 1) / GP_CHUNK;
    t += ns[i];
  }
  offs[count] = c;
  *total = t;
  return c;
}

static inline int gp_owner(const int64_t *offs, int count, int64_t chunk) {
  int lo = 0, hi = count - 1;           /* last i with offs[i] <= chunk (empty tensors own no chunk) */
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (offs[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

#define GP_FOR_CHUNKS(BODY)                                                                        \
  int64_t stack_offs[65], *offs = count < 64 ? stack_offs : (int64_t *)malloc(sizeof(int64_t) * (count + 1)); \
  if (!offs) return -1;                                                                            \
  int64_t total, nch = gp_prefix(ns, count, offs, &total);                                         \
  int nt = (nthreads > 1 && total > 2 * GP_CHUNK) ? nthreads : 1;                                  \
  (void)nt;                                                                                        \
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(nt > 1)")                          \
  for (int64_t c = 0; c < nch; c++) {                                                              \
    int t = gp_owner(offs, count, c);                                                              \
    int64_t lo = (c - offs[t]) * GP_CHUNK, len = ns[t] - lo < GP_CHUNK ? ns[t] - lo : GP_CHUNK;    \
    BODY;                                                                                          \
  }                                                                                                \
  if (offs != stack_offs) free(offs);                                                              \
  return 0;

/* x <- coef x on a chunk just transformed by kern: it is still in L2, so memory sees one pass */
static void gp_scale(float *restrict x, int64_t n, float coef) {
  for (int64_t j = 0; j < n; j++) x[j] *= coef;
}

/* x_i <- coef * phi_p(x_i) for count contiguous float32 arrays (coef = 1: phi alone, no second sweep). */
int gp_sign_power_many(float *const *xs, const int64_t *ns, int count, const float *k, float coef, int nthreads) {
  GP_FOR_CHUNKS(kern(xs[t] + lo, len, k); if (coef != 1.0f) gp_scale(xs[t] + lo, len, coef))
}

static double kern_sumsq(float *restrict x, int64_t n, const float *k) { return gp_sumsq(x, n, k, 0); }
static double kern_sumsq_write(float *restrict x, int64_t n, const float *k) { return gp_sumsq(x, n, k, 1); }

/* part[c] = sum of phi_p(x)^2 over chunk c (chunks numbered as GP_FOR_CHUNKS deals them); write: phi stored too */
static int gp_sumsq_chunks(float *const *xs, const int64_t *ns, int count, const float *k, double *part, int write,
                           int nthreads) {
  GP_FOR_CHUNKS(part[c] = write ? kern_sumsq_write(xs[t] + lo, len, k) : kern_sumsq(xs[t] + lo, len, k))
}

/* out[i] = sum of phi_p(x)^2 over array i; write = 0: read only, write = 1: x <- phi_p(x) in the same pass.
   Accumulated in double per chunk (the squares of the float32 phi values are exact there, the sums round at
   2^-53 relative), and the chunk sums of each array added in chunk order after the parallel region: the result
   does not depend on the number of threads. */
int gp_phi_sumsq_many(float *const *xs, const int64_t *ns, int count, const float *k, double *out, int write,
                      int nthreads) {
  int64_t nch = 0;
  for (int i = 0; i < count; i++) nch += (ns[i] + GP_CHUNK - 1) / GP_CHUNK;
  double *part = (double *)malloc(sizeof(double) * (nch > 0 ? nch : 1));
  if (!part) return -1;
  int rc = gp_sumsq_chunks(xs, ns, count, k, part, write, nthreads);
  int64_t c = 0;
  for (int i = 0; rc == 0 && i < count; i++) {
    double s = 0.0;
    for (int64_t e = (ns[i] + GP_CHUNK - 1) / GP_CHUNK; e > 0; e--) s += part[c++];
    out[i] = s;
  }
  free(part);
  return rc;
}

/* One AdamW step (decoupled weight decay) on coef * phi_p(grad) per tensor, each array read and written once
   (coef: the clip coefficient, rounded after phi as clipping a stored phi would; 1 is exact: the unclipped step;
   k = NULL: on coef * grad, no phi, for gradients that already hold phi).
   h + 8 i = (1 - lr*wd, beta1, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, 1 / sqrt(bias_correction2),
   eps) for tensor i. */
int gp_adamw_power_many(float *const *params, float *const *grads, float *const *exp_avgs, float *const *exp_avg_sqs,
                        const int64_t *ns, int count, const float *k, const float *h, float coef, int nthreads) {
  GP_FOR_CHUNKS(if (k) kern_adamw(params[t] + lo, grads[t] + lo, exp_avgs[t] + lo, exp_avg_sqs[t] + lo, len, k,
                                   h + 8 * t, coef);
                else kern_adamw_plain(params[t] + lo, grads[t] + lo, exp_avgs[t] + lo, exp_avg_sqs[t] + lo, len,
                                      h + 8 * t, coef))
}
