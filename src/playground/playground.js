// The playground's script: sends the prompt to the public OpenAI-compatible API with
// stream_options.include_snapshots and draws every snapshot (the whole answer canvas after a denoising
// step) as it arrives. Plain browser JavaScript, no build step; all text goes in through textContent.
"use strict"

/** What the server puts on the canvas for a position not committed yet (src/openai/protocol.ts). */
const MASK_PLACEHOLDER = "<mask>"
/** sessionStorage: the key lives as long as the tab, and is never written anywhere else. */
const API_KEY_ITEM = "vdiff.apiKey"

const byId = (id) => document.getElementById(id)
const form = byId("run-form")
const apiKey = byId("api-key")
const chatMode = byId("chat-mode")
const prompt = byId("prompt")
const runButton = byId("run")
const stopButton = byId("stop")
const progress = byId("progress")
const canvas = byId("canvas")
const status = byId("status")
const errorBox = byId("error")
const answer = byId("answer")

/** The run in progress: its AbortController, or null. */
let current = null

// ---- the request -----------------------------------------------------------------------------------

/** A number field's value, or undefined when it is empty (the server's default applies). */
const numberField = (id) => {
  const text = byId(id).value.trim()
  return text === "" ? undefined : Number(text)
}

/** A select's value, or undefined for its "default" entry (the server's default applies). */
const choiceField = (id) => (byId(id).value === "" ? undefined : byId(id).value)

/**
 * The request body; fields the user left empty (or at "default") are not sent, so the server's defaults
 * for its model family apply: a family refuses settings it was not made for (Dream has no blocks, SDAR
 * takes only the block it was trained with).
 */
const requestBody = (chat) => {
  const text = prompt.value
  const body = chat ? { messages: [{ role: "user", content: text }] } : { prompt: text }
  const fields = {
    max_tokens: numberField("max-tokens"),
    diffusion_steps: numberField("steps"),
    block_length: numberField("block-length"),
    temperature: numberField("temperature"),
    remasking: choiceField("remasking"),
    kv_cache: choiceField("kv-cache"),
    parallel_threshold: numberField("parallel-threshold")
  }
  for (const [name, value] of Object.entries(fields)) if (value !== undefined) body[name] = value
  return { ...body, stream: true, stream_options: { include_snapshots: true, include_usage: true } }
}

/** The message of an error response (OpenAI's {"error": {...}} body), with the status. */
const httpErrorMessage = async (response) => {
  let message = response.statusText
  try {
    const body = await response.json()
    if (body?.error && typeof body.error.message === "string") message = body.error.message
  } catch {
    // not JSON: keep the status text
  }
  const hint = response.status === 401 || response.status === 403 ? " (check the API key field)" : ""
  return `${response.status}: ${message}${hint}`
}

/** The `data:` payloads of a server-sent event stream, as they arrive. */
async function* sseData(body) {
  const reader = body.getReader()
  const decoder = new TextDecoder()
  let buffer = ""
  try {
    for (;;) {
      const { done, value } = await reader.read()
      buffer += decoder.decode(value, { stream: !done })
      const events = buffer.split(/\r?\n\r?\n/)
      buffer = done ? "" : events.pop()
      for (const event of events) {
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n")
        if (data !== "") yield data
      }
      if (done) return
    }
  } finally {
    reader.releaseLock()
  }
}

// ---- drawing -----------------------------------------------------------------------------------------

/**
 * Line breaks are drawn as a mark, not as breaks: the canvas shows positions, and a run of newlines
 * would otherwise push the rest of it out of view. The answer below keeps the real text.
 */
const shown = (text) => text.replace(/\r?\n/g, "↵")

/**
 * One span per answer position; the positions of the current block go inside a dashed box. With token
 * editing (block-diffusion models), the open block's tokens that may still change are drawn provisional.
 */
const drawCanvas = (snapshot, blockLength) => {
  const fresh = new Set(snapshot.committed_now)
  const provisional = new Set(snapshot.provisional ?? [])
  const length = snapshot.canvas.length
  const block = blockLength === undefined ? 0 : Math.min(blockLength, length)
  const blockStart = snapshot.block * block
  const blockEnd = Math.min(blockStart + block, length)
  const nodes = []
  let box = null
  snapshot.canvas.forEach((text, position) => {
    const span = document.createElement("span")
    if (text === MASK_PLACEHOLDER) {
      span.className = "tok mask"
      span.textContent = "▒"
      span.setAttribute("role", "img")
      span.setAttribute("aria-label", "masked")
    } else {
      span.className = provisional.has(position) ? "tok provisional" : fresh.has(position) ? "tok new" : "tok"
      span.textContent = shown(text)
      if (provisional.has(position)) span.title = "provisional: may still be edited"
    }
    if (block > 0 && position >= blockStart && position < blockEnd) {
      if (box === null) {
        box = document.createElement("span")
        box.className = "block"
        box.setAttribute("aria-label", `current block, positions ${blockStart + 1} to ${blockEnd}`)
        nodes.push(box)
      }
      box.append(span)
    } else nodes.push(span)
  })
  canvas.replaceChildren(...nodes)
}

const rate = (tokens, seconds) => (seconds > 0 ? (tokens / seconds).toFixed(1) : "–")

const drawProgress = (snapshot, blockLength, seconds) => {
  const length = snapshot.canvas.length
  const blocks = blockLength === undefined ? undefined : Math.ceil(length / Math.min(blockLength, length))
  const committed = length - snapshot.masked
  progress.textContent =
    `step ${snapshot.step} / ${snapshot.total_steps} · ` +
    `block ${snapshot.block + 1}${blocks === undefined ? "" : ` / ${blocks}`} · ` +
    `${snapshot.masked} masked · ${rate(committed, seconds)} tokens/s`
}

// ---- a run -------------------------------------------------------------------------------------------

/** Enables Run or Stop; keyboard focus moves along, since a disabled button loses it. */
const setRunning = (running) => {
  const [from, to] = running ? [runButton, stopButton] : [stopButton, runButton]
  const hadFocus = document.activeElement === from
  to.disabled = false
  if (hadFocus) to.focus()
  from.disabled = true
  form.setAttribute("aria-busy", String(running))
}

const showError = (message) => {
  errorBox.textContent = `Error: ${message}`
}

const run = async () => {
  if (current !== null) return
  if (prompt.value.trim() === "") {
    showError("write a prompt first")
    prompt.focus()
    return
  }
  const chat = chatMode.checked
  const body = requestBody(chat)
  const headers = { "content-type": "application/json" }
  if (apiKey.value.trim() !== "") headers.authorization = `Bearer ${apiKey.value.trim()}`

  const controller = new AbortController()
  current = controller
  setRunning(true)
  errorBox.textContent = ""
  answer.textContent = ""
  canvas.replaceChildren()
  progress.textContent = "Waiting for the first step…"
  status.textContent = "Running."
  const started = performance.now()
  const seconds = () => (performance.now() - started) / 1000
  let text = ""
  let last = null
  let finishReason = null
  let usage = null
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: controller.signal
    })
    if (!response.ok) throw new Error(await httpErrorMessage(response))
    let done = false
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        done = true
        break
      }
      const chunk = JSON.parse(data)
      if (chunk.error) throw new Error(chunk.error.message)
      if (chunk.usage) usage = chunk.usage
      const choice = chunk.choices?.[0]
      if (!choice) continue
      text += chat ? choice.delta?.content || "" : choice.text || ""
      // The committed prefix is final (a committed token is never masked again), so it can be shown.
      answer.textContent = text
      if (choice.finish_reason) finishReason = choice.finish_reason
      if (choice.snapshot) {
        last = choice.snapshot
        // The block length in force (the request's, or the server's default for the model).
        drawCanvas(last, last.block_length)
        drawProgress(last, last.block_length, seconds())
      }
    }
    if (!done) throw new Error("the stream ended before [DONE]: the server may have stopped")
    const tokens = usage ? usage.completion_tokens : last ? last.canvas.length - last.masked : 0
    status.textContent =
      `Done in ${seconds().toFixed(2)} s: ${tokens} tokens, ${rate(tokens, seconds())} tokens/s` +
      (finishReason ? `, finish reason "${finishReason}".` : ".")
  } catch (error) {
    if (controller.signal.aborted) {
      status.textContent = last === null ? "Stopped before the first step." : `Stopped at step ${last.step} of ${last.total_steps}.`
    } else {
      status.textContent = "Failed."
      showError(error instanceof Error ? error.message : String(error))
    }
  } finally {
    current = null
    setRunning(false)
  }
}

const stop = () => {
  if (current !== null) current.abort()
}

// ---- wiring ------------------------------------------------------------------------------------------

apiKey.value = sessionStorage.getItem(API_KEY_ITEM) || ""
apiKey.addEventListener("input", () => {
  if (apiKey.value === "") sessionStorage.removeItem(API_KEY_ITEM)
  else sessionStorage.setItem(API_KEY_ITEM, apiKey.value)
})

form.addEventListener("submit", (event) => {
  event.preventDefault()
  if (!form.reportValidity()) return
  void run()
})
stopButton.addEventListener("click", stop)
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault()
    form.requestSubmit()
  } else if (event.key === "Escape" && current !== null) {
    event.preventDefault()
    stop()
  }
})
