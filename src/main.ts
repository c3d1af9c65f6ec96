/**
 * The `vdiff` command line: one parser for every command (src/config/Setting.ts), whose flags and
 * `--help` come from each command's settings table — `vdiff serve`'s in src/config/Config.ts, the tools'
 * in src/cli/commands.ts. It hands the parsed settings to the functions that do the work.
 *
 *   vdiff serve [flags]        (vdiff serve --help lists the flags)
 *   vdiff generate --model DIR --prompt-ids 1,2,3 [--gen N --block N --steps N ...]
 *   vdiff make-model --preset tiny|small|llada-8b --seed N --out DIR [--dtype f32|bf16|f16] [--shard-mb N]
 *   vdiff make-model --from-raw DIR --out DIR [--dtype f32|bf16|f16]
 *   vdiff quantize --model DIR --out DIR --format q8_0|q4_0
 *   vdiff bench [--models ...]  (the engine benchmark, bench/engine.mjs; --help lists its flags)
 */
import { spawnSync } from "node:child_process"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { Either } from "effect"
import * as Commands from "./cli/commands.js"
import type { CommandLine } from "./config/Setting.js"
import type { DType } from "./model/safetensors.js"

/** A usage error: printed without a stack trace, exit status 2. */
class UsageError extends Error {}

const usage = `usage:
  vdiff serve [flags]          (vdiff serve --help lists the flags)
  vdiff generate --model DIR --prompt-ids 1,2,3 [flags]     (vdiff generate --help)
  vdiff make-model --preset NAME --seed N --out DIR [flags]  (vdiff make-model --help)
  vdiff make-model --from-raw DIR --out DIR [flags]
  vdiff quantize --model DIR --out DIR --format q8_0|q4_0   (vdiff quantize --help)
  vdiff bench [flags]          (the engine benchmark: vdiff bench --help)
  vdiff --version`

/** The command's settings, or its help printed (undefined). */
const settingsOf = <A>(command: CommandLine<A, string>, args: ReadonlyArray<string>): A | undefined => {
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(command.help() + "\n")
    return undefined
  }
  const loaded = command.load({ argv: args, env: {} })
  if (Either.isLeft(loaded)) throw new UsageError(loaded.left.message)
  return loaded.right
}

const parseDType = (text: string | undefined): DType | undefined => {
  if (text === undefined) return undefined
  const dtype = ({ f32: "F32", bf16: "BF16", f16: "F16" } as const)[text.toLowerCase()]
  if (dtype === undefined) throw new UsageError(`--dtype must be f32, bf16 or f16, got "${text}"`)
  return dtype
}

const makeModelCommand = async (args: ReadonlyArray<string>): Promise<void> => {
  const values = settingsOf(Commands.makeModel, args)
  if (values === undefined) return
  const { makeModel, importRaw, presetNames } = await import("./model/makeModel.js")
  if (values.out === undefined) throw new UsageError("make-model needs --out DIR")
  if ((values.preset === undefined) === (values.fromRaw === undefined)) {
    throw new UsageError("make-model needs exactly one of --preset NAME and --from-raw DIR")
  }
  if (values.preset !== undefined && !presetNames().includes(values.preset)) {
    throw new UsageError(`unknown preset "${values.preset}" (known: ${presetNames().join(", ")})`)
  }
  const dtype = parseDType(values.dtype)
  const common = {
    out: values.out,
    ...(dtype !== undefined ? { dtype } : {}),
    ...(values.shardMb !== undefined ? { maxShardBytes: values.shardMb * 1e6 } : {}),
    onProgress: (message: string) => process.stderr.write(message + "\n")
  }
  if (values.quantize !== "none" && values.preset === undefined) throw new UsageError("--quantize applies to --preset only")
  const written =
    values.preset !== undefined
      ? await makeModel({
          ...common,
          preset: values.preset,
          seed: values.seed,
          ...(values.quantize !== "none" ? { quantize: values.quantize } : {})
        })
      : await importRaw({ ...common, from: values.fromRaw! })
  process.stdout.write(JSON.stringify(written) + "\n")
}

const generateCommand = async (args: ReadonlyArray<string>): Promise<void> => {
  const values = settingsOf(Commands.generate, args)
  if (values === undefined) return
  if (values.model === undefined) throw new UsageError("generate needs --model DIR")
  if (values.prompt !== undefined) {
    throw new UsageError("--prompt TEXT is not supported by generate; pass --prompt-ids 1,2,3 (vdiff serve takes text)")
  }
  if (values.promptIds === undefined) throw new UsageError("generate needs --prompt-ids 1,2,3")
  const prompt = values.promptIds.split(",").map((id) => {
    // Token ids as decimal digits below 2^31 (the engine's int32): "1e3", "0x10" or 4294967396 are no ids.
    const value = Number(id.trim())
    if (!/^\s*\d+\s*$/.test(id) || value >= 2 ** 31) throw new UsageError(`--prompt-ids must be token ids (0, 1, 2, ...), got "${id}"`)
    return value
  })
  const { generate } = await import("./cli/generate.js")
  const { model, promptIds: _ids, prompt: _text, ...settings } = values
  const result = await generate({
    model,
    prompt,
    ...settings,
    onWarning: (message) => process.stderr.write(`vdiff: warning: ${message}\n`)
  })
  process.stdout.write(JSON.stringify(result) + "\n")
}

/** `vdiff bench`: the engine benchmark (bench/engine.mjs), which takes its own flags. */
const benchCommand = (args: ReadonlyArray<string>): number => {
  const script = join(dirname(fileURLToPath(import.meta.url)), "..", "bench", "engine.mjs")
  return spawnSync(process.execPath, [script, ...args], { stdio: "inherit" }).status ?? 1
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
      case "quantize": {
        const values = settingsOf(Commands.quantize, rest)
        if (values !== undefined) await (await import("./model/quantize.js")).quantizeCommand(values)
        return 0
      }
      case "bench":
        return benchCommand(rest)
      case "--version":
      case "-v":
      case "version":
        process.stdout.write(`vdiff ${(await import("./config/package.js")).packageInfo().version}\n`)
        return 0
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
    if (error instanceof UsageError) {
      process.stderr.write(`vdiff: ${error.message}\n${usage}\n`)
      return 2
    }
    const code = (error as { code?: unknown }).code
    const message = error instanceof Error ? error.message : String(error)
    // Node's system errors already start with their code ("ENOENT: no such file ...").
    const prefix = typeof code === "string" && !message.startsWith(`${code}:`) ? `${code}: ` : ""
    process.stderr.write(`vdiff: ${prefix}${message}\n`)
    return 1
  }
}

process.exitCode = await main(process.argv.slice(2))
