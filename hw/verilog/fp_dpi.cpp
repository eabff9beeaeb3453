/* Behavioural FP cells for fast Verilator simulation (hw/arith.py, fp_impl="dpi").
 *
 * The same numerics contract as the RTL adder and multiplier in hw/arith.py
 * (ARCHITECTURE.md section 4): IEEE binary32 arithmetic, round to nearest even,
 * subnormals flushed to zero on input and output (sign kept), every NaN the
 * canonical 0x7FC00000. Why the host's float arithmetic plus flushing equals
 * the flush-to-zero RTL: the sum of two normal floats below 2^-126 is exact
 * (both are multiples of 2^-149), and a BF16 x BF16 product has at most 16
 * significant bits, so it is exact whenever it is normal and its subnormal
 * rounding can never reach 2^-126 (sim/golden/fp.py states the same argument
 * for the numpy golden model). tests/test_arith.py holds these cells equal to
 * the RTL cells bit for bit.
 *
 * Requires the default floating-point environment (round to nearest, no
 * -ffast-math, SSE arithmetic: x86-64's default).
 */
#include <cstdint>
#include <cstring>

static inline uint32_t ianus_ftz(uint32_t x) {
    return (x & 0x7F800000u) == 0 ? (x & 0x80000000u) : x;
}

static inline float ianus_f(uint32_t x) { float f; memcpy(&f, &x, 4); return f; }

static inline uint32_t ianus_out(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x007FFFFFu) != 0)
        return 0x7FC00000u;
    return ianus_ftz(x);
}

extern "C" uint32_t ianus_fp32_add(uint32_t a, uint32_t b) {
    return ianus_out(ianus_f(ianus_ftz(a)) + ianus_f(ianus_ftz(b)));
}

extern "C" uint32_t ianus_bf16_mul(uint32_t a, uint32_t b) {
    return ianus_out(ianus_f(ianus_ftz((a & 0xFFFFu) << 16)) * ianus_f(ianus_ftz((b & 0xFFFFu) << 16)));
}
