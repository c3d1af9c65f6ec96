/**
 * `vdiff serve` as a child process, for the reliability and security suites: the real CLI, the real
 * native engine, a real socket on 127.0.0.1 (port 0), signals delivered to node itself.
 *
 * It runs as `node --import tsx src/main.ts serve`, not through the `tsx` command, which relays signals
 * badly (see test/http-shutdown.test.ts). Everything the server writes is kept, so tests can read its
 * JSON log lines and look for what must never be logged.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { createInterface } from "node:readline"

export const repoRoot = join(import.meta.dirname, "..", "..")
export const embeddedModel = join(repoRoot, "models", "shakespeare")

export interface ServeProcess {
  readonly child: ChildProcess
  readonly pid: number
  readonly url: string
  /** Every stdout line parsed as JSON (lines that are not JSON are kept as `{ raw }`). */
  readonly logs: Array<Record<string, unknown>>
  /** Everything written to stdout and stderr so far, as text. */
  readonly output: () => string
  /** Resolves with the exit code (null when killed by a signal). */
  readonly exited: Promise<number | null>
  /** The server's resident set size in KiB, from /proc/<pid>/status. */
  readonly rssKb: () => number
  /** Sends `signal` (default SIGTERM) and waits for the exit code. */
  readonly stop: (signal?: NodeJS.Signals) => Promise<number | null>
  /** With `gcHook`: runs a full garbage collection in the server and waits for it. */
  readonly collectGarbage: () => Promise<void>
}

/**
 * Flags every served test starts with: vdiff's own sampling defaults (greedy, deterministic), not the
 * embedded model's recommended ones from its generation_config.json, which sample. A test of what a
 * user gets passes `--generation-config auto` (a later flag wins).
 */
const testDefaults = ["--port", "0", "--threads", "1", "--generation-config", "vdiff"]

export interface ServeOptions {
  /**
   * Extra `vdiff serve` flags; --port 0, --threads 1 and --generation-config vdiff come first and may be
   * overridden.
   */
  readonly flags?: ReadonlyArray<string>
  /** Default: the embedded model. */
  readonly model?: string
  readonly env?: Record<string, string>
  /** How long to wait for the ready line. */
  readonly readyTimeoutMs?: number
  /**
   * Preload test/stress/gc-on-signal.ts (with --expose-gc), so that `collectGarbage` can settle the heap
   * before a memory figure is read.
   */
  readonly gcHook?: boolean
}

/** Starts `vdiff serve` and resolves once its ready line is out; rejects if it exits or stalls first. */
/** What `vdiff serve` printed before it exited, and its exit code (null: killed). */
export interface ServeExit {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/**
 * `vdiff serve --port 0 --threads 1 --generation-config vdiff` with these flags, run to its exit (killed after 30 s: a hang fails
 * the test), with only PATH and `env` in its environment.
 */
export const serveToExit = (flags: ReadonlyArray<string>, env: Record<string, string> = {}): Promise<ServeExit> =>
  new Promise((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts", "serve", ...testDefaults, ...flags], {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "pipe"],
      env: { PATH: process.env["PATH"] ?? "", ...env }
    })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk) => (stdout += chunk))
    child.stderr.on("data", (chunk) => (stderr += chunk))
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000)
    child.on("exit", (code) => {
      clearTimeout(timer)
      resolve({ code, stdout, stderr })
    })
  })

export const startServe = (options: ServeOptions = {}): Promise<ServeProcess> =>
  new Promise((resolve, reject) => {
    const args = [
      ...(options.gcHook === true ? ["--expose-gc"] : []),
      "--import",
      "tsx",
      ...(options.gcHook === true ? ["--import", "./test/stress/gc-on-signal.ts"] : []),
      "src/main.ts",
      "serve",
      "--model",
      options.model ?? embeddedModel,
      ...testDefaults,
      ...(options.flags ?? [])
    ]
    const child = spawn(process.execPath, args, {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "pipe"],
      // Only what the test passes: no VDIFF_* settings leak in from the environment running the tests.
      env: { PATH: process.env["PATH"] ?? "", HOME: process.env["HOME"] ?? "", ...options.env }
    })
    const logs: Array<Record<string, unknown>> = []
    let output = ""
    let collections = 0
    const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)))
    const timer = setTimeout(() => {
      child.kill("SIGKILL")
      reject(new Error(`vdiff serve was not ready in time:\n${output}`))
    }, options.readyTimeoutMs ?? 60_000)
    child.stderr!.on("data", (chunk) => (output += String(chunk)))
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`vdiff serve exited early (${code}):\n${output}`))
    })
    createInterface({ input: child.stdout! }).on("line", (line) => {
      output += line + "\n"
      let entry: Record<string, unknown>
      try {
        entry = JSON.parse(line) as Record<string, unknown>
      } catch {
        entry = { raw: line }
      }
      logs.push(entry)
      if (String(entry["message"]).startsWith("vdiff ready on")) {
        clearTimeout(timer)
        const pid = child.pid!
        resolve({
          child,
          pid,
          url: String(entry["address"]),
          logs,
          output: () => output,
          exited,
          rssKb: () => rssKb(pid),
          stop: async (signal = "SIGTERM") => {
            if (child.exitCode === null && child.signalCode === null) child.kill(signal)
            return exited
          },
          collectGarbage: async () => {
            if (options.gcHook !== true) throw new Error("collectGarbage needs gcHook: true")
            const marker = `vdiff-test-gc ${++collections}\n`
            child.kill("SIGUSR2")
            const start = Date.now()
            while (!output.includes(marker)) {
              if (Date.now() - start > 10_000) throw new Error("the server did not report its garbage collection")
              await sleep(5)
            }
          }
        })
      }
    })
  })

/** VmRSS of a process, in KiB. */
export const rssKb = (pid: number): number => {
  const match = /^VmRSS:\s+(\d+)\s+kB$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))
  if (match === null) throw new Error(`no VmRSS for process ${pid}`)
  return Number(match[1])
}

/** GET /v1/engine/stats. */
export const engineStats = async (url: string, headers: Record<string, string> = {}) => {
  const response = await fetch(url + "/v1/engine/stats", { headers })
  if (response.status !== 200) throw new Error(`/v1/engine/stats answered ${response.status}`)
  return (await response.json()) as {
    scheduler: {
      waiting: number
      running: number
      running_sequences: number
      steps_total: number
      requests_finished: number
      cancelled_total: number
      steps_after_cancel_max: number
    }
    engine: { live_sequences: number }
  }
}

/** Polls until the scheduler has nothing waiting or running and the engine holds no sequence. */
export const awaitIdle = async (url: string, timeoutMs = 10_000, headers: Record<string, string> = {}) => {
  const start = Date.now()
  for (;;) {
    const stats = await engineStats(url, headers)
    const idle = stats.scheduler.waiting === 0 && stats.scheduler.running === 0 && stats.engine.live_sequences === 0
    if (idle) return { stats, waitedMs: Date.now() - start }
    if (Date.now() - start > timeoutMs) throw new Error(`server not idle after ${timeoutMs} ms: ${JSON.stringify(stats)}`)
    await sleep(10)
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Whether the size knob asks for the full-size runs (`npm run test:stress`). */
export const fullSize = process.env["VDIFF_STRESS"] === "1"

/** The small figure under `npm test`, the large one under `npm run test:stress`. */
export const size = (small: number, full: number): number => (fullSize ? full : small)

/** A test's time limit: `smallMs` under `npm test`, 20 minutes for the full-size runs. */
export const timeLimit = (smallMs = 60_000): number => (fullSize ? 1_200_000 : smallMs)
