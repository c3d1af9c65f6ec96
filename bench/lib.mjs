// What the benchmark scripts share (engine.mjs, acceleration.mjs, scheduler.ts, quality.ts, server.mjs,
// contention.mjs, and the block-diffusion ones prefix-cache.mjs and prefill-chunk.mjs): the repo's root, their
// flags, running a tool, making a model, logging and printing a table, medians, random prompts.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { spawnSync } from "node:child_process"
import { basename, dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"

export const root = join(dirname(fileURLToPath(import.meta.url)), "..")

/**
 * The flags of a benchmark: every one takes a value (text) unless its default is a boolean. `--help`
 * lists them with their defaults (the script's header comment says what they mean); a flag it does not
 * know, or a value missing, is one line and exit status 2, not a stack trace.
 */
export const flags = (defaults) => {
  const options = Object.fromEntries(
    Object.entries(defaults).map(([name, value]) => [
      name,
      typeof value === "boolean"
        ? { type: "boolean", default: value }
        : value === undefined
          ? { type: "string" }
          : { type: "string", default: value }
    ])
  )
  const usage = () =>
    `usage: ${basename(process.argv[1] ?? "bench")} ` +
    Object.entries(defaults)
      .map(([name, value]) => (typeof value === "boolean" ? `[--${name}]` : `[--${name} ${value ?? "VALUE"}]`))
      .join(" ")
  if (process.argv.slice(2).some((arg) => arg === "--help" || arg === "-h")) {
    process.stdout.write(`${usage()}\n`)
    process.exit(0)
  }
  try {
    return parseArgs({ options }).values
  } catch (error) {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n${usage()}\n`)
    process.exit(2)
  }
}

export const log = (message) => process.stderr.write(`[bench] ${message}\n`)

/** "1,8" → ["1", "8"]. */
export const list = (text) => text.split(",").filter((item) => item !== "")

/** Runs a tool to its end and returns its stdout; a failure throws with its stderr. */
export const run = (command, args) => {
  const result = spawnSync(command, args, { cwd: root, encoding: "utf8", maxBuffer: 64 << 20 })
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(" ")} failed (${result.status ?? result.signal}):\n${result.stderr}`)
  }
  return result.stdout
}

/** `vdiff make-model --preset ... --out ...`, through the repo's own CLI. */
export const makeModel = ({ preset, seed, out, dtype }) =>
  run(join(root, "node_modules", ".bin", "tsx"), [
    join(root, "src", "main.ts"),
    "make-model",
    "--preset",
    preset,
    "--seed",
    String(seed),
    "--out",
    out,
    "--dtype",
    dtype
  ])

export const fixed = (x, digits = 1) => (x === undefined || x === null || !Number.isFinite(x) ? "-" : x.toFixed(digits))

/** Rows of cells as right-aligned columns. */
export const table = (rows) => {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => String(r[c]).length)))
  return rows.map((r) => r.map((cell, c) => String(cell).padStart(widths[c])).join("  ")).join("\n")
}

/** Prints the report, writes the JSON results when --json names a file. */
export const report = (text, json, results) => {
  process.stdout.write(text)
  if (json !== undefined) writeFileSync(json, JSON.stringify(results, null, 2) + "\n")
}

/** Runs a benchmark's main; a failure is one line on stderr and exit code 1. */
export const runMain = (main) => {
  try {
    main()
  } catch (error) {
    log(error instanceof Error ? error.message : String(error))
    process.exitCode = 1
  }
}

/** The median (the mean of the two middle values for an even count). */
export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/**
 * The model a block-diffusion benchmark runs: --model when given, else --preset (with --seed) made in a
 * scratch directory. Returns the directory, its label for the results, and a cleanup for the scratch.
 */
export const benchModel = (values, scratchName) => {
  if (values.model !== undefined) return { modelDir: values.model, label: basename(values.model), cleanup: () => {} }
  const scratch = mkdtempSync(join(tmpdir(), scratchName))
  const modelDir = join(scratch, values.preset)
  log(`making ${values.preset} in ${modelDir}`)
  makeModel({ preset: values.preset, seed: values.seed, out: modelDir, dtype: "f32" })
  return { modelDir, label: values.preset, cleanup: () => rmSync(scratch, { recursive: true, force: true }) }
}

/** Checks that a loaded engine decodes in blocks and returns its block length. */
export const blockLengthOf = (engine, modelDir) => {
  const info = engine.info()
  if (info.family.decoding !== "block") throw new Error(`${modelDir}: not a block-diffusion model (${info.family.name})`)
  return info.family.blockLength
}

/**
 * A generator of random prompts for a model: ids from 100 up (at most 4,000 of them) avoiding its mask and
 * EOS, from a fixed linear congruential sequence (the same prompts every run).
 */
export const randomPrompts = (info, seed) => {
  const special = new Set([info.config.maskTokenId, info.config.eosTokenId])
  let state = seed
  return (n) =>
    Array.from({ length: n }, () => {
      for (;;) {
        state = (state * 1103515245 + 12345) % 2 ** 31
        const id = 100 + (state % Math.min(info.config.vocabSize - 100, 4000))
        if (!special.has(id)) return id
      }
    })
}

/** Block decoding at temperature 0, one token a step (the quota only), with the exact block cache. */
export const blockParams = (blockLength, genLength) => ({
  genLength,
  blockLength,
  steps: blockLength,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed: 0,
  kvCache: "prefix",
  parallelThreshold: 0
})

/** One token a step over a whole answer at temperature 0, no early stop and no cache: the engine's plain step. */
export const stepParams = (genLength, blockLength) => ({
  genLength,
  steps: genLength,
  blockLength,
  remasking: "low_confidence",
  cfgScale: 0,
  temperature: 0,
  seed: 1,
  earlyStop: false,
  kvCache: "none"
})
