/**
 * What is left of the old serving module, which is now split by concern: plan.ts (request → engine
 * settings, checks), run.ts (the scheduler), render.ts (JSON and SSE). It re-exports the checks that
 * models.ts and tokenization.ts import, and holds `plannedSteps` until the engine's own `stepsTotal`
 * reaches the scheduler's step events (snapshots' total_steps then come from the engine).
 */
import type { SamplingSettings } from "../engine/Engine.js"

export { checkModel, checkTokenIds } from "./plan.js"

/**
 * Denoising steps a sequence runs in all, as the engine plans them (native/src/core/sampler.cpp
 * plan_blocks): the step budget shared evenly over the blocks, the remainder to the first blocks, each
 * block's share clamped to [1, block length]. With parallel decoding the count depends on the model's
 * confidence; its upper bound is one step per answer token. An early stop may end either sooner.
 */
export const plannedSteps = (settings: SamplingSettings): number => {
  if ((settings.parallelThreshold ?? 0) > 0 || (settings.parallelFactor ?? 0) > 0) return settings.genLength
  const blocks = Math.ceil(settings.genLength / settings.blockLength)
  const base = Math.floor(settings.steps / blocks)
  const extra = settings.steps % blocks
  let total = 0
  for (let b = 0; b < blocks; b++) {
    const length = Math.min(settings.blockLength, settings.genLength - b * settings.blockLength)
    total += Math.min(Math.max(base + (b < extra ? 1 : 0), 1), length)
  }
  return total
}

