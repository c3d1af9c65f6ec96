// What the prefix cache saves a block-diffusion model: requests that share a long system prompt (a
// few-shot preamble, the conversation so far) against requests whose prompt is new, on one engine.
//
//   npm run build && node bench/prefix-cache.mjs [--model DIR | --preset sdar-tiny] [--system 256] [--user 16]
//                                                [--gen 32] [--rounds 3] [--threads 2] [--quantize none]
//                                                [--json FILE]
//
// One engine with the prefix cache (the server's default, 512 MiB). Each round runs, one sequence at a
// time and alternated: a cold request (a system prompt never seen, so nothing is found and the whole
// prompt is prefilled) and a warm one (the shared system prompt, seen in the warm-up, and a user part of
// its own, so the system prompt's whole blocks are copied). Prompts are random token ids of the model's
// vocabulary (the timing does not depend on their meaning). Per request: the time to the first denoising
// step (what a client waits for its first token), the whole request, and the positions the forwards
// computed. temperature 0, the family's defaults otherwise (kv_cache prefix).
//
// With --burst N (0: none), a second engine on the same model without the prefix cache, and rounds of N
// sequences with one new prompt (seeds 0..N-1) stepped together on each engine in turn: with the prefix
// cache one of them prefills the prompt and the others wait a step and copy it. Reported: the forwards the
// burst ran and the time until every sequence had its first denoising step, and to the end.
import { join } from "node:path"
import { benchModel, blockLengthOf, blockParams, fixed, flags, log, median, randomPrompts, report, root, table } from "./lib.mjs"

const values = flags({
  model: undefined,
  preset: "sdar-tiny",
  seed: "1",
  system: "256",
  user: "16",
  gen: "32",
  rounds: "3",
  burst: "4",
  threads: "2",
  quantize: "none",
  json: undefined
})
const burst = Number(values.burst)
const system = Number(values.system)
const user = Number(values.user)
const gen = Number(values.gen)
const rounds = Number(values.rounds)

const { loadAddon } = await import(join(root, "dist", "engine", "native.js"))

const { modelDir, label, cleanup } = benchModel(values, "vdiff-prefix-bench-")

try {
  const engine = await loadAddon().loadModel(modelDir, {
    threads: Number(values.threads),
    quantize: values.quantize,
    prefixCacheBytes: 512 * 2 ** 20
  })
  const info = engine.info()
  const B = blockLengthOf(engine, modelDir)
  const randomIds = randomPrompts(info, 12345)
  const params = blockParams(B, gen)
  const runOne = async (prompt) => {
    const start = process.hrtime.bigint()
    const id = engine.create(Int32Array.from(prompt), params)
    let first
    let last
    for (let done = false; !done; ) {
      const [out] = await engine.step([id])
      if (first === undefined && out.phase === "denoise") first = process.hrtime.bigint()
      done = out.finished
      last = out
    }
    const seconds = Number(process.hrtime.bigint() - start) / 1e9
    engine.release(id)
    return { firstStep: Number(first - start) / 1e9, seconds, positions: last.positionsComputed, cached: last.promptCached }
  }

  const shared = randomIds(system)
  log(`${info.config.modelType ?? info.family.name}, block ${B}, ${info.backend} ${info.device}; warm-up`)
  await runOne([...shared, ...randomIds(user)])
  const rows = []
  for (let round = 0; round < rounds; round++) {
    for (const kind of ["cold", "warm"]) {
      const prompt = kind === "cold" ? randomIds(system + user) : [...shared, ...randomIds(user)]
      const r = await runOne(prompt)
      rows.push({ round, kind, ...r })
      log(`round ${round} ${kind}: first step ${fixed(r.firstStep * 1000)} ms, whole ${fixed(r.seconds * 1000)} ms, ${r.cached} cached`)
    }
  }

  // Bursts: N sequences with one new prompt, stepped together, with and without the prefix cache.
  const bursts = []
  if (burst > 0) {
    const plain = await loadAddon().loadModel(modelDir, { threads: Number(values.threads), quantize: values.quantize, prefixCacheBytes: 0 })
    const runBurst = async (target) => {
      const prompt = Int32Array.from(randomIds(system + user))
      const start = process.hrtime.bigint()
      const ids = Array.from({ length: burst }, (_, i) => target.create(prompt, { ...params, seed: i }))
      const started = new Set()
      let firstSteps
      let forwards = 0
      for (let live = [...ids]; live.length > 0; ) {
        const outs = await target.step(live)
        for (const out of outs) if (out.phase === "denoise") started.add(out.id)
        if (firstSteps === undefined && started.size === burst) firstSteps = Number(process.hrtime.bigint() - start) / 1e9
        live = outs.filter((out) => !out.finished).map((out) => out.id)
        forwards = ids.reduce((sum, id) => sum + target.sequenceInfo(id).forwardPasses, 0)
      }
      const seconds = Number(process.hrtime.bigint() - start) / 1e9
      for (const id of ids) target.release(id)
      return { firstSteps, seconds, forwards }
    }
    for (let round = 0; round < rounds; round++) {
      for (const [kind, target] of [
        ["burst without prefix cache", plain],
        ["burst with prefix cache", engine]
      ]) {
        const r = await runBurst(target)
        bursts.push({ round, kind, ...r })
        log(
          `round ${round} ${kind}: every first step ${fixed(r.firstSteps * 1000)} ms, whole ${fixed(r.seconds * 1000)} ms, ${r.forwards} forwards`
        )
      }
    }
  }
  const burstOf = (kind, field) => median(bursts.filter((r) => r.kind === kind).map((r) => r[field]))
  const of = (kind, field) => median(rows.filter((r) => r.kind === kind).map((r) => r[field]))
  const stats = engine.prefixCache()
  const summary = {
    date: new Date().toISOString(),
    model: label,
    family: info.family.name,
    block: B,
    backend: `${info.backend} ${info.device}`,
    threads: Number(values.threads),
    quantize: values.quantize,
    prompt: { system, user },
    gen,
    rounds: rows,
    bursts: { sequences: burst, rounds: bursts },
    median: {
      cold: { firstStepMs: of("cold", "firstStep") * 1000, requestMs: of("cold", "seconds") * 1000, positions: of("cold", "positions") },
      warm: { firstStepMs: of("warm", "firstStep") * 1000, requestMs: of("warm", "seconds") * 1000, positions: of("warm", "positions") }
    },
    prefixCache: stats
  }
  const m = summary.median
  const text =
    `prefix cache: ${summary.family}, block ${B}, ${summary.backend}, ${summary.threads} threads, prompt ${system} shared + ${user} own tokens, ` +
    `${gen} generated, temperature 0; medians of ${rounds} alternated rounds\n\n` +
    table([
      ["request", "first step ms", "request ms", "positions computed", "prompt tokens copied"],
      ["cold (new prompt)", fixed(m.cold.firstStepMs), fixed(m.cold.requestMs), m.cold.positions, 0],
      ["warm (shared prefix)", fixed(m.warm.firstStepMs), fixed(m.warm.requestMs), m.warm.positions, Math.floor(system / B) * B]
    ]) +
    `\n\nfirst step ${fixed(m.cold.firstStepMs / m.warm.firstStepMs, 2)}x sooner, request ${fixed(m.cold.requestMs / m.warm.requestMs, 2)}x faster; ` +
    `cache: ${stats.entries} entries, ${fixed(stats.bytes / 2 ** 20)} MiB, ${stats.hits} hits of ${stats.lookups} lookups\n` +
    (burst === 0
      ? ""
      : `\n${burst} sequences with one new prompt, stepped together (medians):\n\n` +
        table([
          ["burst", "every first step ms", "whole ms", "forwards"],
          ...["burst without prefix cache", "burst with prefix cache"].map((kind) => [
            kind,
            fixed(burstOf(kind, "firstSteps") * 1000),
            fixed(burstOf(kind, "seconds") * 1000),
            burstOf(kind, "forwards")
          ])
        ]) +
        "\n")
  report(text, values.json, summary)
} finally {
  cleanup()
}
