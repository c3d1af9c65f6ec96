/**
 * The `vdiff` command line: parses arguments and hands them to the functions that do the work.
 *
 *   vdiff make-model --preset tiny|small|llada-8b --seed N --out DIR [--dtype f32|bf16|f16] [--shard-mb N]
 *   vdiff make-model --from-raw DIR --out DIR [--dtype f32|bf16|f16]
 *   vdiff generate --model DIR --prompt-ids 1,2,3 [--gen N --block N --steps N --temperature T --cfg S
 *                  --remasking low_confidence|random --seed N --threads N]
 *   vdiff serve [flags]   (vdiff serve --help lists the flags)
 */
import { parseArgs } from "node:util"
import type { DType } from "./model/safetensors.js"

/** A usage error: printed without a stack trace, exit status 2. */
class UsageError extends Error {}

const usage = `usage:
  vdiff make-model --preset NAME --seed N --out DIR [--dtype f32|bf16|f16] [--shard-mb N]
  vdiff make-model --from-raw DIR --out DIR [--dtype f32|bf16|f16] [--shard-mb N]
  vdiff generate --model DIR --prompt-ids 1,2,3 [--gen 128] [--block 32] [--steps 128] [--temperature 0]
                 [--cfg 0] [--remasking low_confidence|random] [--seed 0] [--threads N]
  vdiff serve [flags]    (vdiff serve --help lists the flags)`

const parseDType = (text: string | undefined): DType | undefined => {
  if (text === undefined) return undefined
  const dtype = ({ f32: "F32", bf16: "BF16", f16: "F16" } as const)[text.toLowerCase()]
  if (dtype === undefined) throw new UsageError(`--dtype must be f32, bf16 or f16, got "${text}"`)
  return dtype
}

/** A number flag: undefined when absent, a usage error when not a number (or not an integer). */
const parseNumber = (flag: string, text: string | undefined, integer: boolean): number | undefined => {
  if (text === undefined) return undefined
  const value = Number(text)
  if (text.trim() === "" || !Number.isFinite(value) || (integer && !Number.isSafeInteger(value))) {
    throw new UsageError(`--${flag} must be ${integer ? "an integer" : "a number"}, got "${text}"`)
  }
  return value
}

const makeModelCommand = async (args: Array<string>): Promise<void> => {
  const { values } = parseArgs({
    args,
    options: {
      preset: { type: "string" },
      "from-raw": { type: "string" },
      seed: { type: "string" },
      out: { type: "string" },
      dtype: { type: "string" },
      "shard-mb": { type: "string" }
    },
    strict: true
  })
  const { makeModel, importRaw, presetNames } = await import("./model/makeModel.js")
  if (values.out === undefined) throw new UsageError("make-model needs --out DIR")
  if ((values.preset === undefined) === (values["from-raw"] === undefined)) {
    throw new UsageError("make-model needs exactly one of --preset NAME and --from-raw DIR")
  }
  if (values.preset !== undefined && !presetNames().includes(values.preset)) {
    throw new UsageError(`unknown preset "${values.preset}" (known: ${presetNames().join(", ")})`)
  }
  const dtype = parseDType(values.dtype)
  const shardMb = parseNumber("shard-mb", values["shard-mb"], false)
  const common = {
    out: values.out,
    ...(dtype !== undefined ? { dtype } : {}),
    ...(shardMb !== undefined ? { maxShardBytes: shardMb * 1e6 } : {}),
    onProgress: (message: string) => process.stderr.write(message + "\n")
  }
  const written =
    values.preset !== undefined
      ? await makeModel({ ...common, preset: values.preset, seed: parseNumber("seed", values.seed ?? "0", true)! })
      : await importRaw({ ...common, from: values["from-raw"]! })
  process.stdout.write(JSON.stringify(written) + "\n")
}

const generateCommand = async (args: Array<string>): Promise<void> => {
  const { values } = parseArgs({
    args,
    options: {
      model: { type: "string" },
      "prompt-ids": { type: "string" },
      prompt: { type: "string" },
      gen: { type: "string" },
      block: { type: "string" },
      steps: { type: "string" },
      temperature: { type: "string" },
      cfg: { type: "string" },
      remasking: { type: "string" },
      seed: { type: "string" },
      threads: { type: "string" }
    },
    strict: true
  })
  if (values.model === undefined) throw new UsageError("generate needs --model DIR")
  if (values.prompt !== undefined) {
    throw new UsageError("--prompt TEXT needs a tokenizer, which is not yet available; pass --prompt-ids 1,2,3")
  }
  if (values["prompt-ids"] === undefined) throw new UsageError("generate needs --prompt-ids 1,2,3")
  const prompt = values["prompt-ids"].split(",").map((id) => parseNumber("prompt-ids", id, true)!)
  const remasking = values.remasking ?? "low_confidence"
  if (remasking !== "low_confidence" && remasking !== "random") {
    throw new UsageError(`--remasking must be low_confidence or random, got "${remasking}"`)
  }
  const int = (flag: "gen" | "block" | "steps" | "seed" | "threads") => parseNumber(flag, values[flag], true)
  const { generate } = await import("./cli/generate.js")
  const result = await generate({
    model: values.model,
    prompt,
    genLength: int("gen") ?? 128,
    blockLength: int("block") ?? 32,
    steps: int("steps") ?? 128,
    temperature: parseNumber("temperature", values.temperature, false) ?? 0,
    cfgScale: parseNumber("cfg", values.cfg, false) ?? 0,
    remasking,
    seed: int("seed") ?? 0,
    threads: int("threads") ?? 0
  })
  process.stdout.write(JSON.stringify(result) + "\n")
}

const main = async (argv: Array<string>): Promise<number> => {
  const [command, ...rest] = argv
  try {
    switch (command) {
      case "make-model":
        await makeModelCommand(rest)
        return 0
      case "generate":
        await generateCommand(rest)
        return 0
      case "serve":
        return await (await import("./cli/serve.js")).serve(rest)
      case undefined:
      case "help":
      case "--help":
      case "-h":
        process.stdout.write(usage + "\n")
        return command === undefined ? 2 : 0
      default:
        throw new UsageError(`unknown command "${command}"`)
    }
  } catch (error) {
    // parseArgs reports unknown or malformed flags with codes starting ERR_PARSE_ARGS.
    const code = (error as { code?: unknown }).code
    if (error instanceof UsageError || (typeof code === "string" && code.startsWith("ERR_PARSE_ARGS"))) {
      process.stderr.write(`vdiff: ${(error as Error).message}\n${usage}\n`)
      return 2
    }
    const prefix = typeof code === "string" ? `${code}: ` : ""
    process.stderr.write(`vdiff: ${prefix}${error instanceof Error ? error.message : String(error)}\n`)
    return 1
  }
}

process.exitCode = await main(process.argv.slice(2))
