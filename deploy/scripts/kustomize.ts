/**
 * Renders deploy/kubernetes without a kustomize binary: the subset of kustomize that these manifests use —
 * `resources` (YAML files, or directories with their own kustomization.yaml), `patches` (RFC 6902 JSON
 * patches with a kind/name target) and `images` (newName / newTag / digest on every `containers` and
 * `initContainers` entry, wherever they sit, as kustomize does). A kustomization with any other field is
 * refused, so this can never silently render something kustomize would not. test/deploy-manifests.test.ts
 * checks the result against `kubectl kustomize` where kubectl is installed.
 *
 *   node --import tsx deploy/scripts/kustomize.ts deploy/kubernetes/overlays/gpu     (YAML on stdout)
 */
import { existsSync, readFileSync, statSync } from "node:fs"
import { join, resolve } from "node:path"
import { parseAllDocuments, parse as parseYaml, stringify } from "yaml"

export interface Manifest {
  readonly apiVersion: string
  readonly kind: string
  readonly metadata: { readonly name: string; readonly namespace?: string; readonly [key: string]: unknown }
  readonly [key: string]: unknown
}

interface Patch {
  readonly path: string
  readonly target: { readonly kind: string; readonly name: string }
}

interface Image {
  readonly name: string
  readonly newName?: string
  readonly newTag?: string
  readonly digest?: string
}

interface Kustomization {
  readonly apiVersion?: string
  readonly kind?: string
  readonly resources?: ReadonlyArray<string>
  readonly patches?: ReadonlyArray<Patch>
  readonly images?: ReadonlyArray<Image>
}

const known = new Set(["apiVersion", "kind", "resources", "patches", "images"])

type Json = null | boolean | number | string | Array<Json> | { [key: string]: Json }

export interface Operation {
  readonly op: "add" | "remove" | "replace" | "test"
  readonly path: string
  readonly value?: Json
}

const fail = (message: string): never => {
  throw new Error(message)
}

/** RFC 6901: "/a/b~1c" → ["a", "b/c"]. */
const pointer = (path: string): Array<string> =>
  path === ""
    ? []
    : path.startsWith("/")
      ? path
          .slice(1)
          .split("/")
          .map((part) => part.replace(/~1/g, "/").replace(/~0/g, "~"))
      : fail(`bad JSON pointer ${path}`)

const isObject = (value: unknown): value is Record<string, Json> => typeof value === "object" && value !== null && !Array.isArray(value)

/** Applies RFC 6902 operations to a copy of `document`. */
export const applyJsonPatch = <A>(document: A, operations: ReadonlyArray<Operation>): A => {
  let root = structuredClone(document) as Json
  for (const operation of operations) {
    const parts = pointer(operation.path)
    if (parts.length === 0) {
      if (operation.op === "replace" || operation.op === "add") root = structuredClone(operation.value!)
      else fail(`${operation.op} of the whole document`)
      continue
    }
    let parent: Json = root
    for (const part of parts.slice(0, -1)) {
      const next: Json | undefined = Array.isArray(parent) ? parent[Number(part)] : isObject(parent) ? parent[part] : undefined
      if (next === undefined) fail(`${operation.op} ${operation.path}: ${part} does not exist`)
      parent = next!
    }
    const last = parts.at(-1)!
    if (Array.isArray(parent)) {
      const index = last === "-" ? parent.length : Number(last)
      if (!Number.isInteger(index) || index < 0 || index > parent.length) fail(`${operation.op} ${operation.path}: index out of range`)
      const exists = index < parent.length
      switch (operation.op) {
        case "add":
          parent.splice(index, 0, structuredClone(operation.value!))
          break
        case "remove":
          if (!exists) fail(`remove ${operation.path}: nothing there`)
          parent.splice(index, 1)
          break
        case "replace":
          if (!exists) fail(`replace ${operation.path}: nothing there`)
          parent[index] = structuredClone(operation.value!)
          break
        case "test":
          if (JSON.stringify(parent[index]) !== JSON.stringify(operation.value)) fail(`test ${operation.path} failed`)
          break
      }
    } else if (isObject(parent)) {
      const exists = Object.hasOwn(parent, last)
      switch (operation.op) {
        case "add":
          parent[last] = structuredClone(operation.value!)
          break
        case "remove":
          if (!exists) fail(`remove ${operation.path}: nothing there`)
          delete parent[last]
          break
        case "replace":
          if (!exists) fail(`replace ${operation.path}: nothing there`)
          parent[last] = structuredClone(operation.value!)
          break
        case "test":
          if (JSON.stringify(parent[last]) !== JSON.stringify(operation.value)) fail(`test ${operation.path} failed`)
          break
      }
    } else {
      fail(`${operation.op} ${operation.path}: the parent is not an object or array`)
    }
  }
  return root as A
}

/** `vdiff`, `vdiff:cpu`, `registry:5000/vdiff:cpu`, `vdiff@sha256:…` → the name without tag or digest. */
const imageName = (image: string): string => {
  const withoutDigest = image.split("@")[0]!
  const slash = withoutDigest.lastIndexOf("/")
  const colon = withoutDigest.lastIndexOf(":")
  return colon > slash ? withoutDigest.slice(0, colon) : withoutDigest
}

const retag = (image: string, rule: Image): string => {
  const name = rule.newName ?? imageName(image)
  if (rule.digest !== undefined) return `${name}@${rule.digest}`
  const tag = rule.newTag ?? (image.includes("@") ? undefined : image.slice(imageName(image).length + 1) || undefined)
  return tag === undefined ? name : `${name}:${tag}`
}

/** Every `containers` / `initContainers` list anywhere in the object gets the image rules. */
const setImages = (node: Json, rules: ReadonlyArray<Image>): void => {
  if (Array.isArray(node)) {
    for (const item of node) setImages(item, rules)
    return
  }
  if (!isObject(node)) return
  for (const [key, value] of Object.entries(node)) {
    if ((key === "containers" || key === "initContainers") && Array.isArray(value)) {
      for (const container of value) {
        if (!isObject(container) || typeof container["image"] !== "string") continue
        const rule = rules.find((r) => r.name === imageName(container["image"] as string))
        if (rule !== undefined) container["image"] = retag(container["image"] as string, rule)
      }
    }
    setImages(value, rules)
  }
}

const kustomizationFile = (dir: string): string => {
  for (const name of ["kustomization.yaml", "kustomization.yml", "Kustomization"]) {
    if (existsSync(join(dir, name))) return join(dir, name)
  }
  return fail(`${dir}: no kustomization.yaml`)
}

const readManifests = (file: string): Array<Manifest> =>
  parseAllDocuments(readFileSync(file, "utf8")).flatMap((document) => {
    if (document.errors.length > 0) fail(`${file}: ${document.errors[0]!.message}`)
    const value = document.toJS() as Manifest | null
    if (value === null) return []
    if (typeof value.apiVersion !== "string" || typeof value.kind !== "string" || typeof value.metadata?.name !== "string") {
      fail(`${file}: a manifest needs apiVersion, kind and metadata.name`)
    }
    return [value]
  })

const identity = (manifest: Manifest) => `${manifest.kind}/${manifest.metadata.namespace ?? ""}/${manifest.metadata.name}`

/** The manifests a kustomization directory renders to, in the order of its resources. */
export const render = (directory: string): Array<Manifest> => {
  const dir = resolve(directory)
  const file = kustomizationFile(dir)
  const kustomization = (parseYaml(readFileSync(file, "utf8")) ?? {}) as Kustomization
  for (const key of Object.keys(kustomization)) if (!known.has(key)) fail(`${file}: ${key} is not supported by this renderer`)
  let manifests: Array<Manifest> = []
  for (const entry of kustomization.resources ?? []) {
    const path = join(dir, entry)
    manifests.push(...(statSync(path).isDirectory() ? render(path) : readManifests(path)))
  }
  const seen = new Set<string>()
  for (const manifest of manifests) {
    if (seen.has(identity(manifest))) fail(`${file}: ${identity(manifest)} twice`)
    seen.add(identity(manifest))
  }
  for (const patch of kustomization.patches ?? []) {
    const operations = parseYaml(readFileSync(join(dir, patch.path), "utf8")) as ReadonlyArray<Operation>
    if (!Array.isArray(operations)) fail(`${patch.path}: only JSON 6902 patches (a list of operations) are supported`)
    let matched = 0
    manifests = manifests.map((manifest) => {
      if (manifest.kind !== patch.target.kind || manifest.metadata.name !== patch.target.name) return manifest
      matched++
      return applyJsonPatch(manifest, operations)
    })
    if (matched === 0) fail(`${file}: patch ${patch.path} matches no resource`)
  }
  if (kustomization.images !== undefined) for (const manifest of manifests) setImages(manifest as unknown as Json, kustomization.images)
  return manifests
}

/** As `kubectl kustomize` prints it: documents separated by `---`. */
export const renderYaml = (directory: string): string =>
  render(directory)
    .map((manifest) => stringify(manifest))
    .join("---\n")

const isMain = process.argv[1] !== undefined && import.meta.filename === resolve(process.argv[1])
if (isMain) {
  const dir = process.argv[2] ?? fail("usage: kustomize.ts DIR")
  process.stdout.write(renderYaml(dir))
}
