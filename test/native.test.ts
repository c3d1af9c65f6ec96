/**
 * The native unit tests (kernels against scalar references, safetensors/config parsing, the sampler
 * against a fake model) are C++ executables built next to the addon; this runs them under `npm test`.
 */
import { execFileSync } from "node:child_process"
import { existsSync } from "node:fs"
import { join } from "node:path"
import { describe, expect, it } from "vitest"

const buildDir = join(import.meta.dirname, "..", "build", "native")

describe.each(["vdiff-native-tests", "vdiff-sampler-tests", "vdiff-cuda-tests"])("%s", (name) => {
  it("passes every check", () => {
    const binary = join(buildDir, name)
    expect(existsSync(binary), `${binary} is built by npm install`).toBe(true)
    // execFileSync throws (failing the test) on a non-zero exit; the output names the failed checks.
    const output = execFileSync(binary, [], { encoding: "utf8", timeout: 120_000, stdio: ["ignore", "pipe", "pipe"] })
    expect(output).toMatch(/\b0 failed\b|\bfailures?: 0\b|0 failures/)
    // The CUDA checks that need a GPU say so when there is none: visibly skipped, with the reason.
    const skipped = output.split("\n").find((line) => line.startsWith("SKIPPED:"))
    if (skipped !== undefined) console.log(`${name}: ${skipped}`)
  })
})
