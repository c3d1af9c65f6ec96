/**
 * A rolling restart under load, through a real load balancer: HAProxy (Debian's) in front of N `vdiff serve`
 * replicas on loopback ports, each serving the embedded model, HAProxy health-checking `GET /health/ready`.
 *
 *   1. start the replicas (configured through VDIFF_* variables, as a container would be) and HAProxy;
 *   2. record each request's answer alone (non-streaming, on replica 0), so that every answer under load
 *      can be compared with it — same seed, same text, whichever replica served it;
 *   3. `clients` loops keep one request each in flight through HAProxy: a fixed mix of completions and
 *      chat, streaming and not (test/stress/load.ts);
 *   4. steady phase for `steadyMs`; then the rolling restart: for each replica in turn, SIGTERM, wait for it
 *      to drain and exit, start it again on the same port, wait until HAProxy reports it UP; then stop
 *      sending and wait for what is in flight. Right after each SIGTERM a burst of `burst` more requests
 *      goes out at once, so that some reach the draining replica before HAProxy's check takes it out.
 *
 * Every request is counted by the phase it started in: sent, completed (200 and well formed and the same
 * text as alone), failed (anything else) and, among the streams, truncated (a 200 stream that did not end
 * with its finish_reason and `data: [DONE]`, or carried an error event, or was cut off). Latencies are
 * whole-request wall times; p99 is nearest-rank.
 *
 * What lets a restart lose nothing, and what this measures:
 *  - vdiff on SIGTERM turns /health/ready to 503 and answers new work 503 `draining` at once, finishes what
 *    it has (up to --shutdown-timeout), then closes its socket and exits 0;
 *  - HAProxy (`retry-on conn-failure empty-response 503`, `option redispatch 1`) sends a request refused
 *    that way, or whose connection failed, to another replica, before anything reached the client; a
 *    response already streaming is never retried — it is the draining replica's to finish;
 *  - the health check takes the replica out within about one `inter` and puts it back after `rise` passes.
 *
 *   node --import tsx bench/lb/rolling-restart.ts [--replicas 3] [--clients 4] [--steady-s 60]
 *        [--settle-s 5] [--max-tokens 16] [--threads 1] [--burst 6] [--out FILE]        (bench/lb/run writes FILE)
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process"
import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { createConnection, createServer } from "node:net"
import { cpus, loadavg, tmpdir } from "node:os"
import { join } from "node:path"
import { answersAlone, percentile, type RequestSpec, requestSpecs, send, specAt } from "../../test/stress/load.js"

export const repoRoot = join(import.meta.dirname, "..", "..")

export interface RollingRestartOptions {
  readonly replicas: number
  /** Requests kept in flight through the load balancer. */
  readonly clients: number
  /** Load before the restart begins. */
  readonly steadyMs: number
  /** Load after the last replica is back, before the senders stop. */
  readonly settleMs: number
  /** Longest answer in the mix (the mix's lengths are 8, 16, 24, 32; longer ones are left out). */
  readonly maxTokens: number
  /** --threads of each replica. */
  readonly threads: number
  /** --shutdown-timeout of each replica, seconds. */
  readonly shutdownTimeoutS: number
  /** Distinct requests in the mix (each sent streaming and not). */
  readonly distinct: number
  /** Requests sent at once right after each SIGTERM, besides the steady load. */
  readonly burst: number
  /** A bound on the whole run: a hang fails instead of waiting forever. */
  readonly timeoutMs: number
  /** Progress lines (default: none). */
  readonly log?: (line: string) => void
}

export const defaultOptions: RollingRestartOptions = {
  replicas: 3,
  clients: 4,
  steadyMs: 60_000,
  settleMs: 5_000,
  maxTokens: 16,
  threads: 1,
  shutdownTimeoutS: 30,
  distinct: 12,
  burst: 6,
  timeoutMs: 15 * 60_000
}

export interface PhaseFigures {
  readonly sent: number
  readonly completed: number
  readonly failed: number
  readonly streams: number
  readonly truncatedStreams: number
  readonly p50Ms: number
  readonly p99Ms: number
  readonly maxMs: number
  readonly wallMs: number
}

export interface RestartFigures {
  readonly replica: string
  /** From SIGTERM to the process's exit. */
  readonly drainMs: number
  readonly exitCode: number | null
  /** From SIGTERM until HAProxy reports the restarted replica UP again. */
  readonly outOfServiceMs: number
}

export interface RollingRestartFigures {
  readonly date: string
  readonly machine: { readonly cpu: string; readonly cores: number; readonly loadAverage1m: number }
  readonly haproxy: string
  readonly options: Omit<RollingRestartOptions, "log">
  readonly steady: PhaseFigures
  readonly restart: PhaseFigures
  readonly total: PhaseFigures
  readonly restarts: ReadonlyArray<RestartFigures>
  /** HAProxy's counters for the backend: retried connections/requests, redispatches, 5xx sent to clients. */
  readonly balancer: {
    readonly retries: number
    readonly redispatches: number
    readonly responses5xx: number
    readonly perReplica: Record<string, number>
  }
  /** The first few failures, for the failure message. */
  readonly problems: ReadonlyArray<string>
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Ports free on 127.0.0.1 right now (each opened and closed). */
export const freePorts = async (count: number): Promise<Array<number>> => {
  const servers = await Promise.all(
    Array.from(
      { length: count },
      () =>
        new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
          const server = createServer()
          server.once("error", reject)
          server.listen(0, "127.0.0.1", () => resolve(server))
        })
    )
  )
  const ports = servers.map((server) => (server.address() as { port: number }).port)
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))))
  return ports
}

/** Debian's haproxy: on the PATH, or in /usr/sbin (not on a non-root user's PATH). */
export const haproxyBinary = (): string | undefined =>
  ["haproxy", "/usr/sbin/haproxy"].find((binary) => {
    try {
      execFileSync(binary, ["-v"], { stdio: "ignore" })
      return true
    } catch {
      return false
    }
  })

/** HAProxy's version line, or undefined when it is not installed. */
export const haproxyVersion = (): string | undefined => {
  const binary = haproxyBinary()
  return binary === undefined ? undefined : execFileSync(binary, ["-v"], { encoding: "utf8" }).split("\n")[0]!.trim()
}

// --- a replica ----------------------------------------------------------------------------------------

/** One `vdiff serve` process on a fixed port, configured by VDIFF_* variables. */
export class Replica {
  child: ChildProcess | undefined
  output = ""
  exited: Promise<number | null> = Promise.resolve(null)

  constructor(
    readonly name: string,
    readonly port: number,
    readonly env: Record<string, string>
  ) {}

  get url() {
    return `http://127.0.0.1:${this.port}`
  }

  /** Starts the process and waits until /health/ready answers 200. */
  async start(readyTimeoutMs = 120_000): Promise<void> {
    // node --import tsx, not the tsx command, which relays signals badly (test/http-shutdown.test.ts).
    const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts", "serve"], {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "pipe"],
      env: { PATH: process.env["PATH"] ?? "", HOME: process.env["HOME"] ?? "", ...this.env, VDIFF_PORT: String(this.port) }
    })
    this.child = child
    this.output = ""
    const keep = (chunk: unknown) => {
      this.output = (this.output + String(chunk)).slice(-20_000)
    }
    child.stdout!.on("data", keep)
    child.stderr!.on("data", keep)
    this.exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)))
    let gone = false
    void this.exited.then(() => (gone = true))
    const start = Date.now()
    for (;;) {
      if (gone) throw new Error(`${this.name} exited before it was ready:\n${this.output}`)
      if (Date.now() - start > readyTimeoutMs) {
        child.kill("SIGKILL")
        throw new Error(`${this.name} was not ready in ${readyTimeoutMs} ms:\n${this.output}`)
      }
      try {
        const response = await fetch(this.url + "/health/ready", { signal: AbortSignal.timeout(2000) })
        await response.arrayBuffer()
        if (response.status === 200) return
      } catch {
        // not listening yet
      }
      await sleep(100)
    }
  }

  /** SIGTERM (or `signal`) and the exit code. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<number | null> {
    const child = this.child
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return this.exited
    child.kill(signal)
    return this.exited
  }
}

// --- HAProxy ------------------------------------------------------------------------------------------

/**
 * The load balancer's configuration: least connections (the nearest HAProxy has to least queue: a
 * replica's connections are its requests in flight), health check on readiness every 500 ms, out after
 * one failure, back after two passes; requests refused by a draining replica (503) or whose connection
 * failed are retried on another replica, up to 6 times.
 */
export const haproxyConfig = (options: { port: number; socket: string; replicas: ReadonlyArray<{ name: string; port: number }> }) =>
  `global
  maxconn 1024
  stats socket ${options.socket} mode 600 level admin

defaults
  mode http
  timeout connect 2s
  timeout client 300s
  timeout server 300s
  timeout queue 60s
  retries 6
  option redispatch 1
  retry-on conn-failure empty-response 503

frontend vdiff
  bind 127.0.0.1:${options.port}
  default_backend replicas

backend replicas
  balance leastconn
  option httpchk
  http-check send meth GET uri /health/ready
  http-check expect status 200
  default-server check inter 500ms fastinter 250ms downinter 500ms fall 1 rise 2
${options.replicas.map((r) => `  server ${r.name} 127.0.0.1:${r.port}`).join("\n")}
`

/** Sends one command to HAProxy's runtime API and returns its answer. */
export const haproxyCommand = (socket: string, command: string): Promise<string> =>
  new Promise((resolve, reject) => {
    const connection = createConnection(socket)
    let answer = ""
    connection.on("data", (chunk) => (answer += String(chunk)))
    connection.on("end", () => resolve(answer))
    connection.on("error", reject)
    connection.write(command + "\n")
  })

/** `show stat` as rows keyed by column name. */
export const haproxyStats = async (socket: string): Promise<Array<Record<string, string>>> => {
  const text = await haproxyCommand(socket, "show stat")
  const [header, ...rows] = text.trim().split("\n")
  const columns = header!.replace(/^# /, "").split(",")
  return rows.map((row) => Object.fromEntries(row.split(",").map((value, i) => [columns[i]!, value])))
}

export class Balancer {
  readonly dir = mkdtempSync(join(tmpdir(), "vdiff-lb-"))
  readonly socket = join(this.dir, "admin.sock")
  child: ChildProcess | undefined
  output = ""

  constructor(
    readonly port: number,
    readonly replicas: ReadonlyArray<{ name: string; port: number }>
  ) {}

  get url() {
    return `http://127.0.0.1:${this.port}`
  }

  async start(): Promise<void> {
    const config = join(this.dir, "haproxy.cfg")
    writeFileSync(config, haproxyConfig({ port: this.port, socket: this.socket, replicas: this.replicas }))
    const binary = haproxyBinary() ?? "haproxy"
    execFileSync(binary, ["-c", "-q", "-f", config])
    // -db: stay in the foreground, so that the process is ours to stop.
    const child = spawn(binary, ["-db", "-f", config], { stdio: ["ignore", "pipe", "pipe"] })
    this.child = child
    child.stdout!.on("data", (chunk) => (this.output = (this.output + String(chunk)).slice(-20_000)))
    child.stderr!.on("data", (chunk) => (this.output = (this.output + String(chunk)).slice(-20_000)))
    await this.awaitStatus(
      this.replicas.map((r) => r.name),
      "UP",
      20_000
    )
  }

  /** Server name → status ("UP", "DOWN", "UP 1/2", …). */
  async statuses(): Promise<Record<string, string>> {
    const rows = await haproxyStats(this.socket)
    return Object.fromEntries(
      rows.filter((r) => r["pxname"] === "replicas" && r["svname"] !== "BACKEND").map((r) => [r["svname"]!, r["status"]!])
    )
  }

  /** Waits until every named server has `status` in HAProxy's view. */
  async awaitStatus(names: ReadonlyArray<string>, status: string, timeoutMs: number): Promise<void> {
    const start = Date.now()
    for (;;) {
      try {
        const now = await this.statuses()
        if (names.every((name) => now[name] === status)) return
        if (Date.now() - start > timeoutMs) throw new Error(`HAProxy: ${JSON.stringify(now)}, waiting for ${status}`)
      } catch (error) {
        if (Date.now() - start > timeoutMs)
          throw new Error(`HAProxy never reported ${names.join(",")} ${status}: ${String(error)}\n${this.output}`)
      }
      await sleep(50)
    }
  }

  async counters() {
    const rows = (await haproxyStats(this.socket)).filter((r) => r["pxname"] === "replicas")
    const backend = rows.find((r) => r["svname"] === "BACKEND")!
    return {
      retries: Number(backend["wretr"]),
      redispatches: Number(backend["wredis"]),
      responses5xx: Number(backend["hrsp_5xx"]),
      perReplica: Object.fromEntries(rows.filter((r) => r["svname"] !== "BACKEND").map((r) => [r["svname"]!, Number(r["stot"])]))
    }
  }

  async stop(): Promise<void> {
    const child = this.child
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.on("exit", resolve))
      child.kill("SIGTERM")
      await exited
    }
    rmSync(this.dir, { recursive: true, force: true })
  }
}

// --- the load -----------------------------------------------------------------------------------------

type Phase = "steady" | "restart"

interface SentRequest {
  readonly phase: Phase
  readonly stream: boolean
  readonly ok: boolean
  readonly truncated: boolean
  readonly ms: number
  readonly why?: string
}

/** Why a stream that got its 200 and event-stream head still did not end as it should. */
const cutStream = (why: string) => !/^(status \d+|503:|stream content-type)/.test(why)

const phaseFigures = (records: ReadonlyArray<SentRequest>, wallMs: number): PhaseFigures => {
  const latencies = records
    .filter((r) => r.ok)
    .map((r) => r.ms)
    .sort((a, b) => a - b)
  const round = (x: number) => Math.round(x)
  return {
    sent: records.length,
    completed: records.filter((r) => r.ok).length,
    failed: records.filter((r) => !r.ok).length,
    streams: records.filter((r) => r.stream).length,
    truncatedStreams: records.filter((r) => r.truncated).length,
    p50Ms: round(percentile(latencies, 0.5)),
    p99Ms: round(percentile(latencies, 0.99)),
    maxMs: round(latencies.at(-1) ?? Number.NaN),
    wallMs: round(wallMs)
  }
}

/** Runs the whole experiment; stops every process it started, whatever happens. */
export const rollingRestart = async (given: Partial<RollingRestartOptions> = {}): Promise<RollingRestartFigures> => {
  const options = { ...defaultOptions, ...given }
  const log = options.log ?? (() => {})
  const haproxy = haproxyVersion()
  if (haproxy === undefined) throw new Error("haproxy is not installed (Debian: apt-get install -y haproxy)")
  const [lbPort, ...ports] = await freePorts(options.replicas + 1)
  const env = {
    VDIFF_HOST: "127.0.0.1",
    VDIFF_THREADS: String(options.threads),
    VDIFF_SHUTDOWN_TIMEOUT: String(options.shutdownTimeoutS),
    VDIFF_DEVICE: "cpu",
    // Info: each request's line and the shutdown's own lines ("draining", "drained; closing"), which the
    // problems quote when a drain overruns.
    VDIFF_LOG_LEVEL: "info"
  }
  const replicas = ports.map((port, i) => new Replica(`r${i}`, port, env))
  const balancer = new Balancer(lbPort!, replicas)
  let watchdog: NodeJS.Timeout | undefined
  const hang = new Promise<never>((_, reject) => {
    watchdog = setTimeout(() => reject(new Error(`rolling restart took over ${options.timeoutMs} ms`)), options.timeoutMs)
  })
  try {
    return await Promise.race([hang, experiment(options, haproxy, replicas, balancer, log)])
  } finally {
    clearTimeout(watchdog)
    await balancer.stop()
    await Promise.all(replicas.map((replica) => replica.stop("SIGKILL")))
  }
}

const experiment = async (
  options: RollingRestartOptions,
  haproxy: string,
  replicas: ReadonlyArray<Replica>,
  balancer: Balancer,
  log: (line: string) => void
): Promise<RollingRestartFigures> => {
  log(`starting ${replicas.length} replicas on ports ${replicas.map((r) => r.port).join(", ")}`)
  await Promise.all(replicas.map((replica) => replica.start()))
  await balancer.start()
  log(`HAProxy on ${balancer.url}: ${JSON.stringify(await balancer.statuses())}`)

  const specs = requestSpecs(options.distinct * 2, 21).filter((spec) => Number(spec.body["max_tokens"]) <= options.maxTokens)
  const expected = await answersAlone(replicas[0]!.url, specs)
  log(`${specs.length} distinct requests answered alone`)

  const records: Array<SentRequest> = []
  const problems: Array<string> = []
  let phase: Phase = "steady"
  let sending = true
  let next = 0
  const one = async () => {
    const spec: RequestSpec = specAt(specs, next++)
    const startedIn = phase
    const outcome = await send(balancer.url, spec, { timeoutMs: 120_000 })
    let ok = outcome.kind === "ok"
    let why = outcome.kind === "ok" ? undefined : `${outcome.kind}: ${"why" in outcome ? outcome.why : "503 queue_full"}`
    if (outcome.kind === "ok" && JSON.stringify(outcome.texts) !== JSON.stringify(expected.get(spec.key))) {
      ok = false
      why = `answer differs from alone: ${JSON.stringify(outcome.texts)} != ${JSON.stringify(expected.get(spec.key))}`
    }
    const truncated = spec.stream && (outcome.kind === "lost" || (outcome.kind === "malformed" && cutStream(outcome.why)))
    records.push({ phase: startedIn, stream: spec.stream, ok, truncated, ms: outcome.ms, ...(why === undefined ? {} : { why }) })
    if (why !== undefined && problems.length < 10) problems.push(`${startedIn} ${spec.key}${spec.stream ? " (stream)" : ""}: ${why}`)
  }
  const client = async () => {
    while (sending) await one()
  }
  const started = performance.now()
  const senders = Promise.all(Array.from({ length: options.clients }, client))

  await sleep(options.steadyMs)
  const restartBegan = performance.now()
  phase = "restart"
  const restarts: Array<RestartFigures> = []
  for (const replica of replicas) {
    const signalled = performance.now()
    const exited = replica.stop("SIGTERM")
    // A burst right after the signal, before HAProxy's next check: whatever of it reaches the draining
    // replica is refused there (503 draining) and must be retried on another one.
    await sleep(20)
    const burst = Promise.all(Array.from({ length: options.burst }, one))
    const exitCode = await exited
    const drainMs = performance.now() - signalled
    await burst
    log(`${replica.name}: drained and exited ${exitCode} in ${Math.round(drainMs)} ms; starting it again`)
    // A drain well past --shutdown-timeout waited on something the scheduler's deadline does not end (twice
    // in CI, 2026-12: one request on the replica unanswered until HAProxy's 300 s server timeout, cause not
    // found): keep what the replica printed, for the summary.
    if (drainMs > (options.shutdownTimeoutS + 10) * 1000) {
      problems.push(`${replica.name}: drain took ${Math.round(drainMs)} ms; its last output:\n${replica.output.slice(-4000)}`)
    }
    await replica.start()
    await balancer.awaitStatus([replica.name], "UP", 60_000)
    const outOfServiceMs = performance.now() - signalled
    log(`${replica.name}: back UP in HAProxy ${Math.round(outOfServiceMs)} ms after SIGTERM`)
    restarts.push({ replica: replica.name, drainMs: Math.round(drainMs), exitCode, outOfServiceMs: Math.round(outOfServiceMs) })
  }
  const restartEnded = performance.now()
  phase = "steady"
  await sleep(options.settleMs)
  sending = false
  await senders
  const ended = performance.now()

  const steadyRecords = records.filter((r) => r.phase === "steady")
  const restartRecords = records.filter((r) => r.phase === "restart")
  const { log: _, ...kept } = options
  return {
    date: new Date().toISOString(),
    machine: { cpu: cpus()[0]?.model ?? "unknown", cores: cpus().length, loadAverage1m: Math.round(loadavg()[0]! * 100) / 100 },
    haproxy,
    options: kept,
    steady: phaseFigures(steadyRecords, ended - started - (restartEnded - restartBegan)),
    restart: phaseFigures(restartRecords, restartEnded - restartBegan),
    total: phaseFigures(records, ended - started),
    restarts,
    balancer: await balancer.counters(),
    problems
  }
}

// --- the command line ---------------------------------------------------------------------------------

const isMain = process.argv[1] !== undefined && import.meta.filename === process.argv[1]

if (isMain) {
  const args = process.argv.slice(2)
  const flag = (name: string, fallback: string) => {
    const i = args.indexOf(`--${name}`)
    return i >= 0 && args[i + 1] !== undefined ? args[i + 1]! : fallback
  }
  const out = flag("out", "")
  const figures = await rollingRestart({
    replicas: Number(flag("replicas", "3")),
    clients: Number(flag("clients", "4")),
    steadyMs: Number(flag("steady-s", "60")) * 1000,
    settleMs: Number(flag("settle-s", "5")) * 1000,
    maxTokens: Number(flag("max-tokens", "16")),
    threads: Number(flag("threads", "1")),
    burst: Number(flag("burst", "6")),
    log: (line) => console.error(`[lb] ${line}`)
  })
  const text = JSON.stringify(figures, null, 2) + "\n"
  if (out !== "") writeFileSync(out, text)
  process.stdout.write(text)
  process.exitCode = figures.total.failed === 0 && figures.total.truncatedStreams === 0 ? 0 : 1
}
