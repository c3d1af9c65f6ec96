/**
 * What the OpenAI serving layer needs to know about the deployment: the served model's name and limits
 * and the diffusion defaults for requests that do not set them. The server provides it from its
 * configuration (CLI flags / VDIFF_* variables).
 */
import { Context, Layer } from "effect"
import type { Remasking } from "../engine/Engine.js"

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
