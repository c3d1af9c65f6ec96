/**
 * The golden fixtures written by tools/reference/make_fixtures.py: tiny models under test/fixtures/golden/
 * and, per model, the reference's answers. Shared by every test that checks the engine against them.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import type { SamplingSettings } from "../../src/engine/Engine.js"
import type { NativeSamplingParams } from "../../src/engine/native.js"

export interface GoldenCase {
  readonly name: string
  readonly prompt: ReadonlyArray<number>
  readonly params: {
    readonly gen_length: number
    readonly block_length: number
    readonly steps: number
    readonly temperature: number
    readonly remasking: "low_confidence" | "random"
    readonly cfg_scale: number
    readonly logits_eos_inf: boolean
    readonly confidence_eos_eot_inf: boolean
    readonly eot_token_id: number
  }
  readonly answer: ReadonlyArray<number>
  /** Per step, the committed [answer position, token, probability] in ascending position. */
  readonly trace: ReadonlyArray<ReadonlyArray<readonly [number, number, number]>>
}

export const goldenDir = join(import.meta.dirname, "..", "fixtures", "golden")

/** The reference's generate cases of one fixture model. */
export const goldenCases = (model: string): ReadonlyArray<GoldenCase> =>
  JSON.parse(readFileSync(join(goldenDir, `${model}.json`), "utf8")).generate

/** A case's settings in the Engine service's terms (every reference option spelled out), with a seed. */
export const engineSettingsOf = (c: GoldenCase, seed = 0): SamplingSettings => ({
  genLength: c.params.gen_length,
  blockLength: c.params.block_length,
  steps: c.params.steps,
  temperature: c.params.temperature,
  remasking: c.params.remasking,
  cfgScale: c.params.cfg_scale,
  seed,
  logitsEosInf: c.params.logits_eos_inf,
  confidenceEosEotInf: c.params.confidence_eos_eot_inf,
  eotTokenId: c.params.eot_token_id
})

/** A case's settings in the addon's terms, with optional overrides. */
export const nativeParamsOf = (c: GoldenCase, overrides: Partial<NativeSamplingParams> = {}): NativeSamplingParams => ({
  ...engineSettingsOf(c),
  ...overrides
})
