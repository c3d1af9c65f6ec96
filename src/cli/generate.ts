/**
 * `vdiff generate`: one generation from token ids straight through the native addon, for trying a model
 * and timing it without the server. Drives the same step API the scheduler does, with the settings a
 * request of the same fields gets from `vdiff serve`: the model family's defaults and readings (SDAR's
 * block of 4, steps per block on block models, Dream's algorithm), under the model's generation_config.json.
 */
import { Either } from "effect"
import type { CpuIsa } from "../config/Config.js"
import { readModelDefaults } from "../config/generationConfig.js"
import * as Sampling from "../config/sampling.js"
import { familyOf, unusedTensorsWarning } from "../engine/Engine.js"
import { loadAddon, type NativeRemasking } from "../engine/native.js"

export interface GenerateOptions {
  readonly model: string
  /** Told what is worth a warning about the model (tensors it does not read). */
  readonly onWarning?: ((message: string) => void) | undefined
  readonly prompt: ReadonlyArray<number>
  readonly genLength: number
  /** Absent: the family's default (as a request without the field gets it). */
  readonly blockLength?: number | undefined
  readonly steps?: number | undefined
  readonly temperature: number
  readonly cfgScale?: number | undefined
  readonly remasking?: NativeRemasking | undefined
  readonly seed: number
  /** Forward-pass threads; 0: all cores. */
  readonly threads: number
  readonly device: "auto" | "cpu" | "cuda"
  /** Quantize the matrices at load (CPU); "none": as stored. */
  readonly quantize: "none" | "q8_0" | "q4_0"
  /** The CPU kernels' instruction set; "auto": the widest the CPU has. */
  readonly cpuIsa: CpuIsa
}

export interface GenerateResult {
  readonly answer: Array<number>
  readonly finish_reason: "length" | "eos" | null
  readonly steps: number
  readonly load_ms: number
  readonly ms: number
  /** Answer tokens per second of denoising (gen_length / ms). */
  readonly tokens_per_s: number
}

export const generate = async (options: GenerateOptions): Promise<GenerateResult> => {
  const addon = loadAddon()
  const loadStart = performance.now()
  const engine = await addon.loadModel(options.model, {
    threads: options.threads,
    device: options.device,
    quantize: options.quantize,
    cpuIsa: options.cpuIsa
  })
  const loadMs = performance.now() - loadStart
  const family = familyOf(engine.info())
  const unused = engine.info().unusedTensors ?? []
  if (unused.length > 0) options.onWarning?.(unusedTensorsWarning(unused, family.name))
  const request: Sampling.SamplingRequest = {
    temperature: options.temperature,
    ...(options.blockLength === undefined ? {} : { block_length: options.blockLength }),
    ...(options.steps === undefined ? {} : { diffusion_steps: options.steps }),
    ...(options.cfgScale === undefined ? {} : { cfg_scale: options.cfgScale }),
    ...(options.remasking === undefined ? {} : { remasking: options.remasking })
  }
  const flagOf: Record<string, string> = { block_length: "--block", diffusion_steps: "--steps", cfg_scale: "--cfg" }
  const misfit = Sampling.familyViolation(request, family)
  if (misfit !== undefined) {
    throw new Error(`${flagOf[misfit.param] ?? `--${misfit.param}`}: ${misfit.message}`)
  }
  const params = Sampling.resolve(request, modelDefaults(options.model, options.genLength, family), options.genLength, family)
  const id = engine.create(Int32Array.from(options.prompt), { ...params, seed: options.seed })
  try {
    const start = performance.now()
    let steps = 0
    for (;;) {
      const [result] = await engine.step([id])
      steps++
      if (result === undefined) throw new Error("step returned no result for the sequence")
      if (result.finished) {
        const ms = performance.now() - start
        return {
          answer: Array.from(engine.canvas(id)),
          finish_reason: result.reason,
          steps,
          load_ms: Math.round(loadMs * 1000) / 1000,
          ms: Math.round(ms * 1000) / 1000,
          tokens_per_s: Math.round((options.genLength / (ms / 1000)) * 1000) / 1000
        }
      }
    }
  } finally {
    engine.release(id)
  }
}

/** The defaults `vdiff serve --generation-config auto` lays under its own: the model directory's file, if any. */
const modelDefaults = (modelDir: string, genLength: number, family: Sampling.ModelFamily): Sampling.EngineDefaults => {
  const model = readModelDefaults(modelDir, family)
  if (Either.isLeft(model)) throw new Error(model.left)
  return Sampling.withModelDefaults({ maxTokens: genLength }, model.right).defaults
}
