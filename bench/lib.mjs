// What the benchmark scripts share (engine.mjs, acceleration.mjs, scheduler.ts, quality.ts): the repo's
// root, their flags, running a tool, making a model, logging and printing a table.
import { writeFileSync } from "node:fs"
import { spawnSync } from "node:child_process"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"

export const root = join(dirname(fileURLToPath(import.meta.url)), "..")

/** The flags of a benchmark: every one takes a value (text) unless its default is a boolean. */
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
  return parseArgs({ options }).values
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
