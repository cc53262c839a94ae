// Geometry of the condensed convolution (srigl_condensed_conv2d, see condensed_conv_ffi.inc): shared by every
// instruction-set copy of condensed_conv_impl.inc, the handler and the test harness.
//
// The input x (B, H, W, C) NHWC is packed once per call into "planes", one per (phase, channel): with strides
// (sh, sw) a padded row hp / column wp belongs to phase (hp % sh) * sw + wp % sw at plane coordinates
// (hq, wq) = (hp / sh, wp / sw), so every tap of a strided convolution becomes a stride-1 shift within one
// plane. Inside a plane the batch is split into Bo chunks of `bi` images, and the layout is
// [bo][hq][wq][b_i]: a "position" (bo, oh, ow, b_i) of the output grid reads tap (dy, dx, c) at
//   plane((dy % sh) * sw + dx % sw, c) + position + ((dy / sh) * Wq + dx / sw) * bi,
// one constant offset per tap, so `TP` consecutive positions read `TP` consecutive floats (one vector load).
// The zero padding lives in the packed planes (written by the packing, never a separate padded copy of x).
// Positions are computed in "runs" of `rows` output rows of one batch chunk: ((rows - 1) * Wq + OW) * bi
// consecutive positions, including (rows - 1) * (Wq - OW) * bi positions in the padding columns, which are
// computed and discarded. bi and rows are chosen per call to waste the fewest positions (PlanConv).
#pragma once

#include <algorithm>
#include <cstdint>

namespace srigl_condensed {

// One tap of a neuron: its offset from a position in the packed input (ConvGeom::tap_offset) and its weight.
struct ConvTap {
  int32_t off;
  float w;
};

struct ConvGeom {
  int64_t B, H, W, C;    // input
  int64_t kh, kw, sh, sw;
  int64_t pt, pl;        // zero padding before the first row / column (the rest follows from OH, OW)
  int64_t OH, OW;        // output rows / columns
  int64_t n_out;         // output channels
  int64_t TP;            // positions per tile (the ISA copy's vector width times its vectors per tile)
  // Packed layout (PlanConv)
  int64_t bi, Bo;        // images per batch chunk, chunks
  int64_t Hq, Wq;        // plane rows / columns
  int64_t phases;        // sh * sw
  int64_t plane;         // floats per plane: plane_data() and up to 31 floats of padding
  int64_t rows;          // output rows per run
  int64_t runs_per_chunk;

  int64_t packed_floats() const { return phases * C * plane; }
  int64_t plane_data() const { return Bo * Hq * Wq * bi; }  // floats of a plane that packing writes
  int64_t n_runs() const { return Bo * runs_per_chunk; }
  // Positions of run `run` (including discarded padding-column positions).
  int64_t run_rows(int64_t run) const { return std::min(rows, OH - (run % runs_per_chunk) * rows); }
  int64_t run_length(int64_t run) const { return ((run_rows(run) - 1) * Wq + OW) * bi; }
  int64_t run_start(int64_t run) const {
    return ((run / runs_per_chunk) * Hq + (run % runs_per_chunk) * rows) * Wq * bi;
  }
  int64_t run_tiles(int64_t run) const { return (run_length(run) + TP - 1) / TP; }
  // Offset of flat kernel index i (into (kh, kw, C)) from a position, in floats.
  int64_t tap_offset(int64_t i) const {
    const int64_t dy = i / (kw * C), dx = (i / C) % kw, c = i % C;
    return ((dy % sh) * sw + dx % sw) * C * plane + c * plane + ((dy / sh) * Wq + dx / sw) * bi;
  }
  // Output element offset (of channel 0) of position q of run `run`, or -1 for a discarded position.
  int64_t out_offset(int64_t run, int64_t q) const {
    const int64_t row_len = Wq * bi;
    const int64_t r = q / row_len, rem = q % row_len, ow = rem / bi, b = (run / runs_per_chunk) * bi + rem % bi;
    const int64_t oh = (run % runs_per_chunk) * rows + r;
    if (ow >= OW || b >= B || r >= run_rows(run)) return -1;
    return ((b * OH + oh) * OW + ow) * n_out;
  }
};

// Chooses bi (a power of two up to TP) and rows per run that compute the fewest positions (ties: the smallest
// bi, whose batch chunks keep the working set of a run small, then the most rows, fewest runs), and fills the
// layout fields. OH, OW >= 1 and B >= 1.
inline void PlanConv(ConvGeom& g) {
  g.phases = g.sh * g.sw;
  const int64_t hp = g.pt + g.H, wp = g.pl + g.W;  // padded extent that holds data (bottom/right: zeros)
  // Plane rows/columns: every tap of every output stays inside its plane.
  g.Hq = std::max((g.OH - 1) + (g.kh - 1) / g.sh + 1, (hp + g.sh - 1) / g.sh);
  g.Wq = std::max((g.OW - 1) + (g.kw - 1) / g.sw + 1, (wp + g.sw - 1) / g.sw);
  int64_t best_cost = -1;
  for (int64_t bi = 1; bi <= g.TP; bi *= 2) {
    const int64_t Bo = (g.B + bi - 1) / bi;
    for (int64_t rows = 1; rows <= g.OH; ++rows) {
      const int64_t full = g.OH / rows, last = g.OH % rows;
      auto tiles = [&](int64_t r) { return (((r - 1) * g.Wq + g.OW) * bi + g.TP - 1) / g.TP; };
      const int64_t cost = Bo * (full * tiles(rows) + (last ? tiles(last) : 0));
      if (best_cost < 0 || cost < best_cost || (cost == best_cost && g.bi == bi)) {
        best_cost = cost;
        g.bi = bi;
        g.rows = rows;
      }
    }
    if (bi >= g.B) break;  // larger chunks only add empty batch slots
  }
  g.Bo = (g.B + g.bi - 1) / g.bi;
  g.plane = g.plane_data();
  // Plane stride: whole cache lines, an odd number of them. The taps of a tile read the same position of
  // many planes; a stride that is a multiple of 4 KiB put all of them in one L1 set (3x slower at batch 256).
  g.plane = (g.plane + 15) / 16 * 16;
  if ((g.plane / 16) % 2 == 0) g.plane += 16;
  g.runs_per_chunk = (g.OH + g.rows - 1) / g.rows;
}

}  // namespace srigl_condensed
