/**
 * What the OpenAI serving layer needs to know about the deployment: the served model's name and limits
 * and the diffusion defaults for requests that do not set them. The server provides it from its
 * configuration (CLI flags / VDIFF_* variables).
 */
import { Context, Layer } from "effect"
import type { EngineDefaults, ModelFamily } from "../config/sampling.js"

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
  /**
   * The model's family (src/config/sampling.ts: which settings apply, and their defaults there); absent:
   * LLaDA (full-canvas decoding).
   */
  readonly family?: ModelFamily | undefined
  /**
   * Tokens that end an answer besides the tokenizer's EOS and end-of-turn: the model's own (config.json's
   * eos_token_id list), where its engine stops at them (block decoding stops after the block holding one).
   */
  readonly endTokenIds?: ReadonlyArray<number> | undefined
}

export class ServingConfig extends Context.Tag("vdiff/ServingConfig")<ServingConfig, ServingConfigShape>() {}

export const layer = (config: ServingConfigShape): Layer.Layer<ServingConfig> => Layer.succeed(ServingConfig, config)
