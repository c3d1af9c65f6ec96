// What the server adds to a denoising step: the engine stepped alone, against the same answers asked of
// `vdiff serve` over HTTP (plain and streamed), in alternated rounds on this machine.
//
//   npm run build && node bench/server.mjs [--model DIR] [--gen 128] [--block 8] [--rounds 5] [--requests 3]
//                                          [--warmup 5] [--threads 2] [--json FILE]
//
// The engine alone: the addon's create/step loop in this process (the model loaded once). The scheduler:
// the same engine behind the Effect Engine and Scheduler layers in this process, one request at a time (what
// the server adds before HTTP). The server: a
// `vdiff serve` child process on the same model and threads, asked one request at a time (temperature 0,
// no early stop, one step per answer token) by a client that reads raw sockets; its time per step is the
// request's wall time over its steps. The server's own step metric (vdiff_step_duration_seconds, the
// native step as the scheduler sees it) is printed beside it: a step that takes longer inside the server
// than alone is one the server's JavaScript competed with for the cores.
import { spawn } from "node:child_process"
import { connect } from "node:net"
import { cpus } from "node:os"
import { join } from "node:path"
import { fixed, flags, log, median, report, root, stepParams, table } from "./lib.mjs"

const values = flags({
  model: join(root, "models", "shakespeare"),
  gen: "128",
  block: "8",
  rounds: "5",
  requests: "3",
  warmup: "5",
  threads: "2",
  prompt: "ROMEO:\nWhat light through yonder window breaks?",
  json: undefined
})
const gen = Number(values.gen)
const block = Number(values.block)
const rounds = Number(values.rounds)
const requests = Number(values.requests)
const threads = Number(values.threads)

const { loadAddon } = await import(join(root, "dist", "engine", "native.js"))
const Engine = await import(join(root, "dist", "engine", "Engine.js"))
const Scheduler = await import(join(root, "dist", "scheduler", "Scheduler.js"))
const { Effect, Layer, ManagedRuntime } = await import("effect")

/** Starts `vdiff serve` on a free port; resolves with its address once it is ready. */
const startServer = async () => {
  const child = spawn(
    process.execPath,
    [join(root, "bin", "vdiff.js"), "serve", "--port", "0", "--model", values.model, "--threads", String(threads), "--device", "cpu"],
    { stdio: ["ignore", "pipe", "pipe"] }
  )
  const address = await new Promise((resolve, reject) => {
    let text = ""
    const onData = (chunk) => {
      text += chunk
      const ready = /vdiff ready on (http:\/\/[0-9.]+:[0-9]+)/.exec(text)
      if (ready) resolve(ready[1])
    }
    child.stdout.on("data", onData)
    child.stderr.on("data", onData)
    child.on("exit", (code) => reject(new Error(`vdiff serve exited (${code}) before it was ready:\n${text}`)))
  })
  child.stdout.resume()
  child.stderr.resume()
  return { child, address }
}

/**
 * One HTTP/1.1 request on a socket of its own, read to the end as bytes: the client does as little as it
 * can while the server steps (node:http's parser would take a core from the step at every SSE event).
 */
const call = (address, method, path, body) =>
  new Promise((resolve, reject) => {
    const { hostname, port } = new URL(address)
    const data = body === undefined ? "" : JSON.stringify(body)
    const socket = connect({ host: hostname, port: Number(port) })
    const chunks = []
    socket.on("connect", () =>
      socket.write(
        `${method} ${path} HTTP/1.1\r\nhost: ${hostname}\r\nconnection: close\r\n` +
          `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(data)}\r\n\r\n${data}`
      )
    )
    socket.on("data", (chunk) => chunks.push(chunk))
    socket.on("error", reject)
    socket.on("close", () => {
      const text = Buffer.concat(chunks).toString("utf8")
      const head = text.indexOf("\r\n\r\n")
      resolve({ status: Number(text.split(" ")[1]), text: head < 0 ? text : text.slice(head + 4) })
    })
  })

/** Values of the server's /metrics by series name (the first series of each), from one scrape. */
const metrics = async (address, ...names) => {
  const { text } = await call(address, "GET", "/metrics")
  const lines = text.split("\n")
  return names.map((name) => {
    const line = lines.find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`))
    return line === undefined ? 0 : Number(line.split(" ").pop())
  })
}

const main = async () => {
  const { child, address } = await startServer()
  try {
    const tokenized = await call(address, "POST", "/tokenize", { prompt: values.prompt })
    const prompt = JSON.parse(tokenized.text).tokens
    const body = { prompt: values.prompt, max_tokens: gen, block_length: block, temperature: 0, early_stop: false }

    const addon = loadAddon()
    const engine = await addon.loadModel(values.model, { threads, device: "cpu" })
    const settings = stepParams(gen, block)
    const alone = async () => {
      const id = engine.create(Int32Array.from(prompt), settings)
      const started = performance.now()
      let steps = 0
      for (;;) {
        const [result] = await engine.step([id], new addon.CancelToken())
        steps++
        if (result.finished) break
      }
      engine.release(id)
      return (performance.now() - started) / steps
    }
    const scheduler = ManagedRuntime.make(
      Scheduler.layer({ maxConcurrent: 1, queueCapacity: 1, maxBatchTokens: 1 << 30, requestTimeoutMs: 300_000 }).pipe(
        Layer.provide(Layer.succeed(Engine.Engine, Engine.fromNativeEngine(values.model, engine, addon)))
      )
    )
    const scheduled = async () => {
      const started = performance.now()
      await scheduler.runPromise(Effect.flatMap(Scheduler.Scheduler, (s) => s.generate({ prompt, settings })))
      return (performance.now() - started) / gen
    }
    const served = async (stream) => {
      const started = performance.now()
      const { status, text } = await call(address, "POST", "/v1/completions", { ...body, stream })
      if (status !== 200) throw new Error(`the server answered ${status}: ${text}`)
      return (performance.now() - started) / gen
    }
    const stepMetric = async () => {
      const [sum, count] = await metrics(address, "vdiff_step_duration_seconds_sum", "vdiff_step_duration_seconds_count")
      return { sum, count }
    }

    // JavaScript runs slowly until V8 has optimized it (before this bench's first fixes, the server over the
    // test engine took 1.1 ms of JS a step over its first 2,560 steps and 0.45 ms over its third): every
    // path answers a few requests before anything is timed.
    for (let i = 0; i < Number(values.warmup); i++) {
      await alone()
      await scheduled()
      await served(false)
      await served(true)
    }
    const runs = { alone: [], scheduler: [], plain: [], stream: [], plainInside: [], streamInside: [] }
    /** Serves `requests` requests; returns the native step's mean inside the server meanwhile. */
    const serve = async (stream) => {
      const before = await stepMetric()
      for (let i = 0; i < requests; i++) runs[stream ? "stream" : "plain"].push(await served(stream))
      const after = await stepMetric()
      return (1000 * (after.sum - before.sum)) / (after.count - before.count)
    }
    for (let round = 0; round < rounds; round++) {
      for (let i = 0; i < requests; i++) runs.alone.push(await alone())
      for (let i = 0; i < requests; i++) runs.scheduler.push(await scheduled())
      runs.plainInside.push(await serve(false))
      runs.streamInside.push(await serve(true))
      log(
        `round ${round + 1}: alone ${fixed(median(runs.alone.slice(-requests)), 2)} ms/step, scheduler ${fixed(median(runs.scheduler.slice(-requests)), 2)}, server ${fixed(median(runs.plain.slice(-requests)), 2)} (plain) ${fixed(median(runs.stream.slice(-requests)), 2)} (stream)`
      )
    }
    await scheduler.dispose()
    const base = median(runs.alone)
    const rows = [
      ["path", "ms/step (median)", "min", "max", "vs alone"],
      ...[
        ["engine alone", runs.alone],
        ["scheduler, no HTTP", runs.scheduler],
        ["server, plain", runs.plain],
        ["  its native step", runs.plainInside],
        ["server, stream", runs.stream],
        ["  its native step", runs.streamInside]
      ].map(([name, xs]) => [
        name,
        fixed(median(xs), 2),
        fixed(Math.min(...xs), 2),
        fixed(Math.max(...xs), 2),
        `${fixed((100 * median(xs)) / base - 100, 0)}%`
      ])
    ]
    const text =
      `model ${values.model}, prompt ${prompt.length} tokens, gen ${gen}, block ${block}, one step per token, ` +
      `threads ${threads}, ${rounds} rounds of ${requests} requests each\n${table(rows)}\n`
    report(text, values.json, {
      date: new Date().toISOString(),
      cpu: cpus()[0]?.model,
      gen,
      block,
      threads,
      promptTokens: prompt.length,
      runs
    })
  } finally {
    child.kill("SIGTERM")
  }
}

main().catch((error) => {
  log(error instanceof Error ? error.message : String(error))
  process.exitCode = 1
})
