// What chunked prefill does for the requests already running when a long prompt arrives, on a
// block-diffusion model: the longest step they wait through, and the new prompt's time to its first step.
//
//   npm run build && node bench/prefill-chunk.mjs [--model DIR | --preset sdar-tiny] [--prompt 512]
//                                                 [--chunk 128] [--rounds 3] [--threads 2] [--json FILE]
//
// Two engines on the same model, one prefilling a prompt in one forward (--prefill-chunk 0), one in chunks
// of --chunk positions, no prefix cache. A round, on each engine in turn: a running sequence (a short
// prompt, two blocks to write) takes two steps alone, then the long prompt joins the batch, and both are
// stepped together until the long prompt's first denoising step. Reported per engine (medians over the
// rounds): the running sequence's step before the arrival, its longest step after it (what its client
// waits between tokens), and the long prompt's time from its arrival to its first denoising step.
import { join } from "node:path"
import { benchModel, blockLengthOf, blockParams, fixed, flags, log, median, randomPrompts, report, root, table } from "./lib.mjs"

const values = flags({
  model: undefined,
  preset: "sdar-tiny",
  seed: "1",
  prompt: "512",
  chunk: "128",
  rounds: "3",
  threads: "2",
  json: undefined
})
const promptLength = Number(values.prompt)
const chunk = Number(values.chunk)
const rounds = Number(values.rounds)

const { loadAddon } = await import(join(root, "dist", "engine", "native.js"))

const { modelDir, label, cleanup } = benchModel(values, "vdiff-chunk-bench-")

try {
  const addon = loadAddon()
  const load = (prefillChunk) => addon.loadModel(modelDir, { threads: Number(values.threads), prefixCacheBytes: 0, prefillChunk })
  const engines = { whole: await load(0), chunked: await load(chunk) }
  const info = engines.whole.info()
  const B = blockLengthOf(engines.whole, modelDir)
  const randomIds = randomPrompts(info, 777)
  const params = (gen) => blockParams(B, gen)
  const timed = async (engine, ids) => {
    const start = process.hrtime.bigint()
    const outs = await engine.step(ids)
    return { ms: Number(process.hrtime.bigint() - start) / 1e6, outs }
  }
  const round = async (engine) => {
    const running = engine.create(Int32Array.from(randomIds(Math.max(1, B - 2))), params(2 * B))
    const before = []
    for (let i = 0; i < 2; i++) before.push((await timed(engine, [running])).ms)
    const arrived = process.hrtime.bigint()
    const long = engine.create(Int32Array.from(randomIds(promptLength)), params(B))
    const after = []
    let prefills = 0
    for (let first = false; !first; ) {
      const { ms, outs } = await timed(engine, [running, long])
      after.push(ms)
      const mine = outs.find((o) => o.id === long)
      if (mine.phase === "prefill") prefills++
      else first = true
      if (outs.find((o) => o.id === running).finished) throw new Error("the running sequence finished first: give it more to write")
    }
    const firstStep = Number(process.hrtime.bigint() - arrived) / 1e6
    engine.release(running)
    engine.release(long)
    return { before: median(before), worstAfter: Math.max(...after), firstStep, prefills, steps: after.length }
  }
  log(`${info.family.name}, block ${B}, ${info.backend} ${info.device}; a prompt of ${promptLength} joining a running sequence`)
  await round(engines.whole)
  await round(engines.chunked)
  const results = { whole: [], chunked: [] }
  for (let r = 0; r < rounds; r++)
    for (const name of ["whole", "chunked"]) {
      const x = await round(engines[name])
      results[name].push(x)
      log(
        `round ${r} ${name}: step ${fixed(x.before)} ms, longest after ${fixed(x.worstAfter)} ms, first step of the new prompt ${fixed(x.firstStep)} ms (${x.prefills} prefill forwards)`
      )
    }
  const of = (name, field) => median(results[name].map((x) => x[field]))
  const summary = {
    date: new Date().toISOString(),
    model: label,
    family: info.family.name,
    block: B,
    backend: `${info.backend} ${info.device}`,
    threads: Number(values.threads),
    prompt: promptLength,
    chunk,
    rounds: results
  }
  const row = (name, label) => [
    label,
    fixed(of(name, "before")),
    fixed(of(name, "worstAfter")),
    fixed(of(name, "firstStep")),
    of(name, "prefills")
  ]
  const text =
    `chunked prefill: ${summary.family}, block ${B}, ${summary.backend}, ${summary.threads} threads; a ${promptLength}-token prompt joins a running sequence; medians of ${rounds} alternated rounds\n\n` +
    table([
      ["prefill", "running step ms", "its longest step after ms", "new prompt's first step ms", "prefill forwards"],
      row("whole", "one forward"),
      row("chunked", `chunks of ${chunk}`)
    ]) +
    "\n"
  report(text, values.json, summary)
} finally {
  cleanup()
}
