/** vdiff's layers inside another Effect program, without the HTTP server (the README's example). */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Stream } from "effect"
import { join } from "node:path"
import * as Vdiff from "../src/index.js"

const modelDir = join(import.meta.dirname, "..", "models", "shakespeare")

describe("embedding vdiff in an Effect program", () => {
  it.live("generate and generateStream through the public layers", () =>
    Effect.gen(function* () {
      const tokenizer = yield* Vdiff.Tokenizer
      const prompt = tokenizer.encode("ROMEO:")
      const settings = { ...Vdiff.defaultSettings, genLength: 16, blockLength: 8, steps: 16 }
      const result = yield* Vdiff.generate({ prompt, settings })
      expect(result.choices[0]!.tokens).toHaveLength(16)

      const events = Chunk.toArray(yield* Stream.runCollect(Vdiff.generateCanvasStream({ prompt, settings })))
      expect(events).toHaveLength(16)
      expect(events.map((e) => e.step.stepsDone)).toEqual(Array.from({ length: 16 }, (_, i) => i + 1))
      expect(events.at(-1)!.step.finished).toBe(true)
      // One token a step: each canvas has one mask fewer than the one before.
      const mask = (yield* Vdiff.Engine).info.config.maskTokenId
      expect(events.map((e) => e.canvas.filter((t) => t === mask).length)).toEqual(Array.from({ length: 16 }, (_, i) => 15 - i))
      // The stream's last canvas is the same answer generate() gave (greedy decoding is deterministic),
      // and the tokens the steps committed, in position order, are that answer too.
      expect(events.at(-1)!.canvas).toEqual(result.choices[0]!.tokens)
      const committed = events.flatMap((e) => e.step.committed).sort((a, b) => a.position - b.position)
      expect(committed.map((c) => c.token)).toEqual(result.choices[0]!.tokens)
      expect(
        tokenizer.decode(
          committed.map((c) => c.token),
          { skipSpecialTokens: true }
        )
      ).toBe(tokenizer.decode(result.choices[0]!.tokens, { skipSpecialTokens: true }))

      const scheduler = yield* Vdiff.Scheduler
      expect((yield* scheduler.stats).requestsFinished).toBe(2)
    }).pipe(Effect.provide(Vdiff.layer({ modelDir, threads: 2 })))
  )
})
