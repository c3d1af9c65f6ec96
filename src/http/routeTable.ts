/**
 * Which routes the server has, by method and path pattern, to tell an unknown path (404) from a known
 * path asked with the wrong method (405, with Allow), and to label metrics by route pattern rather than
 * by raw path (raw paths would let any client grow the metrics without bound).
 *
 * Patterns follow HttpRouter's: `:name` matches one segment, a trailing `*` the rest.
 *
 * @since 0.1.0
 */
import type { HttpRouter } from "@effect/platform"
import { Chunk } from "effect"

export interface RouteEntry {
  readonly method: string
  readonly path: string
}

export interface RouteMatch {
  /** The matching pattern, e.g. "/v1/models/:model". */
  readonly route: string
  /** Methods the pattern has; GET implies HEAD, as in HttpRouter. */
  readonly methods: ReadonlyArray<string>
}

const matches = (pattern: string, path: string): boolean => {
  if (pattern === "*") return true
  const want = pattern.split("/")
  const got = path.split("/")
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!
    if (w === "*" && i === want.length - 1) return true
    if (i >= got.length) return false
    if (w.startsWith(":")) {
      if (got[i] === "") return false
    } else if (w !== got[i]) return false
  }
  return want.length === got.length
}

export interface RouteTable {
  readonly find: (path: string) => RouteMatch | undefined
}

export const make = (entries: Iterable<RouteEntry>): RouteTable => {
  const byPattern = new Map<string, Set<string>>()
  for (const { method, path } of entries) {
    const methods = byPattern.get(path) ?? new Set<string>()
    if (method === "*") for (const m of ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]) methods.add(m)
    else methods.add(method)
    if (methods.has("GET")) methods.add("HEAD")
    byPattern.set(path, methods)
  }
  const patterns = [...byPattern.entries()]
  return {
    find: (path) => {
      // Exact patterns first, so "/v1/models" is not taken for "/v1/models/:model" or the other way.
      const exact = byPattern.get(path)
      if (exact !== undefined) return { route: path, methods: [...exact] }
      for (const [route, methods] of patterns) if (matches(route, path)) return { route, methods: [...methods] }
      return undefined
    }
  }
}

export const fromRouters = (...routers: ReadonlyArray<HttpRouter.HttpRouter<unknown, unknown>>): RouteTable =>
  make(routers.flatMap((router) => Chunk.toReadonlyArray(router.routes).map((r) => ({ method: r.method, path: r.path }))))
