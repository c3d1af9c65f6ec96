/**
 * How much of the keys and values a step's forward attends it reads from a KV cache instead of computing
 * them: the figure behind `vdiff_kv_positions_reused_total` / `vdiff_kv_positions_attended_total`.
 *
 * Counted per sequence forward, in canvas positions (not per query, layer or head):
 *   attended — the positions whose keys the forward's queries attend;
 *   reused   — of those, the ones read from the sequence's KV cache (the rest are computed by the forward).
 *
 * Block decoding (blocks of B aligned at 0, the prompt's tail in the first open block b0 = P div B):
 *   prefill           attends [0, b0·B), all computed but the first C positions when the prefix cache
 *                     held them (copied: reused); with all of them held there is no prefill; in chunks
 *                     (--prefill-chunk) each forward attends [0, its end) and reuses what came before it;
 *   denoise / commit  of block b attend [0, (b+1)·B): with the exact prefix cache [0, b·B) is reused and
 *                     the block computed; without a cache the whole window is computed every step.
 * Full canvas (LLaDA): every forward attends the whole canvas (prompt, answer, suffix; twice under cfg). A
 * forward that refreshes the cache computes it all; otherwise "prefix" reuses the positions before the
 * current block and "dual" everything but the block.
 *
 * Derived from what a step reports (phase, block, whether a refresh happened) and the sequence's settings,
 * as the engine documents its forwards (native/src/core/engine.h).
 */
import type { ModelFamily, SamplingParams } from "../config/sampling.js"

export interface KvPositions {
  readonly attended: number
  readonly reused: number
}

export interface KvStep {
  readonly phase: "prefill" | "denoise" | "commit"
  /** The answer block the step worked on (0: the first block that holds answer positions). */
  readonly block: number
  /** Whether this step's forward refreshed a full-canvas cache (kvRefreshes grew). */
  readonly refreshed: boolean
  /** Block decoding: the prompt positions the sequence copied from the prefix cache (absent: 0). */
  readonly promptCached?: number | undefined
  /**
   * Block decoding: the positions the sequence's forwards computed so far, this step's included, and those
   * this step's forward computed (absent: a prefill computes the prompt's whole blocks in one forward).
   */
  readonly positionsComputed?: number | undefined
  readonly computed?: number | undefined
}

export interface KvSequence {
  readonly promptLength: number
  readonly suffixLength: number
  readonly settings: Pick<SamplingParams, "genLength" | "blockLength" | "kvCache" | "cfgScale">
}

export const kvPositions = (family: ModelFamily, sequence: KvSequence, step: KvStep): KvPositions => {
  const { promptLength: P, settings } = sequence
  const cache = settings.kvCache ?? "none"
  if (family.decoding === "block") {
    const B = family.blockLength
    const first = Math.floor(P / B)
    if (step.phase === "prefill") {
      // Prefill forwards come first: this one computed [end - computed, end), the cache holding [0, end - computed).
      if (step.positionsComputed === undefined || step.computed === undefined)
        return { attended: first * B, reused: step.promptCached ?? 0 }
      const end = (step.promptCached ?? 0) + step.positionsComputed
      return { attended: end, reused: end - step.computed }
    }
    const b = first + step.block
    return { attended: (b + 1) * B, reused: cache === "none" ? 0 : b * B }
  }
  const copies = settings.cfgScale > 0 ? 2 : 1
  const G = settings.genLength
  const length = P + G + sequence.suffixLength
  if (cache === "none" || step.refreshed) return { attended: copies * length, reused: 0 }
  const blockStart = Math.min(G, step.block * settings.blockLength)
  const computed = cache === "prefix" ? length - (P + blockStart) : Math.min(settings.blockLength, G - blockStart)
  return { attended: copies * length, reused: copies * (length - computed) }
}
