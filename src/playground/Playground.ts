/**
 * The diffusion playground: GET / serves one self-contained HTML page that sends a prompt to the public
 * API (/v1/completions or /v1/chat/completions, streaming with stream_options.include_snapshots) and
 * draws the answer canvas after every denoising step.
 *
 * The page is written as three files beside this module — index.html, playground.css, playground.js —
 * and served as one document with the style and the script inlined. Nothing is fetched from anywhere
 * else, and the Content-Security-Policy says so: the inline style and script are allowed by their
 * SHA-256 hashes (no 'unsafe-inline'), fetch may only reach this server, and nothing else may load.
 *
 * The route is public (auth and rate limit exempt GET /): the page holds no secret; the API key a user
 * types stays in the tab's sessionStorage and goes only into the API requests' Authorization header.
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { HttpRouter, HttpServerResponse } from "@effect/platform"
import { Effect } from "effect"
import { packageInfo } from "../config/package.js"

export interface Page {
  readonly html: string
  readonly contentSecurityPolicy: string
}

const sha256 = (text: string): string => `'sha256-${createHash("sha256").update(text, "utf8").digest("base64")}'`

/**
 * Builds the page from its three parts: `css` and `js` go into the `<style>` and `<script>` elements of
 * `html` (in place of the markers), and the policy allows exactly those two.
 */
export const assemble = (parts: { readonly html: string; readonly css: string; readonly js: string }): Page => {
  // Either closing tag inside would end the element early.
  if (/<\/style/i.test(parts.css)) throw new Error("playground.css must not contain </style")
  if (/<\/script/i.test(parts.js)) throw new Error("playground.js must not contain </script")
  const fill = (html: string, marker: string, content: string) => {
    if (!html.includes(marker)) throw new Error(`index.html has no ${marker}`)
    // A replacer function, so that `$` in the content is taken literally.
    return html.replace(marker, () => content)
  }
  const html = fill(fill(parts.html, "/*PLAYGROUND_CSS*/", parts.css), "/*PLAYGROUND_JS*/", parts.js)
  const contentSecurityPolicy = [
    "default-src 'none'",
    `script-src ${sha256(parts.js)}`,
    `style-src ${sha256(parts.css)}`,
    // The empty icon (data:,) keeps the browser from asking for /favicon.ico.
    "img-src data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    // The script writes text only (textContent), never markup; the browser holds it to that.
    "require-trusted-types-for 'script'"
  ].join("; ")
  return { html, contentSecurityPolicy }
}

/** The page's source files: src/playground under the package root (present under tsx and after a build). */
export const sourceDir = (): string => join(packageInfo().root, "src", "playground")

let cached: Page | undefined

/** The page, read and assembled once. */
export const page = (): Page => {
  if (cached === undefined) {
    const read = (name: string) => readFileSync(join(sourceDir(), name), "utf8")
    cached = assemble({ html: read("index.html"), css: read("playground.css"), js: read("playground.js") })
  }
  return cached
}

/** GET / : the page, with its policy. */
export const handler = Effect.sync(() => {
  const { html, contentSecurityPolicy } = page()
  return HttpServerResponse.text(html, {
    contentType: "text/html; charset=utf-8",
    headers: {
      "content-security-policy": contentSecurityPolicy,
      "cache-control": "no-cache",
      "referrer-policy": "no-referrer"
    }
  })
})

export const router = HttpRouter.empty.pipe(HttpRouter.get("/", handler))
