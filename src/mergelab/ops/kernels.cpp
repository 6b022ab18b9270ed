// Compiled kernels for the streaming passes of global TIES and for task arithmetic
// (mergelab.ops.native builds and loads them).
//
// The plain torch path builds each chunk's float32 task vectors and runs ~14 eager operations over
// (T, chunk) arrays per pass. Here every per-element step runs in one loop, in registers. The
// arithmetic is the plain path's, operation for operation (built without fast-math and without
// fused multiply-add contraction). Sums over the task vectors run t = 0, 1, ..., T-1, which is the
// order of torch's vectorised sum over the task dimension -- except in the last (chunk mod 32)
// positions of a chunk (AVX2), which torch sums in four interleaved accumulators. So the selection
// is exact and identical, and merged values are the plain path's bits everywhere but there, where
// they may differ by float rounding; tests/ops/test_native.py checks both.
//
// Storage: bfloat16 (as uint16 bits) or float32 for the base, the models and the output alike.
// In the merge, the number of task vectors T (1..8) is a template constant: the loops over tasks
// unroll and the loop over positions vectorises. Counts are added into the caller's int64 rows.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <utility>

namespace {

enum Storage { BFLOAT16 = 0, FLOAT32 = 1 };
enum MergeFunc { MEAN = 0, SUM = 1, MAX = 2 };

inline float widen(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }
inline float widen(float value) { return value; }

inline uint32_t bits_of(float value) { return __builtin_bit_cast(uint32_t, value); }

// float32 -> bfloat16, rounded to nearest even (torch's c10::BFloat16 for finite values)
inline void narrow(float value, uint16_t* out) {
    uint32_t bits = bits_of(value);
    *out = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
inline void narrow(float value, float* out) { *out = value; }

const uint32_t kInfBits = 0x7F800000u;  // float32 keys at or above this are Inf or NaN

// The float32 bits of |model - base|: magnitudes' bits are ordered like their values.
template <typename S>
inline uint32_t magnitude_key(S model, float base) { return bits_of(std::fabs(widen(model) - base)); }

template <typename S>
int high_counts(int64_t n, int tasks, const void* base_ptr, const void* const* models, int64_t* __restrict__ counts) {
    const S* __restrict__ base = static_cast<const S*>(base_ptr);
    constexpr int64_t kGroup = 256;  // keys of a group computed vectorised, then counted
    uint32_t bad = 0;
    for (int t = 0; t < tasks; ++t) {
        const S* __restrict__ model = static_cast<const S*>(models[t]);
        int64_t* __restrict__ row = counts + static_cast<int64_t>(t) * 32768;
        for (int64_t lo = 0; lo < n; lo += kGroup) {
            const int64_t width = std::min(kGroup, n - lo);
            uint32_t bins[kGroup];
            for (int64_t j = 0; j < width; ++j) {
                const uint32_t key = magnitude_key(model[lo + j], widen(base[lo + j]));
                bad |= key >= kInfBits;
                bins[j] = (key >> 16) & 0x7FFFu;  // a NaN's key is masked into range; the call then reports it
            }
            for (int64_t j = 0; j < width; ++j) ++row[bins[j]];
        }
    }
    return bad == 0;
}

// One pass of a selection whose k-th key is expected in a window of high bins [lows[t], lows[t] + width):
// above[t] += the keys past the window (a vectorised count), fine[t, p, key & 0xFFFF] += 1 for the keys in
// bin lows[t] + p (a few per cent). Returns 0 if a difference is Inf or NaN (counts then incomplete).
template <typename S>
int window_counts(int64_t n, int tasks, const void* base_ptr, const void* const* models, const uint32_t* lows,
                  uint32_t width, int64_t* __restrict__ above, int64_t* __restrict__ fine) {
    const S* __restrict__ base = static_cast<const S*>(base_ptr);
    constexpr int64_t kGroup = 16;  // few groups of 16 hold a key inside the window
    uint32_t bad = 0;
    for (int t = 0; t < tasks; ++t) {
        const S* __restrict__ model = static_cast<const S*>(models[t]);
        int64_t* __restrict__ row = fine + static_cast<int64_t>(t) * width * 65536;
        const uint32_t low = lows[t], end = (lows[t] + width) << 16;  // keys >= end are past the window
        int64_t past = 0;
        for (int64_t lo = 0; lo < n; lo += kGroup) {
            const int64_t span = std::min(kGroup, n - lo);
            uint32_t keys[kGroup];
            uint32_t inside = 0;
            for (int64_t j = 0; j < span; ++j) {
                const uint32_t key = magnitude_key(model[lo + j], widen(base[lo + j]));
                bad |= key >= kInfBits;
                keys[j] = key;
                past += key >= end;
                inside |= ((key >> 16) - low) < width;  // wraps to a huge value below the window
            }
            if (!inside) continue;
            for (int64_t j = 0; j < span; ++j) {
                const uint32_t bin = (keys[j] >> 16) - low;
                if (bin < width) ++row[static_cast<int64_t>(bin) * 65536 + (keys[j] & 0xFFFFu)];
            }
        }
        above[t] += past;
    }
    return bad == 0;
}

template <typename S>
void digit_counts(int64_t n, int tasks, const void* base_ptr, const void* const* models, const uint32_t* prefixes,
                  int64_t* __restrict__ counts) {
    const S* __restrict__ base = static_cast<const S*>(base_ptr);
    constexpr int64_t kGroup = 16;  // keys of a group computed vectorised; few groups hold a key with the prefix
    for (int t = 0; t < tasks; ++t) {
        const S* __restrict__ model = static_cast<const S*>(models[t]);
        int64_t* __restrict__ row = counts + static_cast<int64_t>(t) * 65536;
        const uint32_t prefix = prefixes[t];
        for (int64_t lo = 0; lo < n; lo += kGroup) {
            const int64_t width = std::min(kGroup, n - lo);
            uint32_t keys[kGroup];
            uint32_t any = 0;
            for (int64_t j = 0; j < width; ++j) {
                keys[j] = magnitude_key(model[lo + j], widen(base[lo + j]));
                any |= (keys[j] >> 16) == prefix;
            }
            if (!any) continue;
            for (int64_t j = 0; j < width; ++j)
                if ((keys[j] >> 16) == prefix) ++row[keys[j] & 0xFFFFu];
        }
    }
}

// Global TIES on one position, as mergelab.methods.ties.ties(scope="global") followed by the
// engine's base + delta. Task vectors are the pack I (one index per task: the loops over tasks are
// written out by the compiler, so the loop over positions that calls this can be vectorised).
// Sets *wait where the sign sum is 0 while some trimmed entry is not (elected +1 for now).
template <typename S, int kMode, std::size_t... I>
inline float ties_position(float b, const float (&tau)[sizeof...(I)], const float (&threshold)[sizeof...(I)],
                           float scaling, int64_t& sign_total, uint32_t& wait, uint32_t& bad, std::index_sequence<I...>) {
    // masks as 0/1 floats multiplied in, as the plain path does (keep_mask_(...).mul_(taus)): branch-free
    const float kept[] = {(tau[I] * static_cast<float>(std::fabs(tau[I]) >= threshold[I]))...};
    float total = 0.0f;
    ((total += kept[I]), ...);  // t = 0, 1, ... in order, as torch's sum over the task dimension
    uint32_t nonzero = 0;
    ((nonzero |= kept[I] != 0.0f), ...);
    ((bad |= !(std::fabs(tau[I]) < INFINITY)), ...);
    const uint32_t positive = total > 0.0f, negative = total < 0.0f;
    sign_total += static_cast<int64_t>(positive) - static_cast<int64_t>(negative);
    wait = nonzero & ((positive | negative) ^ 1u);
    const float sign = negative ? -1.0f : 1.0f;  // 0 -> +1
    const float agrees[] = {static_cast<float>(kept[I] * sign > 0.0f)...};
    float delta;
    if (kMode == MAX) {
        float largest = 0.0f;
        ((largest = std::max(largest, std::fabs(agrees[I] * kept[I]))), ...);
        delta = largest * sign;
    } else {
        float merged = 0.0f, count = 0.0f;
        ((merged += agrees[I] * kept[I]), ...);
        ((count += agrees[I]), ...);
        // std::max, not fmaxf: a libm call stops the loop being vectorised
        delta = kMode == MEAN ? merged / std::max(count, 1.0f) : merged;
    }
    const float value = b + delta * scaling;
    bad |= !(std::fabs(value) < INFINITY);
    return value;
}

template <typename S, int kMode, std::size_t... I>
int ties_merge_fixed(int64_t n, const S* __restrict__ base, const S* const* models, const float* thresholds,
                     float scaling, S* __restrict__ out, uint8_t* __restrict__ waits, int64_t* totals,
                     std::index_sequence<I...> tasks) {
    const S* const model[] = {models[I]...};
    const float threshold[] = {thresholds[I]...};
    int64_t sign_total = 0, n_waiting = 0;
    uint32_t bad = 0;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
        const float b = widen(base[i]);
        const float tau[] = {(widen(model[I][i]) - b)...};
        uint32_t wait;
        const float value = ties_position<S, kMode>(b, tau, threshold, scaling, sign_total, wait, bad, tasks);
        waits[i] = static_cast<uint8_t>(wait);
        n_waiting += wait;
        narrow(value, out + i);
    }
    totals[0] = sign_total;
    totals[1] = n_waiting;
    return bad == 0;
}

// The positions i with waits[i] != 0, in order, into index (8 flags at a time: most words are 0),
// and their trimmed task-vector entries into trimmed (T rows of n_waiting), as the plain path keeps them.
template <typename S>
void collect_waiting(int64_t n, int tasks, const void* base_ptr, const void* const* models, const float* thresholds,
                     const uint8_t* waits, int64_t n_waiting, int64_t* index, float* trimmed) {
    int64_t found = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        std::memcpy(&word, waits + i, sizeof word);
        if (word == 0) continue;
        for (int64_t j = i; j < i + 8; ++j)
            if (waits[j]) index[found++] = j;
    }
    for (; i < n; ++i)
        if (waits[i]) index[found++] = i;
    const S* base = static_cast<const S*>(base_ptr);
    for (int t = 0; t < tasks; ++t) {
        const S* model = static_cast<const S*>(models[t]);
        for (int64_t j = 0; j < n_waiting; ++j) {
            const float tau = widen(model[index[j]]) - widen(base[index[j]]);
            trimmed[t * n_waiting + j] = tau * static_cast<float>(std::fabs(tau) >= thresholds[t]);
        }
    }
}

// Task arithmetic on n positions: base + scaling * sum_t (model_t - base), as
// mergelab.methods.task_arithmetic followed by the engine's base + delta.
template <typename S, std::size_t... I>
int task_arithmetic_fixed(int64_t n, const S* __restrict__ base, const S* const* models, float scaling,
                          S* __restrict__ out, std::index_sequence<I...>) {
    const S* const model[] = {models[I]...};
    uint32_t bad = 0;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
        const float b = widen(base[i]);
        const float tau[] = {(widen(model[I][i]) - b)...};
        ((bad |= !(std::fabs(tau[I]) < INFINITY)), ...);
        float total = 0.0f;
        ((total += tau[I]), ...);
        const float value = b + total * scaling;
        bad |= !(std::fabs(value) < INFINITY);
        narrow(value, out + i);
    }
    return bad == 0;
}

// Calls run(std::index_sequence of T) for T in 1..8, a compile-time constant in each instantiation
// (the loops over tasks unroll, the loop over positions vectorises); -1 for more models: a run-time T
// measured slower than the plain torch path, which is left to take them.
template <typename Run>
int with_task_count(int tasks, Run run) {
    switch (tasks) {
        case 1: return run(std::make_index_sequence<1>());
        case 2: return run(std::make_index_sequence<2>());
        case 3: return run(std::make_index_sequence<3>());
        case 4: return run(std::make_index_sequence<4>());
        case 5: return run(std::make_index_sequence<5>());
        case 6: return run(std::make_index_sequence<6>());
        case 7: return run(std::make_index_sequence<7>());
        case 8: return run(std::make_index_sequence<8>());
        default: return -1;
    }
}

template <typename S>
int task_arithmetic_for(int64_t n, int tasks, const void* base, const void* const* models, float scaling, void* out) {
    const S* b = static_cast<const S*>(base);
    const S* const* m = reinterpret_cast<const S* const*>(models);
    S* o = static_cast<S*>(out);
    return with_task_count(tasks, [&](auto each) { return task_arithmetic_fixed<S>(n, b, m, scaling, o, each); });
}

template <typename S, int kMode>
int ties_merge_for(int64_t n, int tasks, const void* base, const void* const* models, const float* thresholds,
                   float scaling, void* out, uint8_t* waits, int64_t* totals) {
    const S* b = static_cast<const S*>(base);
    const S* const* m = reinterpret_cast<const S* const*>(models);
    S* o = static_cast<S*>(out);
    return with_task_count(tasks, [&](auto each) {
        return ties_merge_fixed<S, kMode>(n, b, m, thresholds, scaling, o, waits, totals, each);
    });
}

template <typename S>
int ties_merge_mode(int64_t n, int tasks, const void* base, const void* const* models, const float* thresholds,
                    float scaling, int mode, void* out, uint8_t* waits, int64_t* totals) {
    if (mode == MAX) return ties_merge_for<S, MAX>(n, tasks, base, models, thresholds, scaling, out, waits, totals);
    if (mode == SUM) return ties_merge_for<S, SUM>(n, tasks, base, models, thresholds, scaling, out, waits, totals);
    return ties_merge_for<S, MEAN>(n, tasks, base, models, thresholds, scaling, out, waits, totals);
}

}  // namespace

extern "C" {

int mergelab_abi_version() { return 1; }

// counts: T x 32768 int64 (the high 16 bits of magnitude keys; the sign bit is 0). Returns 0 if a
// difference is Inf or NaN (the counts are then incomplete).
int mergelab_abs_diff_high_counts(int64_t n, int tasks, int storage, const void* base, const void* const* models,
                                  int64_t* counts) {
    if (storage == BFLOAT16) return high_counts<uint16_t>(n, tasks, base, models, counts);
    return high_counts<float>(n, tasks, base, models, counts);
}

// above: T int64; fine: T x width x 65536 int64 (see window_counts).
int mergelab_abs_diff_window_counts(int64_t n, int tasks, int storage, const void* base, const void* const* models,
                                    const uint32_t* lows, uint32_t width, int64_t* above, int64_t* fine) {
    if (storage == BFLOAT16) return window_counts<uint16_t>(n, tasks, base, models, lows, width, above, fine);
    return window_counts<float>(n, tasks, base, models, lows, width, above, fine);
}

// counts: T x 65536 int64, the low 16 bits of the keys whose high 16 bits are prefixes[t].
void mergelab_abs_diff_digit_counts(int64_t n, int tasks, int storage, const void* base, const void* const* models,
                                    const uint32_t* prefixes, int64_t* counts) {
    if (storage == BFLOAT16) return digit_counts<uint16_t>(n, tasks, base, models, prefixes, counts);
    return digit_counts<float>(n, tasks, base, models, prefixes, counts);
}

// totals[0] = sum of elected signs, totals[1] = positions waiting for the majority sign, listed in
// index[0 : totals[1]] with their trimmed entries in trimmed (T x totals[1]; room for T x n; waits: n
// bytes of scratch). Returns 1; 0 if a task vector or result is Inf or
// NaN (out is then not usable); -1 if T > 8 (nothing done).
int mergelab_ties_merge(int64_t n, int tasks, int storage, const void* base, const void* const* models,
                        const float* thresholds, float scaling, int mode, void* out, uint8_t* waits, int64_t* index,
                        float* trimmed, int64_t* totals) {
    const bool bf16 = storage == BFLOAT16;
    const int status = bf16 ? ties_merge_mode<uint16_t>(n, tasks, base, models, thresholds, scaling, mode, out, waits, totals)
                            : ties_merge_mode<float>(n, tasks, base, models, thresholds, scaling, mode, out, waits, totals);
    if (status == 1 && totals[1] > 0) {
        if (bf16) collect_waiting<uint16_t>(n, tasks, base, models, thresholds, waits, totals[1], index, trimmed);
        else collect_waiting<float>(n, tasks, base, models, thresholds, waits, totals[1], index, trimmed);
    }
    return status;
}

// out = base + scaling * sum_t (models[t] - base). Returns 1; 0 if a task vector or result is Inf or
// NaN (out is then not usable); -1 if T > 8 (nothing done).
int mergelab_task_arithmetic(int64_t n, int tasks, int storage, const void* base, const void* const* models,
                             float scaling, void* out) {
    if (storage == BFLOAT16) return task_arithmetic_for<uint16_t>(n, tasks, base, models, scaling, out);
    return task_arithmetic_for<float>(n, tasks, base, models, scaling, out);
}

}  // extern "C"
