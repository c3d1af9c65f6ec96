/**
 * The whole CLI in a child process: `src/main.ts serve` on a tiny model made by `make-model` (real native
 * engine) with the test tokenizer, a long streaming request, then SIGTERM.
 *
 * The server runs as `node --import tsx src/main.ts`, not through the `tsx` command: that one relays
 * signals to its child and SIGKILLs it when the child does not confirm within 30 ms, which on a busy
 * machine kills the server mid-drain. Signalling node directly is what `vdiff serve` gets in production.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { createInterface } from "node:readline"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { repoRoot, writeTinyTokenizer } from "./http-helpers.js"

const tsx = join(repoRoot, "node_modules", ".bin", "tsx")
let work: string
let modelDir: string

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "vdiff-shutdown-"))
  modelDir = join(work, "tiny")
  const made = spawnSync(tsx, ["src/main.ts", "make-model", "--preset", "tiny", "--seed", "1", "--out", modelDir], {
    cwd: repoRoot,
    encoding: "utf8"
  })
  if (made.status !== 0) throw new Error(`make-model failed: ${made.stderr}`)
  // The tiny preset's special ids: eos 510, mask 511.
  await writeTinyTokenizer(modelDir, { eos: 510, mask: 511 })
})

afterAll(async () => {
  await rm(work, { recursive: true, force: true })
})

interface Server {
  readonly child: ChildProcess
  readonly url: string
  readonly logs: Array<Record<string, unknown>>
  readonly exited: Promise<number | null>
}

/** Starts `vdiff serve` and resolves once its ready line is out. */
const startServer = (flags: ReadonlyArray<string>): Promise<Server> =>
  new Promise((resolve, reject) => {
    const args = ["--import", "tsx", "src/main.ts", "serve", "--model", modelDir, "--port", "0", "--threads", "1"]
    const child = spawn(process.execPath, [...args, ...flags], {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "pipe"]
    })
    const logs: Array<Record<string, unknown>> = []
    const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)))
    let stderr = ""
    child.stderr!.on("data", (chunk) => (stderr += chunk))
    exited.then((code) => reject(new Error(`server exited early (${code}): ${stderr}`)))
    createInterface({ input: child.stdout! }).on("line", (line) => {
      const entry = JSON.parse(line) as Record<string, unknown>
      logs.push(entry)
      if (String(entry["message"]).startsWith("vdiff ready on")) {
        resolve({ child, url: String(entry["address"]), logs, exited })
      }
    })
  })

/** Starts a long streaming completion (400 steps) and resolves with its reader once the first event is in. */
const startStream = async (url: string) => {
  const response = await fetch(url + "/v1/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    // Snapshots: one event per denoising step, so the first comes at once whatever text the
    // random model writes.
    body: JSON.stringify({
      model: "tiny",
      prompt: "Hello",
      max_tokens: 400,
      diffusion_steps: 400,
      stream: true,
      stream_options: { include_snapshots: true }
    })
  })
  expect(response.status).toBe(200)
  const reader = response.body!.getReader()
  const decoder = new TextDecoder()
  let text = ""
  while (!text.includes("\n\n")) {
    const { done, value } = await reader.read()
    if (done) break
    text += decoder.decode(value, { stream: true })
  }
  return {
    rest: async (): Promise<Array<string>> => {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) break
        text += decoder.decode(value, { stream: true })
      }
      return text
        .split("\n\n")
        .filter((e) => e !== "")
        .map((e) => e.replace(/^data: /, ""))
    }
  }
}

describe("vdiff serve on SIGTERM", () => {
  it("stops taking work, lets the running stream finish, and exits 0", async () => {
    const server = await startServer(["--shutdown-timeout", "60"])
    expect(server.logs.filter((l) => String(l["message"]).startsWith("vdiff ready on"))).toHaveLength(1)
    expect(server.logs.at(-1)).toMatchObject({ model: "tiny", backend: "cpu", level: "info" })
    const stream = await startStream(server.url)
    server.child.kill("SIGTERM")
    // Readiness turns 503 at once, while the stream is still running.
    let ready: Response | undefined
    for (let i = 0; i < 50; i++) {
      ready = await fetch(server.url + "/health/ready")
      if (ready.status === 503) break
      await new Promise((r) => setTimeout(r, 20))
    }
    expect(ready!.status).toBe(503)
    expect(((await ready!.json()) as any).error.code).toBe("draining")
    const events = await stream.rest()
    expect(events.at(-1)).toBe("[DONE]")
    expect(JSON.parse(events.at(-2)!).choices[0].finish_reason).toBe("length")
    expect(await server.exited).toBe(0)
    const messages = server.logs.map((l) => String(l["message"]))
    expect(messages).toContain("shutting down: draining in-flight requests")
    expect(messages.at(-1)).toBe("drained; closing the server and releasing the model")
  })

  it("ends a stream still running at --shutdown-timeout with an error event, and exits 0", async () => {
    const server = await startServer(["--shutdown-timeout", "0"])
    const stream = await startStream(server.url)
    server.child.kill("SIGTERM")
    const events = await stream.rest()
    expect(events.at(-1)).toBe("[DONE]")
    expect(JSON.parse(events.at(-2)!).error).toMatchObject({ type: "service_unavailable_error", code: "draining" })
    expect(await server.exited).toBe(0)
  })
})
