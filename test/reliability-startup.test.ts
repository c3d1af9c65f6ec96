/**
 * A model directory that is missing, empty or corrupt stops `vdiff serve` at startup with a non-zero exit
 * and one clear line naming the directory and what is wrong with it — never a stack trace, a hang or a
 * server that claims to be ready. A directory that vanishes after the model has loaded does not stop a
 * running server: the weights are in memory.
 *
 * Each case copies the embedded model into a temporary directory and breaks one thing. Every case costs
 * a process start (seconds of CPU), so `npm test` runs one of each kind of fault and `npm run test:stress`
 * all of them.
 */
import { cp, mkdir, mkdtemp, rm, truncate, writeFile } from "node:fs/promises"
import { readFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { embeddedModel, fullSize, serveToExit, startServe, timeLimit } from "./stress/serve.js"

let work: string

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "vdiff-startup-"))
})
afterAll(async () => {
  await rm(work, { recursive: true, force: true })
})

/** A copy of the embedded model, broken by `damage`. */
const brokenModel = async (name: string, damage: (dir: string) => Promise<void>) => {
  const dir = join(work, name)
  await cp(embeddedModel, dir, { recursive: true })
  await damage(dir)
  return dir
}

interface Run {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/** Runs `vdiff serve --model DIR` to its exit (killed after 30 s: a hang fails the test). */
const serve = (model: string): Promise<Run> => serveToExit(["--model", model])

/** The JSON log lines at level error. */
const errorLines = (stdout: string) =>
  stdout
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((entry) => entry["level"] === "error")

const noStackTrace = (run: Run) => {
  expect(run.stdout + run.stderr).not.toMatch(/\n\s+at /)
  expect(run.stdout).not.toContain("vdiff ready on")
}

describe("vdiff serve with a bad model directory", () => {
  // Settings that fail before anything listens: exit 2, one line on stderr.
  const notADirectory: ReadonlyArray<[string, () => Promise<string>]> = [
    ["a directory that does not exist", async () => join(work, "vanished")],
    [
      "an empty directory",
      async () => {
        const dir = join(work, "empty")
        await mkdir(dir, { recursive: true })
        return dir
      }
    ],
    [
      "a file instead of a directory",
      async () => {
        const file = join(work, "a-file")
        await writeFile(file, "not a model")
        return file
      }
    ]
  ]

  // A directory that looks like a model but cannot be loaded: exit 1, one error line.
  const corrupt: ReadonlyArray<[string, (dir: string) => Promise<void>, RegExp]> = [
    ["config.json that is not JSON", (dir) => writeFile(join(dir, "config.json"), '{"d_model":'), /config\.json/],
    [
      "config.json that contradicts the weights",
      async (dir) => {
        const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"))
        await writeFile(join(dir, "config.json"), JSON.stringify({ ...config, d_model: 128 }))
      },
      /shape/
    ],
    ["truncated weights", (dir) => truncate(join(dir, "model.safetensors"), 1_000_000), /truncated/],
    [
      "weights that are random bytes",
      (dir) => writeFile(join(dir, "model.safetensors"), Buffer.from(Array.from({ length: 65536 }, (_, i) => (i * 7919 + 13) % 251))),
      /corrupt|header/
    ],
    ["no weights", (dir) => rm(join(dir, "model.safetensors")), /model\.safetensors/],
    ["no tokenizer", (dir) => rm(join(dir, "tokenizer.json")), /tokenizer\.json/],
    ["a tokenizer that is not JSON", (dir) => writeFile(join(dir, "tokenizer.json"), '{"model":'), /tokenizer\.json/]
  ]
  /** One case per kind of fault under `npm test`: the config, the weights, the tokenizer. */
  const quick = new Set([0, 2, 5])

  it(
    "refuses a path that is not a model directory: exit 2 and one line on stderr",
    async () => {
      const runs = await Promise.all(
        notADirectory
          .filter((_, i) => fullSize || i !== 1)
          .map(async ([_, make]) => {
            const dir = await make()
            return { dir, run: await serve(dir) }
          })
      )
      for (const { dir, run } of runs) {
        expect(run.code).toBe(2)
        expect(run.stderr.trimEnd().split("\n")).toEqual([`vdiff serve: --model: ${dir} is not a model directory (it has no config.json)`])
        noStackTrace(run)
      }
      // From the environment, the variable is named.
      const fromEnv = await serveToExit([], { VDIFF_MODEL: runs[0]!.dir })
      expect(fromEnv.code).toBe(2)
      expect(fromEnv.stderr).toBe(`vdiff serve: VDIFF_MODEL (--model): ${runs[0]!.dir} is not a model directory (it has no config.json)\n`)
    },
    timeLimit()
  )

  it(
    "stops on a corrupt model: exit 1 and one error line naming the directory and the fault",
    async () => {
      const runs = await Promise.all(
        corrupt
          .filter((_, i) => fullSize || quick.has(i))
          .map(async ([name, damage, reason]) => {
            const dir = await brokenModel(name.replace(/\W+/g, "-"), damage)
            return { name, dir, reason, run: await serve(dir) }
          })
      )
      for (const { name, dir, reason, run } of runs) {
        const context = `${name}: ${run.stdout}${run.stderr}`
        expect(run.code, context).toBe(1)
        const errors = errorLines(run.stdout)
        expect(errors, context).toHaveLength(1)
        const message = String(errors[0]!["message"])
        expect(message.startsWith(`cannot load the model from ${dir}: `), context).toBe(true)
        expect(message, context).toMatch(reason)
        expect(message.includes("\n"), context).toBe(false)
        expect(run.stderr, context).toBe("")
        noStackTrace(run)
      }
    },
    timeLimit()
  )

  it(
    "keeps serving when the model directory vanishes after loading",
    async () => {
      const dir = await brokenModel("vanishing", async () => {})
      const server = await startServe({ model: dir })
      try {
        await rm(dir, { recursive: true, force: true })
        const response = await fetch(server.url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ prompt: "ROMEO:\n", max_tokens: 8 })
        })
        expect(response.status).toBe(200)
        expect(((await response.json()) as any).choices[0].text).toEqual(expect.any(String))
        expect((await fetch(server.url + "/health/ready")).status).toBe(200)
      } finally {
        expect(await server.stop()).toBe(0)
      }
    },
    timeLimit()
  )
})
