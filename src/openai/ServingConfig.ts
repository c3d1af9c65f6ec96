/**
 * What the OpenAI serving layer needs to know about the deployment: the served model's name and limits
 * and the diffusion defaults for requests that do not set them. The server provides it from its
 * configuration (CLI flags / VDIFF_* variables).
 */
import { Context, Layer } from "effect"
import type { EngineDefaults } from "../config/sampling.js"

/**
 * What a request gets for the sampling settings it leaves out (src/config/sampling.ts): the answer length
 * as maxTokens (capped by what the context has left), every other setting by its engine name; absent or
 * null: the setting's documented default (diffusion steps: one per answer token).
 * `Sampling.defaultsFromConfig` makes it from the server's settings.
 */
export type ServingDefaults = EngineDefaults

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
