// Tiled attention with the online softmax (attention.h). The products are the ISA's gemm (K tiles as a
// weight-like B, V tiles as a k-major B, in any KV element type); the per-row softmax bookkeeping is plain
// loops over eight lanes, which the compiler vectorises for the baseline ISA, and the ISA's exp.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>

namespace vdiff::cpu {

namespace {

constexpr size_t kAlign = 16;  // floats in 64 bytes
size_t aligned(size_t floats) { return (floats + kAlign - 1) / kAlign * kAlign; }

size_t element_bytes(WType t) { return t == WType::F32 ? 4 : 2; }

// B's rows [j0, ...): keys or values from key j0 on.
MatB from_key(const MatB& B, int j0) {
  MatB out = B;
  out.data =
      static_cast<const char*>(B.data) + static_cast<size_t>(j0) * static_cast<size_t>(B.ld) * element_bytes(B.type);
  out.packed = nullptr;
  out.bf16_dot = false;  // f32 queries and probabilities times the keys and values widened
  return out;
}

// x[0..n) *= scale; returns max(x[0..n)).
float scale_and_max(float* x, int n, float scale) {
  for (int j = 0; j < n; ++j) x[j] *= scale;
  float lane[8];
  for (float& l : lane) l = -INFINITY;
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  float m = -INFINITY;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  for (float l : lane) m = l > m ? l : m;
  return m;
}

// x[0..n) -= m.
void subtract(float* x, int n, float m) {
  for (int j = 0; j < n; ++j) x[j] -= m;
}

float sum_of(const float* x, int n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] += x[j + l];
  float s = 0;
  for (; j < n; ++j) s += x[j];
  for (int l = 0; l < 8; ++l) s += lane[l];
  return s;
}

void scale_row(float* x, int n, float a) {
  for (int j = 0; j < n; ++j) x[j] *= a;
}

}  // namespace

size_t attention_scratch_floats(const Kernels& k, int rows, int head_dim) {
  const size_t r = static_cast<size_t>(std::max(rows, 1));
  return aligned(k.gemm_scratch_floats(std::max(head_dim, kKeyTile))) + aligned(r * kKeyTile) +
         aligned(r * static_cast<size_t>(head_dim)) + 2 * aligned(r);
}

void attention_rows(const Kernels& k, const AttentionRows& rows, int hd, float scale, const float* Q, int64_t ldq,
                    const MatB& K, const MatB& V, float* out, int64_t ldo, float* scratch) {
  const int count = rows.count;
  if (count <= 0) return;
  const size_t r = static_cast<size_t>(count);
  float* gemm_scratch = scratch;
  float* S = gemm_scratch + aligned(k.gemm_scratch_floats(std::max(hd, kKeyTile)));  // [count][kKeyTile]
  float* acc = S + aligned(r * kKeyTile);                                            // [count][hd]
  float* row_max = acc + aligned(r * static_cast<size_t>(hd));
  float* row_sum = row_max + aligned(r);
  const MatB K0 = from_key(K, 0), V0 = from_key(V, 0);

  // Rows attend non-decreasing numbers of keys. Those whose keys fit in one tile: the one-pass softmax,
  // a run of rows with the same keys at a time.
  int row = 0;
  while (row < count && rows.keys(row) <= kKeyTile) {
    const int n = rows.keys(row);
    int run = 1;
    while (row + run < count && rows.keys(row + run) == n) ++run;
    k.gemm(run, 0, n, hd, Q + row * ldq, ldq, K0, S, kKeyTile, false, gemm_scratch);
    for (int j = 0; j < run; ++j) k.softmax(S + static_cast<size_t>(j) * kKeyTile, n, scale);
    k.gemm(run, 0, hd, n, S, kKeyTile, V0, out + row * ldo, ldo, false, gemm_scratch);
    row += run;
  }
  if (row == count) return;

  // The rest, over tiles of keys: row i of the tiles' buffers is query row r0 + i.
  const int r0 = row, keys_max = rows.keys(count - 1);
  for (int j0 = 0; j0 < keys_max; j0 += kKeyTile) {
    const int kt = std::min(kKeyTile, keys_max - j0);
    int first = r0;  // the rows that attend a key of this tile: [first, count)
    while (rows.keys(first) <= j0) ++first;
    const int m = count - first, i0 = first - r0;
    float* s_rows = S + static_cast<size_t>(i0) * kKeyTile;
    float* acc_rows = acc + static_cast<size_t>(i0) * hd;
    k.gemm(m, 0, kt, hd, Q + first * ldq, ldq, from_key(K, j0), s_rows, kKeyTile, false, gemm_scratch);
    for (int i = i0; i < count - r0; ++i) {
      float* s = S + static_cast<size_t>(i) * kKeyTile;
      const int valid = std::min(kt, rows.keys(r0 + i) - j0);
      const float tile_max = scale_and_max(s, valid, scale);
      const float old_max = j0 == 0 ? -INFINITY : row_max[i];
      const float new_max = std::max(old_max, tile_max);
      subtract(s, valid, new_max);
      k.exp(s, s, valid);
      for (int j = valid; j < kt; ++j) s[j] = 0.0f;  // keys past the row's: no weight
      const float tile_sum = sum_of(s, valid);
      if (j0 == 0) {
        row_sum[i] = tile_sum;
      } else {
        const float alpha = std::exp(old_max - new_max);
        row_sum[i] = row_sum[i] * alpha + tile_sum;
        if (alpha != 1.0f) scale_row(acc + static_cast<size_t>(i) * hd, hd, alpha);
      }
      row_max[i] = new_max;
    }
    k.gemm(m, 0, hd, kt, s_rows, kKeyTile, from_key(V, j0), acc_rows, hd, j0 > 0, gemm_scratch);
  }
  for (int i = 0; i < count - r0; ++i) {
    const float* a = acc + static_cast<size_t>(i) * hd;
    float* o = out + (r0 + i) * ldo;
    const float sum = row_sum[i];
    for (int d = 0; d < hd; ++d) o[d] = a[d] / sum;
  }
}

}  // namespace vdiff::cpu
