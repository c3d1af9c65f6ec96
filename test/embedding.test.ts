/** vdiff's layers inside another Effect program, without the HTTP server (the README's example). */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Stream } from "effect"
import { join } from "node:path"
import * as Vdiff from "../src/index.js"

const modelDir = join(import.meta.dirname, "..", "models", "shakespeare")

describe("embedding vdiff in an Effect program", () => {
  it.live("generate and generateStream through the public layers", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Vdiff.Tokenizer
      const prompt = tokenizer.encode("ROMEO:")
      const settings = { ...Vdiff.defaultSettings, genLength: 16, blockLength: 8, steps: 16 }
      const result = yield* Vdiff.generate({ prompt, settings })
      expect(result.choices[0]!.tokens).toHaveLength(16)

      const events = Chunk.toArray(yield* Stream.runCollect(Vdiff.generateStream({ prompt, settings, snapshots: true })))
      expect(events).toHaveLength(16)
      expect(events.at(-1)!.finished).toBe(true)
      // The stream's last snapshot is the same answer generate() gave (greedy decoding is deterministic).
      expect(events.at(-1)!.canvas).toEqual(result.choices[0]!.tokens)
      const text = tokenizer.decode(result.choices[0]!.tokens, { skipSpecialTokens: true })
      expect(typeof text).toBe("string")

      const scheduler = yield* Vdiff.Scheduler
      expect((yield* scheduler.stats).requestsFinished).toBe(2)
    }).pipe(Effect.provide(Vdiff.layer({ modelDir, threads: 2 }))))
})
