/**
 * What the OpenAI serving layer needs to know about the deployment: the served model's name and limits
 * and the diffusion defaults for requests that do not set them. The server provides it from its
 * configuration (CLI flags / VDIFF_* variables).
 */
import { Context, Layer } from "effect"
import type { KvCacheMode, Remasking } from "../engine/Engine.js"

export interface ServingDefaults {
  /** Answer length when a request sets no max_tokens (capped by what the context has left). */
  readonly maxTokens: number
  /** Denoising steps when a request sets no diffusion_steps; null: one step per answer token. */
  readonly steps: number | null
  /** Semi-autoregressive block length (capped by the answer length). */
  readonly blockLength: number
  readonly remasking: Remasking
  readonly cfgScale: number
  readonly temperature: number
  /** top_k when a request sets none; absent or 0: off. */
  readonly topK?: number | undefined
  /** top_p when a request sets none; absent or 1: off. */
  readonly topP?: number | undefined
  /**
   * Parallel decoding for requests that choose neither parallel_threshold nor parallel_factor: at most
   * one of these two may be > 0; absent or 0: the fixed per-step quota (the reference's output).
   */
  readonly parallelThreshold?: number | undefined
  readonly parallelFactor?: number | undefined
  /**
   * early_stop when a request sets none; absent: true. It never changes an answer's text (everything up to
   * its first end token is decided before the stop), only saves the steps after it.
   */
  readonly earlyStop?: boolean | undefined
  /** kv_cache when a request sets none; absent: "none" (exact: every step evaluates the whole canvas). */
  readonly kvCache?: KvCacheMode | undefined
}

export interface ServingConfigShape {
  /** The name clients must use in `model` (--served-model-name, else the model directory's name). */
  readonly modelName: string
  /** When the model was loaded (unix seconds), for /v1/models. */
  readonly created: number
  /** Prompt plus answer tokens may not exceed this (the model's context). */
  readonly maxModelLen: number
  readonly defaults: ServingDefaults
}

export class ServingConfig extends Context.Tag("vdiff/ServingConfig")<ServingConfig, ServingConfigShape>() {}

export const layer = (config: ServingConfigShape): Layer.Layer<ServingConfig> => Layer.succeed(ServingConfig, config)
