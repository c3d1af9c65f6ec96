// A denoising step while another process wants a core: the engine stepped alone in this process, with no
// competitor and with `--busy N` child processes that spin (what a two-core machine serving over HTTP has:
// the server's JavaScript, the client, the OS). Alternated rounds; per step the median, the 90th percentile
// and the slowest, and each against the same step with no competitor.
//
//   npm run build && node bench/contention.mjs [--model DIR] [--gen 128] [--block 8] [--rounds 5]
//                                              [--requests 2] [--busy 1] [--threads 2] [--json FILE]
//
// With T threads on T cores and one competitor, a fair scheduler leaves the step T - T/(T+1) cores' worth
// of time (4/3 of a core each for two threads): a step that the competitor slows by more than (T+1)/T
// is one whose threads wait for each other while one of them is off its core.
import { spawn } from "node:child_process"
import { cpus } from "node:os"
import { join } from "node:path"
import { fixed, flags, log, median, report, root, stepParams, table } from "./lib.mjs"

const values = flags({
  model: join(root, "models", "shakespeare"),
  gen: "128",
  block: "8",
  rounds: "5",
  requests: "2",
  busy: "1",
  threads: "2",
  prompt: "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16",
  json: undefined
})
const gen = Number(values.gen)
const threads = Number(values.threads)
const busy = Number(values.busy)

const { loadAddon } = await import(join(root, "dist", "engine", "native.js"))

const quantile = (xs, q) => {
  const sorted = [...xs].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
}

/** `count` child processes that spin until killed. */
const startCompetitors = async (count) => {
  const children = Array.from({ length: count }, () =>
    spawn(process.execPath, ["-e", "process.stdout.write('up\\n'); for (;;) {}"], { stdio: ["ignore", "pipe", "ignore"] })
  )
  await Promise.all(children.map((child) => new Promise((resolve) => child.stdout.once("data", resolve))))
  return () => {
    for (const child of children) child.kill("SIGKILL")
  }
}

const main = async () => {
  const addon = loadAddon()
  const engine = await addon.loadModel(values.model, { threads, device: "cpu" })
  const settings = stepParams(gen, Number(values.block))
  const prompt = Int32Array.from(values.prompt.split(",").map(Number))
  /** One answer; the wall time of each of its steps, in ms. */
  const answer = async () => {
    const id = engine.create(prompt, settings)
    const times = []
    for (;;) {
      const started = performance.now()
      const [result] = await engine.step([id], new addon.CancelToken())
      times.push(performance.now() - started)
      if (result.finished) break
    }
    engine.release(id)
    return times
  }
  await answer() // warm-up: pages, V8
  const steps = { alone: [], contended: [] }
  for (let round = 0; round < Number(values.rounds); round++) {
    for (let i = 0; i < Number(values.requests); i++) steps.alone.push(...(await answer()))
    const stop = await startCompetitors(busy)
    try {
      for (let i = 0; i < Number(values.requests); i++) steps.contended.push(...(await answer()))
    } finally {
      stop()
    }
    log(`round ${round + 1}: alone ${fixed(median(steps.alone), 2)} ms/step, with ${busy} busy ${fixed(median(steps.contended), 2)}`)
  }
  const summary = (xs) => ({ median: median(xs), p90: quantile(xs, 0.9), max: Math.max(...xs), steps: xs.length })
  const results = {
    date: new Date().toISOString(),
    cpu: cpus()[0]?.model,
    model: values.model,
    threads,
    busy,
    gen,
    block: Number(values.block),
    alone: summary(steps.alone),
    contended: summary(steps.contended)
  }
  const fair = (threads + busy) / threads
  const rows = [
    ["", "median ms/step", "p90", "max", "median vs alone"],
    ...["alone", "contended"].map((name) => [
      name === "alone" ? "alone" : `${busy} busy process${busy === 1 ? "" : "es"}`,
      fixed(results[name].median, 2),
      fixed(results[name].p90, 2),
      fixed(results[name].max, 2),
      fixed(results[name].median / results.alone.median, 2)
    ])
  ]
  report(
    `${results.cpu}, ${threads} threads, ${values.model}, gen ${gen} block ${values.block}\n${table(rows)}\n` +
      `a fair share of the cores would make the contended step ${fixed(fair, 2)}x the step alone\n`,
    values.json,
    results
  )
}

await main()
