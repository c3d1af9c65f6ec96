/**
 * `vdiff generate`: one generation from token ids straight through the native addon, for trying a model
 * and timing it without the server. Drives the same step API the scheduler does.
 */
import { loadAddon, type NativeRemasking } from "../engine/native.js"
import type { CpuIsa } from "../config/Config.js"

export interface GenerateOptions {
  readonly model: string
  readonly prompt: ReadonlyArray<number>
  readonly genLength: number
  readonly blockLength: number
  readonly steps: number
  readonly temperature: number
  readonly cfgScale: number
  readonly remasking: NativeRemasking
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
  const id = engine.create(Int32Array.from(options.prompt), {
    genLength: options.genLength,
    blockLength: options.blockLength,
    steps: options.steps,
    temperature: options.temperature,
    remasking: options.remasking,
    cfgScale: options.cfgScale,
    seed: options.seed
  })
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
