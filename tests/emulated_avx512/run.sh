#!/usr/bin/env bash
# Emulated AVX-512 job: run fastattn's level-2 (AVX-512) kernels on a CPU
# without AVX-512. In a scratch copy of csrc/ (the repository is untouched),
# the level-2 `#error` guard and `#include <immintrin.h>` of simd_map.h are
# replaced by `#include "emu512.h"`, a per-lane emulation of the AVX-512
# intrinsics the level-2 code uses. The scalar, native AVX2 and emulated
# AVX-512 kernels are built with ASan + UBSan and linked into two tests:
#
#   helpers       the level-2 vector helpers against the AVX2 ones (exp/exp2
#                 bit-identical, hmax/hsum, keep, loadn/storen for every n)
#   differential  fa_scaled_dot_product_attention and fa_masked_softmax at
#                 level 2 and level 1 against level 0, random cases from a
#                 fixed seed, plus directed NaN/-inf softmax rows, and
#                 fa_rope_apply rows (float, double, bfloat16, float16: the
#                 last two through each level's row conversions) that must
#                 match level 0 bit for bit
#   bf16_attention the all-bf16 attention kernel (level 3, vdpbf16ps emulated;
#                 level 4, Q.K^T on emulated AMX tiles) against level 0
#                 within the bound its P rounding allows
#   gemm16        the 16-bit GEMM (fa_gemm16) at levels 1, 2 and 3 (3: the
#                 bf16 kernel on an emulated vdpbf16ps) against level 0, bit
#                 for bit; gemm_bf16_impl.h's level-2/3 guard and include are
#                 replaced by emu512.h the same way; and level 4 (amx: the
#                 bf16 kernel on AMX tiles, emulated by emuamx.h in place of
#                 gemm_bf16_amx.c's -mamx guard) within the error bound, the
#                 same bits for 1 and 2 threads
#
# Then eight planted bugs must be caught: the float keep mask shifted by one
# lane (by differential), the bf16 GEMM's odd-K tail packed into the wrong
# half of its pair (by gemm16, at level 3 and, in the AMX packing, level 4),
# the AMX scores storing a query tile over another and the AMX P.V taking
# P untransposed (by bf16_attention),
# the bf16 attention kernel dropping an odd D's last key element or pairing
# probabilities with the wrong keys (by bf16_attention), and level 2's
# bfloat16 row rounding without its 0x7fff increment (by differential's RoPE rows). Any mismatch, sanitizer report,
# or a patch that no longer applies fails the job. See docs/reliability.md.
#
#   bash tests/emulated_avx512/run.sh      # from anywhere; needs gcc with libasan/libubsan
#   EMU512_CASES=2000 EMU512_SEEDS="1 2 3" bash tests/emulated_avx512/run.sh   # a longer run
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/emulated_avx512"
CC="${CC:-gcc}"
# random cases per seed (each: one attention and one softmax call per level);
# one differential process per seed, run in parallel
CASES="${EMU512_CASES:-600}"
SEEDS="${EMU512_SEEDS:-1 2}"
PLANTED_CASES="${EMU512_PLANTED_CASES:-100}"
# random 16-bit GEMM cases per seed (each: one call per level)
GEMM_CASES="${EMU512_GEMM_CASES:-300}"
# random all-bf16 attention cases per seed (each: one call at level 0 and 3)
BF16_CASES="${EMU512_BF16_CASES:-300}"

die() { echo "== FAIL: $*" >&2; exit 1; }
start=$SECONDS

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "== emulated AVX-512 job: scratch copy of csrc/ in $WORK"
cp -R "$ROOT/csrc" "$WORK/csrc"

# ---- the substitution (scratch copy only) -----------------------------------
# exactly these lines of the level-2 section of simd_map.h; if they change,
# update EXPECTED here (and check that emu512.h still covers every intrinsic)
patch_simd_map() { # $1: simd_map.h to patch in place
    python3 - "$1" <<'PYEOF'
import sys
path = sys.argv[1]
EXPECTED = """#elif FA_ISA_LEVEL == 2

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \\
    !defined(__AVX512DQ__) || !defined(__FMA__)
#error "FA_ISA_LEVEL 2 needs -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma"
#endif
#include <immintrin.h>
"""
REPLACEMENT = """#elif FA_ISA_LEVEL == 2

#include "emu512.h" /* emulated AVX-512: tests/emulated_avx512/run.sh */
"""
text = open(path).read()
n = text.count(EXPECTED)
if n != 1:
    sys.exit(f"== FAIL: expected the level-2 guard + #include <immintrin.h> exactly once in "
             f"{path}, found it {n} times; simd_map.h changed, so update EXPECTED in "
             f"tests/emulated_avx512/run.sh (the job would otherwise not test what it claims)")
open(path, "w").write(text.replace(EXPECTED, REPLACEMENT))
PYEOF
    grep -q '#include "emu512.h"' "$1" || die "the emu512.h include is missing from $1 after patching"
    ! grep -q 'FA_ISA_LEVEL 2 needs' "$1" || die "the level-2 #error guard is still in $1 after patching"
}
patch_simd_map "$WORK/csrc/simd_map.h"
echo "== patched the scratch simd_map.h: level 2 uses emu512.h"

# the same for the 16-bit GEMM's levels 2 and 3 (gemm_bf16_impl.h)
python3 - "$WORK/csrc/gemm_bf16_impl.h" <<'PYEOF'
import sys
path = sys.argv[1]
EXPECTED = """#if FA_G16_LEVEL >= 2

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \\
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__) || \\
    (FA_G16_LEVEL >= 3 && !defined(__AVX512BF16__))
#error "FA_G16_LEVEL 2 needs -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma -mf16c, 3 also -mavx512bf16"
#endif
#include <immintrin.h>
"""
REPLACEMENT = """#if FA_G16_LEVEL >= 2

#include "emu512.h" /* emulated AVX-512 and vdpbf16ps: tests/emulated_avx512/run.sh */
"""
text = open(path).read()
n = text.count(EXPECTED)
if n != 1:
    sys.exit(f"== FAIL: expected the level-2/3 guard + #include <immintrin.h> exactly once in "
             f"{path}, found it {n} times; gemm_bf16_impl.h changed, so update EXPECTED in "
             f"tests/emulated_avx512/run.sh")
open(path, "w").write(text.replace(EXPECTED, REPLACEMENT))
PYEOF
grep -q '#include "emu512.h"' "$WORK/csrc/gemm_bf16_impl.h" || die "gemm_bf16_impl.h was not patched"
echo "== patched the scratch gemm_bf16_impl.h: levels 2 and 3 use emu512.h"

# the all-bf16 attention kernel's file asks for -mavx512bf16; its vdpbf16ps
# comes from emu512.h through the patched simd_map.h
python3 - "$WORK/csrc/attention_avx512bf16.c" <<'PYEOF'
import sys
path = sys.argv[1]
EXPECTED = """#if !defined(__AVX512BF16__)
#error "attention_avx512bf16.c needs -mavx512bf16"
#endif
"""
text = open(path).read()
if text.count(EXPECTED) != 1:
    sys.exit(f"== FAIL: expected the -mavx512bf16 guard exactly once in {path}; update run.sh")
open(path, "w").write(text.replace(EXPECTED, "/* -mavx512bf16 guard removed: emulated */\n"))
PYEOF
echo "== patched the scratch attention_avx512bf16.c: vdpbf16ps from emu512.h"

# the AMX kernels' files ask for -mamx-tile -mamx-bf16; their tile
# intrinsics come from emuamx.h instead
for f in gemm_bf16_amx attention_amx; do
python3 - "$WORK/csrc/$f.c" "$f" <<'PYEOF'
import sys
path, name = sys.argv[1], sys.argv[2]
EXPECTED = f"""#if !(defined(__AMX_TILE__) || defined(__AMXTILE__)) || !(defined(__AMX_BF16__) || defined(__AMXBF16__))
#error "{name}.c needs -mamx-tile -mamx-bf16"
#endif
"""
text = open(path).read()
if text.count(EXPECTED) != 1:
    sys.exit(f"== FAIL: expected the -mamx guard exactly once in {path}; update run.sh")
open(path, "w").write(text.replace(EXPECTED, '#include "emuamx.h" /* emulated AMX tiles: run.sh */\n'))
PYEOF
done
echo "== patched the scratch gemm_bf16_amx.c and attention_amx.c: AMX tiles from emuamx.h"

# ---- build ------------------------------------------------------------------
# setup.py's BASE_CFLAGS with -O1 instead of -O3 (ASan + the emulation are
# slow to compile and run at -O3), plus the sanitizers. The level-2 files get
# -mavx2 -mfma and no AVX-512 flag: an AVX-512 intrinsic that emu512.h does
# not emulate fails to compile instead of being skipped. -Wno-psabi: GCC
# notes that 512-bit vector arguments change the ABI without -mavx512f,
# which is expected here (all those functions are static inline).
CFLAGS=(-std=c11 -O1 -fno-math-errno -ffp-contract=off -Wall -Wextra -Wno-unused-function
        -fopenmp -g -fno-omit-frame-pointer
        -fsanitize=address,undefined -fno-sanitize-recover=all
        -DFA_HAVE_X86_KERNELS=1 -DFA_HAVE_AMX_KERNELS=1)
# -mf16c: the 16-bit GEMM's level-1 file needs it (and levels 2/3 use its
# scalar conversions natively); simd_map.h uses no F16C instruction
X86=(-mavx2 -mfma -mf16c -Wno-psabi)

# compile SRC OBJ INCDIR [extra flags...]; run in the background by build()
compile() {
    local src="$1" obj="$2" inc="$3"
    shift 3
    "$CC" "${CFLAGS[@]}" "$@" -I"$inc" -I"$HERE" -c "$src" -o "$obj" > "$obj.log" 2>&1 ||
        { cat "$obj.log"; echo "== compile failed: $src" > "$obj.failed"; }
}
# wait for the background compiles, show warnings, fail if any failed
wait_compiles() {
    wait
    local f
    for f in "$@"; do
        [ -s "$f.log" ] && cat "$f.log"
        [ -e "$f.failed" ] && die "$(cat "$f.failed")"
    done
    return 0
}

mkdir -p "$WORK/obj"
S="$WORK/csrc"
objs=()
# the drivers the differential test calls, the kernel table and what they
# share (threads, checked sizes, scratch), and every scalar kernel file
for src in "$S"/attention.c "$S"/softmax.c "$S"/rope.c "$S"/half_rows.c "$S"/dispatch.c \
    "$S"/fork_safety.c "$S"/threads.c "$S"/checked_size.c "$S"/scratch.c "$S"/*_scalar.c; do
    o="$WORK/obj/$(basename "${src%.c}").o"; objs+=("$o"); compile "$src" "$o" "$S" &
done
for src in "$S"/*_avx2.c "$S"/*_avx512.c "$S"/*_avx512bf16.c "$S"/*_amx.c; do
    o="$WORK/obj/$(basename "${src%.c}").o"; objs+=("$o"); compile "$src" "$o" "$S" "${X86[@]}" &
done
compile "$HERE/differential.c" "$WORK/obj/differential.o" "$S" &
compile "$S/gemm_bf16.c" "$WORK/obj/gemm_bf16.o" "$S" &
compile "$HERE/gemm16.c" "$WORK/obj/gemm16.o" "$S" &
compile "$HERE/bf16_attention.c" "$WORK/obj/bf16_attention.o" "$S" &
compile "$HERE/helpers.c" "$WORK/obj/helpers.o" "$S" &
compile "$HERE/helpers_level.c" "$WORK/obj/helpers_l1.o" "$S" "${X86[@]}" -DFA_ISA_LEVEL=1 &
compile "$HERE/helpers_level.c" "$WORK/obj/helpers_l2.o" "$S" "${X86[@]}" -DFA_ISA_LEVEL=2 &
wait_compiles "${objs[@]}" "$WORK"/obj/differential.o "$WORK"/obj/helpers.o \
    "$WORK"/obj/gemm_bf16.o "$WORK"/obj/gemm16.o "$WORK"/obj/bf16_attention.o \
    "$WORK"/obj/helpers_l1.o "$WORK"/obj/helpers_l2.o
# cpu_features.c is not linked: the tests define fa_cpu_best_isa (level 2)
"$CC" "${CFLAGS[@]}" "$WORK/obj/differential.o" "${objs[@]}" -lm -o "$WORK/differential"
"$CC" "${CFLAGS[@]}" "$WORK/obj/gemm16.o" "$WORK/obj/gemm_bf16.o" "${objs[@]}" -lm -o "$WORK/gemm16"
"$CC" "${CFLAGS[@]}" "$WORK/obj/bf16_attention.o" "${objs[@]}" -lm -o "$WORK/bf16_attention"
"$CC" "${CFLAGS[@]}" "$WORK"/obj/helpers.o "$WORK"/obj/helpers_l1.o "$WORK"/obj/helpers_l2.o \
    -lm -o "$WORK/helpers"
echo "== built scalar + AVX2 + emulated AVX-512 kernels with ASan+UBSan ($((SECONDS - start)) s)"

# ---- run --------------------------------------------------------------------
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:handle_segv=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export OMP_NUM_THREADS=1
SANITIZER_RE='ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|emu512: '

# run NAME CMD...: in the background, output to $WORK/NAME.log, status to $WORK/NAME.rc
run_bg() {
    local name="$1"
    shift
    ( set +e; "$@" > "$WORK/$name.log" 2>&1; echo $? > "$WORK/$name.rc" ) &
}
names=(helpers)
run_bg helpers "$WORK/helpers"
for seed in $SEEDS; do
    names+=("gemm16-seed$seed")
    run_bg "gemm16-seed$seed" "$WORK/gemm16" "$GEMM_CASES" "$seed"
done
for seed in $SEEDS; do
    names+=("bf16-attention-seed$seed")
    run_bg "bf16-attention-seed$seed" "$WORK/bf16_attention" "$BF16_CASES" "$seed"
done
for seed in $SEEDS; do
    names+=("differential-seed$seed")
    run_bg "differential-seed$seed" "$WORK/differential" "$CASES" "$seed"
done
wait
failed=0
for name in "${names[@]}"; do
    rc="$(cat "$WORK/$name.rc")"
    if [ "$rc" -ne 0 ] || grep -qE "$SANITIZER_RE" "$WORK/$name.log"; then
        cat "$WORK/$name.log"
        echo "== FAIL: $name (exit status $rc)"
        failed=1
    else
        sed "s/^/   $name: /" "$WORK/$name.log" | grep -E 'cases|rows|inputs|checks|row sets'
    fi
done
[ "$failed" -eq 0 ] || die "mismatches or sanitizer reports above"

# where the CPU has AVX512_BF16, the emulation itself against the real
# vdpbf16ps and half conversions (elsewhere there is nothing to compare with)
if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
    "$CC" "${CFLAGS[@]}" -mavx2 -mfma -mf16c -mavx512f -mavx512dq -mavx512bw -mavx512vl \
        -mavx512bf16 -Wno-psabi -I"$HERE" "$HERE/emulation_vs_native.c" -lm \
        -o "$WORK/emulation_vs_native" || die "emulation_vs_native.c did not compile"
    "$WORK/emulation_vs_native" 100000 > "$WORK/evn.log" 2>&1 || { cat "$WORK/evn.log"; die "emu512.h differs from the CPU"; }
    grep -qE "$SANITIZER_RE" "$WORK/evn.log" && { cat "$WORK/evn.log"; die "sanitizer report in emulation_vs_native"; }
    sed 's/^/   /' "$WORK/evn.log"
else
    echo "== this CPU has no AVX512_BF16: the emulation is not compared with the real instructions"
fi
echo "== no mismatch, no sanitizer report ($((SECONDS - start)) s)"

# expect_caught WHAT PATTERN LOG CMD...: CMD, built with a planted bug, must
# exit 1 and print a mismatch line matching PATTERN, with no sanitizer report
expect_caught() {
    local what="$1" pattern="$2" log="$3" rc
    shift 3
    set +e
    "$@" > "$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 1 ] || ! grep -q "$pattern" "$log" || grep -qE "$SANITIZER_RE" "$log"; then
        cat "$log"
        die "the planted $what was not caught as a mismatch (exit status $rc)"
    fi
    grep -m 2 '^MISMATCH' "$log" | cut -c1-200
    grep -E 'mismatching|not bit-identical' "$log" | sed 's/^/   planted: /'
    echo "== planted $what caught (exit status $rc)"
}

# rebuild_planted OUT SRC INCDIR TESTOBJ [OBJ...]: $WORK/OUT, the test
# TESTOBJ (with OBJ...) linked against every kernel object but the one SRC
# replaces, SRC (a planted copy, its headers from INCDIR) compiled in its place
rebuild_planted() {
    local out="$1" src="$2" inc="$3" base keep=() o
    shift 3
    base="$(basename "${src%.c}")"
    for o in "${objs[@]}"; do case "$o" in */"$base".o) ;; *) keep+=("$o") ;; esac; done
    mkdir -p "$WORK/pobj"
    compile "$src" "$WORK/pobj/$out.o" "$inc" "${X86[@]}"
    wait_compiles "$WORK/pobj/$out.o"
    "$CC" "${CFLAGS[@]}" "$@" "${keep[@]}" "$WORK/pobj/$out.o" -lm -o "$WORK/$out"
}

# plant FILE SED_SCRIPT CHECK_REGEX WHAT: applies a planted bug's sed to
# FILE and dies when it did not take (CHECK_REGEX must then match one line)
plant() {
    local file="$1" script="$2" check="$3" what="$4"
    sed -i "$script" "$file"
    [ "$(grep -c "$check" "$file")" -eq 1 ] ||
        die "the planted-bug sed did not apply to $(basename "$file") ($what changed?); update it in $0"
}

# ---- planted bug: must be caught ---------------------------------------------
# the float keep mask shifted by one lane (lane i takes mask byte i + 1)
echo "== planted bug: vf32_keep mask off by one lane (must be caught)"
cp -R "$WORK/csrc" "$WORK/planted"
P="$WORK/planted/simd_map.h"
plant "$P" 's/return _mm512_mask_blend_ps(k, _mm512_set1_ps(-INFINITY), v);/return _mm512_mask_blend_ps((__mmask16)(k >> 1), _mm512_set1_ps(-INFINITY), v);/' '_mm512_mask_blend_ps((__mmask16)(k >> 1)' "vf32_keep"
pobjs=()
for o in "${objs[@]}"; do case "$o" in *_avx512.o) ;; *) pobjs+=("$o") ;; esac; done
mkdir -p "$WORK/pobj"
for src in "$WORK"/planted/*_avx512.c; do
    o="$WORK/pobj/$(basename "${src%.c}").o"; pobjs+=("$o"); compile "$src" "$o" "$WORK/planted" "${X86[@]}" &
done
wait_compiles "$WORK"/pobj/*_avx512.o
"$CC" "${CFLAGS[@]}" "$WORK/obj/differential.o" "${pobjs[@]}" -lm -o "$WORK/differential-planted"
expect_caught "keep-mask bug" '^MISMATCH .*avx512(emulated) vs scalar' "$WORK/planted.log" \
    "$WORK/differential-planted" "$PLANTED_CASES" 1

# ---- planted bug in the bf16 kernel: must be caught ---------------------------
# the odd-K tail of the vdpbf16ps activation packing in the high half of its
# pair (the k = K - 1 product meets the weight's zero pad and is dropped)
echo "== planted bug: the bf16 kernel's odd-K tail in the wrong half of its pair (must be caught)"
G="$WORK/planted/gemm_bf16_impl.h"
plant "$G" 's/if (K \& 1) dst\[(K2 - 1) \* G16_MR\] = src\[K - 1\];/if (K \& 1) dst[(K2 - 1) * G16_MR] = (uint32_t)src[K - 1] << 16;/' '(uint32_t)src\[K - 1\] << 16;' "g16_pack_a_pairs"
rebuild_planted gemm16-planted "$WORK/planted/gemm_bf16_avx512bf16.c" "$WORK/planted" \
    "$WORK/obj/gemm16.o" "$WORK/obj/gemm_bf16.o"
expect_caught "bf16 GEMM tail bug" '^MISMATCH .*level 3 vs scalar' "$WORK/gemm16-planted.log" \
    "$WORK/gemm16-planted" "$PLANTED_CASES" 1

# the same bug in the AMX kernel's packing (an odd K's last element in the
# high half of its pair, where the weight's pair holds 0)
echo "== planted bug: the AMX kernel's odd-K tail in the wrong half of its pair (must be caught)"
X="$WORK/planted/gemm_bf16_amx.c"
cp "$WORK/csrc/gemm_bf16_amx.c" "$X"
plant "$X" 's|w = src\[2 \* q\]; /\* an odd K.s last pair: high half 0 \*/|w = (uint32_t)src[2 * q] << 16;|' 'w = (uint32_t)src\[2 \* q\] << 16;' "amx_pack_a"
rebuild_planted gemm16-planted-amx "$X" "$WORK/planted" "$WORK/obj/gemm16.o" "$WORK/obj/gemm_bf16.o"
expect_caught "AMX GEMM tail bug" '^MISMATCH .*level 4 (amx) vs scalar' "$WORK/gemm16-planted-amx.log" \
    "$WORK/gemm16-planted-amx" "$PLANTED_CASES" 1
# ---- planted bug in the bf16 attention kernel: must be caught -----------------
# an odd D's last key element dropped from its pair (that term of q . k lost)
echo "== planted bug: the bf16 attention kernel drops an odd D's last key element (must be caught)"
A="$WORK/planted/attention_impl.h"
cp "$WORK/csrc/attention_avx512bf16.c" "$WORK/planted/attention_avx512bf16.c"
plant "$A" 's/^    return row\[2 \* p\];  \/\* odd D: the high half is 0 \*\/$/    return 0u;/' '^    return 0u;$' "key_pair"
rebuild_planted bf16-attention-planted "$WORK/planted/attention_avx512bf16.c" "$WORK/planted" \
    "$WORK/obj/bf16_attention.o"
expect_caught "bf16 attention bug" '^MISMATCH .*level 3 vs scalar' \
    "$WORK/bf16-attention-planted.log" "$WORK/bf16-attention-planted" "$PLANTED_CASES" 1

# the probabilities of keys 2t and 2t + 1 swapped in the pairs of the first
# eight query columns (each meets the other key's values in P.V)
echo "== planted bug: the bf16 attention kernel pairs P with the wrong keys (must be caught)"
cp -R "$WORK/csrc" "$WORK/plantedpairs"
Q="$WORK/plantedpairs/attention_impl.h"
plant "$Q" 's/^    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,$/    16, 0, 17, 1, 18, 2, 19, 3, 20, 4, 21, 5, 22, 6, 23, 7,/' '^    16, 0, 17, 1, 18, 2,' "fa_pair_cat"
rebuild_planted bf16-attention-planted-pairs "$WORK/plantedpairs/attention_avx512bf16.c" "$WORK/plantedpairs" \
    "$WORK/obj/bf16_attention.o"
expect_caught "bf16 probability pairs bug" '^MISMATCH .*level 3 vs scalar' \
    "$WORK/bf16-attention-planted-pairs.log" "$WORK/bf16-attention-planted-pairs" "$PLANTED_CASES" 1

# ---- planted bug in the AMX scores: must be caught ----------------------------
# the second 16-query tile of a 32-query column block stored over the first
echo "== planted bug: the AMX scores store their second query tile over the first (must be caught)"
cp -R "$WORK/csrc" "$WORK/plantedamx"
M="$WORK/plantedamx/attention_impl.h"
plant "$M" 's|if (two) _tile_stored(1, st + j \* MQ + ic + 16, MQ \* (int64_t)sizeof(T));|if (two) _tile_stored(1, st + j * MQ + ic, MQ * (int64_t)sizeof(T));|' 'if (two) _tile_stored(1, st + j \* MQ + ic, MQ' "scores_tile_amx"
rebuild_planted bf16-attention-planted-amx "$WORK/plantedamx/attention_amx.c" "$WORK/plantedamx" \
    "$WORK/obj/bf16_attention.o"
expect_caught "AMX scores bug" '^MISMATCH .*level 4 vs scalar' \
    "$WORK/bf16-attention-planted-amx.log" "$WORK/bf16-attention-planted-amx" "$PLANTED_CASES" 1

# ---- planted bug in the AMX P.V: must be caught --------------------------------
# P's 16 x 16 blocks used untransposed (query and key pair swapped)
echo "== planted bug: the AMX P.V takes P's blocks untransposed (must be caught)"
cp -R "$WORK/csrc" "$WORK/plantedamx2"
M="$WORK/plantedamx2/attention_impl.h"
plant "$M" 's|^            fa_transpose16_epi32(blk);$|            (void)0;|' '^            (void)0;$' "pv_tile_amx"
rebuild_planted bf16-attention-planted-amx2 "$WORK/plantedamx2/attention_amx.c" "$WORK/plantedamx2" \
    "$WORK/obj/bf16_attention.o"
expect_caught "AMX P.V bug" '^MISMATCH .*level 4 vs scalar' \
    "$WORK/bf16-attention-planted-amx2.log" "$WORK/bf16-attention-planted-amx2" "$PLANTED_CASES" 1

# ---- planted bug in the 16-bit row conversions: must be caught ----------------
# level 2's bfloat16 rounding without its 0x7fff increment (rounds down
# except on odd ties): the bfloat16 RoPE rows must then differ from level 0
echo "== planted bug: level-2 bfloat16 rows rounded wrongly (must be caught)"
cp -R "$WORK/csrc" "$WORK/planted16"
H="$WORK/planted16/half_rows_avx512.c"
R="$WORK/planted16/bf16_round_avx512.h"
# the first rounding of the header, fa_bf16_round16 (the one the row conversions use)
plant "$R" '0,/_mm512_set1_epi32(0x7fff)/s//_mm512_set1_epi32(0)/' '_mm512_set1_epi32(0))' "fa_bf16_round16"
rebuild_planted differential-planted16 "$H" "$WORK/planted16" "$WORK/obj/differential.o"
expect_caught "bfloat16 rounding bug" '^MISMATCH rope avx512(emulated) vs scalar: dtype=2' \
    "$WORK/planted16.log" "$WORK/differential-planted16" "$PLANTED_CASES" 1
echo "== emulated AVX-512 job passed in $((SECONDS - start)) s"
