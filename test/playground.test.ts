/**
 * The playground (GET /) in a real browser: Debian's headless Chromium driven by playwright-core, against
 * `vdiff serve` in a child process on the embedded model (real native engine), with an API key so the
 * key field is exercised too.
 *
 * Skipped, and reported as skipped, where /usr/bin/chromium is not installed (.ci/run installs it).
 *
 * `VDIFF_PLAYGROUND_SCREENSHOT=docs/playground.png npx vitest run test/playground.test.ts` also saves a
 * screenshot taken mid-generation there (the one the README shows).
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import { createHash } from "node:crypto"
import { existsSync } from "node:fs"
import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join, resolve } from "node:path"
import { createInterface } from "node:readline"
import { type BrowserContext, chromium, type Page } from "playwright-core"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { assemble, page as playgroundPage } from "../src/playground/Playground.js"
import { repoRoot, writeTinyTokenizer } from "./http-helpers.js"

// The functions given to page.evaluate run in the page; this project compiles without the DOM library.
declare const document: any, window: any, sessionStorage: any, localStorage: any, MutationObserver: any

const chromiumPath = "/usr/bin/chromium"
const haveChromium = existsSync(chromiumPath)
const apiKey = "playground-test-key"
/** Where to save a screenshot taken mid-generation (for the README), if anywhere. */
const screenshotPath = process.env["VDIFF_PLAYGROUND_SCREENSHOT"]
const embeddedModelDir = join(repoRoot, "models", "shakespeare")
/** The served model's default block length: the embedded model's generation_config.json says 8. */
let defaultBlock = 8

interface Server {
  readonly child: ChildProcess
  readonly url: string
  readonly exited: Promise<number | null>
}

/**
 * `vdiff serve` as production runs it (node, not the tsx wrapper, which relays signals badly), resolved
 * once its ready line is out.
 */
const startServer = (modelDir: string): Promise<Server> =>
  new Promise((resolveServer, reject) => {
    const args = ["--import", "tsx", "src/main.ts", "serve", "--model", modelDir, "--port", "0", "--threads", "1"]
    const child = spawn(process.execPath, [...args, "--api-key", apiKey], {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "pipe"]
    })
    const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)))
    let stderr = ""
    child.stderr!.on("data", (chunk) => (stderr += chunk))
    exited.then((code) => reject(new Error(`server exited early (${code}): ${stderr}`)))
    createInterface({ input: child.stdout! }).on("line", (line) => {
      const entry = JSON.parse(line) as Record<string, unknown>
      if (String(entry["message"]).startsWith("vdiff ready on")) {
        resolveServer({ child, url: String(entry["address"]), exited })
      }
    })
  })

let work: string
let server: Server
let context: BrowserContext
let page: Page
/** Problems the page reported: uncaught errors and Content-Security-Policy violations. */
const pageProblems: Array<string> = []

const api = async (path: string, body?: unknown): Promise<any> => {
  const response = await fetch(server.url + path, {
    method: body === undefined ? "GET" : "POST",
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) })
  })
  expect(response.status).toBe(200)
  return response.json()
}

/** Fills the settings form. */
const fillSettings = async (settings: {
  readonly maxTokens: number
  readonly steps: number
  readonly blockLength: number
  readonly chat: boolean
  readonly temperature: number
}) => {
  await page.getByLabel("Max tokens").fill(String(settings.maxTokens))
  await page.getByLabel("Steps").fill(String(settings.steps))
  await page.getByLabel("Block length").fill(String(settings.blockLength))
  await page.getByLabel("Temperature").fill(String(settings.temperature))
  await page.getByLabel("Chat mode").setChecked(settings.chat)
}

const sha256 = (text: string) => createHash("sha256").update(text, "utf8").digest("base64")

describe("the playground page, assembled", () => {
  it("inlines the style and the script, and allows exactly those by hash", () => {
    const css = "p { color: red }"
    const js = "const $1 = `${'$&'}`"
    const { html, contentSecurityPolicy } = assemble({
      html: "<style>/*PLAYGROUND_CSS*/</style><script>/*PLAYGROUND_JS*/</script>",
      css,
      js
    })
    // `$` patterns in the script are taken literally.
    expect(html).toBe(`<style>${css}</style><script>${js}</script>`)
    expect(contentSecurityPolicy).toContain(`script-src 'sha256-${sha256(js)}';`)
    expect(contentSecurityPolicy).toContain(`style-src 'sha256-${sha256(css)}';`)
  })

  it("refuses content that would end its element early", () => {
    const html = "<style>/*PLAYGROUND_CSS*/</style><script>/*PLAYGROUND_JS*/</script>"
    expect(() => assemble({ html, css: "", js: "x = '</script>'" })).toThrow(/<\/script/)
    expect(() => assemble({ html, css: "</STYLE>", js: "" })).toThrow(/<\/style/)
    expect(() => assemble({ html: "<p></p>", css: "", js: "" })).toThrow(/PLAYGROUND_CSS/)
  })

  it("builds the real page from src/playground", () => {
    const { html, contentSecurityPolicy } = playgroundPage()
    expect(html).not.toContain("/*PLAYGROUND_")
    const script = /<script>([\s\S]*)<\/script>/.exec(html)![1]!
    expect(contentSecurityPolicy).toContain(`'sha256-${sha256(script)}'`)
  })
})

describe.skipIf(!haveChromium)(`the playground in headless Chromium (needs ${chromiumPath})`, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), "vdiff-playground-"))
    let modelDir = embeddedModelDir
    if (!existsSync(join(modelDir, "model.safetensors"))) {
      // No embedded model in this checkout: a tiny random one does (its text is gibberish, which is fine).
      modelDir = join(work, "tiny")
      const made = spawnSync(
        process.execPath,
        ["--import", "tsx", "src/main.ts", "make-model", "--preset", "tiny", "--seed", "1", "--out", modelDir],
        { cwd: repoRoot, encoding: "utf8" }
      )
      if (made.status !== 0) throw new Error(`make-model failed: ${made.stderr}`)
      await writeTinyTokenizer(modelDir, { eos: 510, mask: 511 })
      defaultBlock = 32
    }
    server = await startServer(modelDir)
    context = await chromium.launchPersistentContext(join(work, "profile"), {
      executablePath: chromiumPath,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run"
      ],
      viewport: { width: 1200, height: 900 }
    })
    page = context.pages()[0] ?? (await context.newPage())
    page.on("pageerror", (error) => pageProblems.push(`page error: ${error.message}`))
    page.on("console", (message) => {
      if (message.type() === "error" && /Content Security Policy|Refused to|Trusted ?Type/i.test(message.text())) {
        pageProblems.push(`policy: ${message.text()}`)
      }
    })
  })

  afterAll(async () => {
    await context?.close()
    if (server !== undefined) {
      server.child.kill("SIGTERM")
      await server.exited.catch(() => undefined)
    }
    if (work !== undefined) await rm(work, { recursive: true, force: true })
  })

  it("serves one self-contained page under a strict policy, without an API key", async () => {
    const response = await fetch(server.url + "/")
    expect(response.status).toBe(200)
    expect(response.headers.get("content-type")).toBe("text/html; charset=utf-8")
    const policy = response.headers.get("content-security-policy")!
    expect(policy).toContain("default-src 'none'")
    expect(policy).toContain("connect-src 'self'")
    expect(policy).toMatch(/script-src 'sha256-[A-Za-z0-9+/=]+'(;|$)/)
    expect(policy).not.toContain("unsafe")
    const html = await response.text()
    // Nothing to load from anywhere: no src= at all, and the only href is the empty icon.
    expect(html).not.toMatch(/\ssrc=/)
    expect([...html.matchAll(/\shref="([^"]*)"/g)].map((m) => m[1])).toEqual(["data:,"])
    // The API itself still wants the key.
    expect((await fetch(server.url + "/v1/models")).status).toBe(401)
  })

  it("labels every control and turns to one column on a narrow window", async () => {
    await page.goto(server.url + "/")
    const unlabelled = await page.evaluate(() =>
      [...document.querySelectorAll("input, select, textarea")]
        .filter((control: any) => control.labels.length === 0)
        .map((control: any) => control.id)
    )
    expect(unlabelled).toEqual([])
    const boxes = async () => ({
      form: (await page.locator("#run-form").boundingBox())!,
      output: (await page.locator("#output").boundingBox())!
    })
    const wide = await boxes()
    expect(wide.output.x).toBeGreaterThanOrEqual(wide.form.x + wide.form.width)
    await page.setViewportSize({ width: 420, height: 900 })
    const narrow = await boxes()
    expect(narrow.output.y).toBeGreaterThanOrEqual(narrow.form.y + narrow.form.height)
    expect(narrow.form.width).toBeLessThanOrEqual(420)
    await page.setViewportSize({ width: 1200, height: 900 })
  })

  it("shows an API error in the alert region", async () => {
    await page.goto(server.url + "/")
    await page.getByLabel("Prompt", { exact: true }).fill("ROMEO:")
    await page.getByRole("button", { name: "Run" }).click()
    await expect.poll(() => page.locator("[role=alert]").textContent()).toMatch(/^Error: 401: .*API key/)
    expect(await page.locator("#status").textContent()).toBe("Failed.")
  })

  it("runs on Ctrl+Enter: placeholders become text step by step, then the plain answer", async () => {
    await page.goto(server.url + "/")
    await page.getByLabel(/API key/).fill(apiKey)
    const settings = { maxTokens: 64, steps: 32, blockLength: 16, chat: true, temperature: 0 }
    await fillSettings(settings)
    await page.getByLabel("Prompt", { exact: true }).fill("Who art thou?")
    // Every change of the step counter: the masked placeholders on the canvas, the freshly committed
    // tokens and whether a block is marked.
    await page.evaluate(() => {
      const seen: Array<{ step: string; masked: number; fresh: number; blocks: number }> = []
      window.__seen = seen
      new MutationObserver(() =>
        seen.push({
          step: document.getElementById("progress")!.textContent!,
          masked: document.querySelectorAll("#canvas [aria-label=masked]").length,
          fresh: document.querySelectorAll("#canvas .tok.new").length,
          blocks: document.querySelectorAll("#canvas .block").length
        })
      ).observe(document.getElementById("progress")!, { childList: true, characterData: true, subtree: true })
    })
    await page.getByLabel("Prompt", { exact: true }).press("Control+Enter")
    await expect.poll(() => page.locator("#status").textContent(), { timeout: 60_000 }).toMatch(/^Done/)

    const seen: Array<{ step: string; masked: number; fresh: number; blocks: number }> = await page.evaluate(() => window.__seen)
    const steps = seen.filter((s) => /^step \d+ \/ 32 /.test(s.step))
    expect(steps.length).toBeGreaterThanOrEqual(3)
    const masked = steps.map((s) => s.masked)
    expect(masked[0]).toBeGreaterThan(0)
    for (let i = 1; i < masked.length; i++) expect(masked[i]).toBeLessThanOrEqual(masked[i - 1]!)
    expect(new Set(masked).size).toBeGreaterThanOrEqual(3)
    expect(masked.at(-1)).toBeLessThan(masked[0]!)
    expect(steps.every((s) => s.blocks === 1)).toBe(true)
    expect(steps.some((s) => s.fresh > 0)).toBe(true)
    expect(steps[0]!.step).toMatch(/tokens\/s$/)

    // The answer shown is the API's own answer to the same request (greedy, so deterministic).
    const direct = await api("/v1/chat/completions", {
      messages: [{ role: "user", content: "Who art thou?" }],
      max_tokens: settings.maxTokens,
      diffusion_steps: settings.steps,
      block_length: settings.blockLength,
      temperature: 0,
      remasking: "low_confidence"
    })
    expect(await page.locator("#answer").textContent()).toBe(direct.choices[0].message.content)
    expect(await page.locator("[role=alert]").textContent()).toBe("")
    // The key lives in the tab's session only, and is still there after a reload.
    expect(await page.evaluate(() => [sessionStorage.getItem("vdiff.apiKey"), localStorage.length])).toEqual([apiKey, 0])
    await page.reload()
    expect(await page.getByLabel(/API key/).inputValue()).toBe(apiKey)
  })

  it("stops mid-way with the Stop button, and the server cancels the sequence", async () => {
    await page.goto(server.url + "/")
    await page.getByLabel(/API key/).fill(apiKey)
    const totalSteps = 192
    await fillSettings({ maxTokens: 192, steps: totalSteps, blockLength: 32, chat: false, temperature: 0.8 })
    await page.getByLabel("Prompt", { exact: true }).fill("ROMEO:\nBut soft, what light")
    const before = (await api("/v1/engine/stats")).scheduler.sequence_steps_total as number

    await page.getByRole("button", { name: "Run" }).click()
    const stepShown = async () => Number(/^step (\d+)/.exec((await page.locator("#progress").textContent())!)?.[1] ?? 0)
    await expect.poll(stepShown, { timeout: 60_000, interval: 50 }).toBeGreaterThanOrEqual(screenshotPath ? 40 : 10)
    if (screenshotPath !== undefined) await page.screenshot({ path: resolve(repoRoot, screenshotPath) })
    await page.getByRole("button", { name: "Stop" }).click()

    await expect.poll(() => page.locator("#status").textContent(), { timeout: 10_000 }).toMatch(/^Stopped at step \d+ of 192\.$/)
    const stoppedAt = Number(/step (\d+)/.exec((await page.locator("#status").textContent())!)![1])
    expect(stoppedAt).toBeLessThan(totalSteps)
    expect(await page.getByRole("button", { name: "Run" }).isEnabled()).toBe(true)
    expect(await page.getByRole("button", { name: "Stop" }).isDisabled()).toBe(true)

    // The server notices the closed connection and frees the sequence within a step or so.
    await expect
      .poll(
        async () => {
          const stats = await api("/v1/engine/stats")
          return [stats.scheduler.running, stats.engine.live_sequences]
        },
        { timeout: 10_000 }
      )
      .toEqual([0, 0])
    const after = (await api("/v1/engine/stats")).scheduler.sequence_steps_total as number
    expect(after - before).toBeLessThan(totalSteps)
    expect(after - before).toBeGreaterThanOrEqual(stoppedAt)
  })

  it("leaves the settings to the server's defaults for the model, and boxes the block in force", async () => {
    await page.goto(server.url + "/")
    await page.getByLabel(/API key/).fill(apiKey)
    // The form as it loads: only the answer length is filled in, so every family's defaults apply (a Dream
    // model has no blocks, an SDAR model takes only the block it was trained with).
    for (const label of ["Steps", "Block length", "Temperature", "Parallel threshold"]) {
      expect(await page.getByLabel(label).inputValue(), label).toBe("")
    }
    await page.getByLabel("Max tokens").fill("24")
    await page.getByLabel("Prompt", { exact: true }).fill("ROMEO:")
    const sent = page.waitForRequest((request: any) => request.url().endsWith("/v1/completions"))
    await page.getByRole("button", { name: "Run" }).click()
    const body = JSON.parse((await sent).postData()!)
    expect(Object.keys(body).sort()).toEqual(["max_tokens", "prompt", "stream", "stream_options"])
    await expect.poll(() => page.locator("#status").textContent(), { timeout: 60_000 }).toMatch(/^Done/)
    // The dashed box spans the server's default block (the embedded model's generation_config: 8; a tiny
    // random model's: the server's 32, at most the answer).
    const box = await page.locator("#canvas .block").getAttribute("aria-label")
    const [, first, last] = /positions (\d+) to (\d+)/.exec(box!)!
    expect(Number(last) - Number(first) + 1).toBe(Math.min(24, defaultBlock))
  })

  it("saw no script errors and no policy violations on any page", async () => {
    expect(pageProblems).toEqual([])
  })
})
