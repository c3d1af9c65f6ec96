// Attention of one head over a block of queries on the CPU kernels (kernels.h), tiled over the keys with
// flash attention's online softmax: the scores are computed one tile of kKeyTile keys at a time, each
// row keeping its running maximum and sum and rescaling its output accumulator when the maximum grows,
// so no more than rows x kKeyTile scores are held whatever the number of keys.
//
// A row whose keys fit in one tile takes the one-pass softmax instead (scores, softmax normalised, then
// P·V): the same values, in the same order, as the untiled attention this replaced. Short canvases are
// thus unchanged bit for bit, and pay no rescaling.
//
// Every row's result depends only on its query, its keys and values, and how many keys it attends —
// never on which other rows share the call, nor on the thread — so a cached read equals the full forward
// bit for bit, as the backend promises (backend.h).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpu/kernels.h"

namespace vdiff::cpu {

constexpr int kKeyTile = 256;  // keys per tile of scores

// Which keys the query rows attend: row r sits at canvas position first + r and attends the keys
// [0, keys(r)) — all `length` of them (block == 0, bidirectional), or with block-causal attention
// (block B > 0) those before the end of its block, min(length, (position / B + 1) * B).
struct AttentionRows {
  int count = 0;   // query rows
  int first = 0;   // canvas position of row 0
  int length = 0;  // keys of the canvas
  int block = 0;
  int keys(int r) const {
    const int i = first + r;
    return block > 0 ? std::min(length, (i / block + 1) * block) : length;
  }
};

// Floats of 64-byte aligned scratch one call over at most `rows` rows of a head of `head_dim` needs.
size_t attention_scratch_floats(const Kernels& k, int rows, int head_dim);

// out[r][0..hd) = sum_j softmax_j(scale * Q[r] · K[j]) V[j] over the keys j < rows.keys(r), for every
// row r of `rows` (at most the `rows` attention_scratch_floats was sized for).
//   Q: rows.count rows of hd floats, ldq apart; out likewise, ldo apart.
//   K: the keys as a weight-like matrix (k_major false): key j is the row of hd elements at j * K.ld.
//   V: the values (k_major true): value j is the row of hd elements at j * V.ld.
// K and V may be f32, bf16 or f16 (a KV cache's element type); `packed` must be null.
void attention_rows(const Kernels& k, const AttentionRows& rows, int hd, float scale, const float* Q, int64_t ldq,
                    const MatB& K, const MatB& V, float* out, int64_t ldo, float* scratch);

}  // namespace vdiff::cpu
