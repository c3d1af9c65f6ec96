import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // The native engine uses both cores of these machines; one test file at a time keeps timings sane.
    fileParallelism: false
  }
})
