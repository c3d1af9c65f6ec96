/**
 * README.md's Configuration table is the one `Config.settingsMarkdown()` renders from the settings'
 * schemas (src/config/Config.ts, src/config/sampling.ts): a setting added, renamed or re-documented in the
 * schema without the README following fails here. To update the README, print the table:
 *   node --import tsx -e 'import("./src/config/Config.ts").then((m) => console.log(m.settingsMarkdown()))'
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import * as Config from "../src/config/Config.js"
import * as Sampling from "../src/config/sampling.js"

const readme = readFileSync(join(import.meta.dirname, "..", "README.md"), "utf8").split("\n")

/** The Markdown table that follows the heading: its consecutive lines starting with "|". */
const tableAfter = (heading: string): string => {
  const start = readme.indexOf(heading)
  expect(start, `README.md has a "${heading}" section`).toBeGreaterThanOrEqual(0)
  const first = readme.findIndex((line, i) => i > start && line.startsWith("|"))
  const end = readme.findIndex((line, i) => i > first && !line.startsWith("|"))
  return readme.slice(first, end < 0 ? undefined : end).join("\n")
}

describe("README.md", () => {
  it("holds the Configuration table generated from the settings schema, row for row", () => {
    expect(tableAfter("## Configuration")).toBe(Config.settingsMarkdown())
  })

  it("documents every sampling setting there, under the flag derived from its request field", () => {
    const table = Config.settingsMarkdown()
    for (const field of Object.keys(Sampling.samplingSettings)) {
      const flag = "--" + field.replace(/_/g, "-")
      const env = "VDIFF_" + field.toUpperCase()
      expect(
        table.split("\n").some((row) => row.startsWith(`| \`${flag}`) && row.includes(`\`${env}\``)),
        flag
      ).toBe(true)
    }
  })
})
