/**
 * Where this package lives and what it is: the package root (found by walking up from this module, so
 * it works from src/ under tsx and from dist/ after a build), its package.json, and the embedded model.
 */
import { existsSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

export interface PackageInfo {
  readonly root: string
  readonly name: string
  readonly version: string
}

let cached: PackageInfo | undefined

/** The nearest package.json named "vdiff" above this module. */
export const packageInfo = (): PackageInfo => {
  if (cached !== undefined) return cached
  let dir = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    const manifest = join(dir, "package.json")
    if (existsSync(manifest)) {
      const json = JSON.parse(readFileSync(manifest, "utf8")) as { name?: unknown; version?: unknown }
      if (json.name === "vdiff") {
        cached = { root: dir, name: json.name, version: typeof json.version === "string" ? json.version : "0.0.0" }
        return cached
      }
    }
    const parent = dirname(dir)
    if (parent === dir) throw new Error("vdiff: cannot find the package root (a package.json named vdiff)")
    dir = parent
  }
}

/** The model that ships with the package, used when --model is not given. */
export const embeddedModelDir = (): string => join(packageInfo().root, "models", "shakespeare")
