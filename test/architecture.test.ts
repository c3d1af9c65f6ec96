/**
 * The architecture as a test: the top-level folders of src/ (api, http, openai, scheduler, ...) may depend
 * on one another only one way. The test reads every .ts file under src/, takes the module specifiers of
 * its imports, `export ... from` and dynamic `import()` (type-only imports count: they are a dependency of
 * the source, if not of the build), and fails on any cycle between folders, printing it with one import
 * line for each of its edges. Files directly in src/ (index.ts, main.ts) are the composition root and may
 * import anything; nothing imports them.
 */
import { readdirSync, readFileSync } from "node:fs"
import { dirname, join, relative, resolve, sep } from "node:path"
import ts from "typescript"
import { describe, expect, it } from "vitest"

const srcDir = resolve(import.meta.dirname, "..", "src")

const sourceFiles = (dir: string): Array<string> =>
  readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name)
    if (entry.isDirectory()) return sourceFiles(path)
    return entry.name.endsWith(".ts") ? [path] : []
  })

/** The folder of src/ a file belongs to, or undefined for the composition root (files directly in src/). */
const folderOf = (file: string): string | undefined => {
  const parts = relative(srcDir, file).split(sep)
  return parts.length > 1 ? parts[0] : undefined
}

/** Every relative module specifier a file imports or re-exports, static or dynamic, type-only or not. */
const specifiersOf = (source: string): Array<string> =>
  ts
    .preProcessFile(source, true, true)
    .importedFiles.map((f) => f.fileName)
    .filter((s) => s.startsWith("."))

interface Edge {
  readonly from: string
  readonly to: string
  /** Where the dependency is written: "src/http/auth.ts imports ../api/errors.js". */
  readonly witness: string
}

/** The edges between distinct folders of src/, one per (from, to) pair, with the first import seen. */
const folderGraph = (files: ReadonlyArray<string>): Map<string, Map<string, Edge>> => {
  const graph = new Map<string, Map<string, Edge>>()
  for (const file of files) {
    const from = folderOf(file)
    if (from === undefined) continue
    for (const specifier of specifiersOf(readFileSync(file, "utf8"))) {
      const target = resolve(dirname(file), specifier)
      if (!target.startsWith(srcDir + sep)) continue
      const to = folderOf(target)
      if (to === undefined || to === from) continue
      const edges = graph.get(from) ?? new Map<string, Edge>()
      graph.set(from, edges)
      if (!edges.has(to)) {
        edges.set(to, { from, to, witness: `src/${relative(srcDir, file)} imports ${specifier}` })
      }
    }
  }
  return graph
}

/** The cycles of the graph: one per strongly connected component of more than one folder (Tarjan). */
const cyclesOf = (graph: Map<string, Map<string, Edge>>): Array<Array<Edge>> => {
  const index = new Map<string, number>()
  const low = new Map<string, number>()
  const stack: Array<string> = []
  const onStack = new Set<string>()
  const components: Array<Array<string>> = []
  const nodes = new Set([...graph.keys(), ...[...graph.values()].flatMap((edges) => [...edges.keys()])])
  const visit = (node: string) => {
    index.set(node, index.size)
    low.set(node, index.get(node)!)
    stack.push(node)
    onStack.add(node)
    for (const next of graph.get(node)?.keys() ?? []) {
      if (!index.has(next)) {
        visit(next)
        low.set(node, Math.min(low.get(node)!, low.get(next)!))
      } else if (onStack.has(next)) {
        low.set(node, Math.min(low.get(node)!, index.get(next)!))
      }
    }
    if (low.get(node) === index.get(node)) {
      const component: Array<string> = []
      let member: string
      do {
        member = stack.pop()!
        onStack.delete(member)
        component.push(member)
      } while (member !== node)
      if (component.length > 1) components.push(component)
    }
  }
  for (const node of [...nodes].sort()) if (!index.has(node)) visit(node)
  // Within a component, a shortest path back to its first folder makes the cycle to print.
  return components.map((component) => {
    const members = new Set(component)
    const start = [...component].sort()[0]!
    const previous = new Map<string, Edge>()
    const queue = [start]
    for (let i = 0; i < queue.length; i++) {
      for (const edge of graph.get(queue[i]!)?.values() ?? []) {
        if (!members.has(edge.to)) continue
        if (edge.to === start) {
          const cycle = [edge]
          for (let at = edge.from; at !== start; at = previous.get(at)!.from) cycle.unshift(previous.get(at)!)
          return cycle
        }
        if (!previous.has(edge.to)) {
          previous.set(edge.to, edge)
          queue.push(edge.to)
        }
      }
    }
    throw new Error(`no cycle through ${start} in ${component.join(", ")}`)
  })
}

const describeCycle = (cycle: ReadonlyArray<Edge>): string =>
  [
    cycle
      .map((e) => e.from)
      .concat(cycle[0]!.from)
      .join(" -> "),
    ...cycle.map((e) => `  ${e.witness}`)
  ].join("\n")

describe("architecture", () => {
  it("finds imports of every kind, and cycles with their witnesses", () => {
    const source = [
      `import { a } from "../a/x.js"`,
      `import type { B } from "../b/y.js"`,
      `export { c } from "./c.js"`,
      `export * from "../d/z.js"`,
      `const e = await import("../e/w.js")`,
      `import { Effect } from "effect"`
    ].join("\n")
    expect(specifiersOf(source)).toEqual(["../a/x.js", "../b/y.js", "./c.js", "../d/z.js", "../e/w.js"])
    const edge = (from: string, to: string): Edge => ({ from, to, witness: `${from}->${to}` })
    const graph = new Map([
      ["a", new Map([["b", edge("a", "b")]])],
      [
        "b",
        new Map([
          ["c", edge("b", "c")],
          ["d", edge("b", "d")]
        ])
      ],
      ["c", new Map([["a", edge("c", "a")]])],
      ["d", new Map<string, Edge>()]
    ])
    expect(cyclesOf(graph).map((cycle) => cycle.map((e) => e.witness))).toEqual([["a->b", "b->c", "c->a"]])
    graph.get("c")!.delete("a")
    expect(cyclesOf(graph)).toEqual([])
  })

  it("has no import cycle between the folders of src/", () => {
    const files = sourceFiles(srcDir)
    expect(files.length).toBeGreaterThan(20)
    const graph = folderGraph(files)
    // The graph is read from the real sources: api is imported by both sides of the HTTP edge.
    expect(graph.get("http")?.has("api")).toBe(true)
    const cycles = cyclesOf(graph).map(describeCycle)
    expect(cycles, `import cycles between folders of src/:\n${cycles.join("\n")}`).toEqual([])
  })
})
