/**
 * Test-only preload for `vdiff serve` children (node --expose-gc --import tsx --import this): on SIGUSR2
 * it runs a full garbage collection and reports on stderr, so a memory figure can be read on a settled
 * heap instead of wherever V8's sawtooth happens to be. It changes nothing else in the server.
 */
const gc = (globalThis as { gc?: () => void }).gc
if (gc === undefined) throw new Error("gc-on-signal needs node --expose-gc")
let collections = 0
process.on("SIGUSR2", () => {
  gc()
  process.stderr.write(`vdiff-test-gc ${++collections}\n`)
})
