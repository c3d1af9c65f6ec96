/**
 * NativeEngine.score: the model's log-probability of given tokens at given canvas positions. Checked
 * against the PyTorch reference through the golden fixtures: at a case's first step the canvas is the
 * prompt followed by masks, and the reference recorded the softmax probability of every token that step
 * committed, so exp(score) of those tokens there must be those probabilities: within 1e-5, or 1e-2 for
 * the bf16 model, whose activations are rounded to bf16 before each product on both sides (the reason is in
 * test/golden.test.ts).
 */
import { join } from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type NativeEngine, loadAddon } from "../src/engine/native.js"
import { goldenCases, goldenDir } from "./support/golden.js"

const models = ["plain", "gqa", "odd", "bf16", "f16"]
const tolerance = (model: string) => (model === "bf16" ? 1e-2 : 1e-5)
const engines = new Map<string, NativeEngine>()

beforeAll(async () => {
  for (const model of models) engines.set(model, await loadAddon().loadModel(join(goldenDir, model), { threads: 2 }))
})
afterAll(() => engines.clear())

describe("NativeEngine.score", () => {
  for (const model of models) {
    it(`${model}: gives the reference's probabilities of the first step's commits`, async () => {
      const engine = engines.get(model)!
      const mask = engine.info().config.maskTokenId
      // Cases whose recorded probability is the plain softmax (no cfg, no EOS rules).
      const cases = goldenCases(model).filter(
        (c) =>
          c.params.cfg_scale === 0 &&
          c.params.temperature === 0 &&
          !c.params.logits_eos_inf &&
          !c.params.confidence_eos_eot_inf &&
          c.params.remasking === "low_confidence"
      )
      expect(cases.length).toBeGreaterThan(0)
      let checked = 0
      for (const c of cases) {
        const canvas = [...c.prompt, ...new Array<number>(c.params.gen_length).fill(mask)]
        const first = c.trace[0]!
        const positions = first.map(([position]) => c.prompt.length + position)
        const scores = await engine.score(
          canvas,
          positions,
          first.map(([, token]) => token)
        )
        expect(scores.length).toBe(first.length)
        first.forEach(([, , probability], i) => {
          expect(Math.abs(Math.exp(scores[i]!) - probability), `${c.name} position ${positions[i]}`).toBeLessThan(tolerance(model))
        })
        checked += first.length
      }
      expect(checked).toBeGreaterThan(0)
    })
  }

  it("scores every listed position in one forward: log-probabilities over the vocabulary sum to 1", async () => {
    const engine = engines.get("plain")!
    const { vocabSize, embeddingSize, maskTokenId } = engine.info().config
    expect(vocabSize).toBe(embeddingSize) // no head padding: the vocabulary is the whole row
    const canvas = [1, 2, maskTokenId, 3, maskTokenId]
    const everyToken = Array.from({ length: vocabSize }, (_, v) => v)
    for (const position of [2, 4, 0]) {
      const scores = await engine.score(
        canvas,
        everyToken.map(() => position),
        everyToken
      )
      expect(scores.every((s) => s <= 0)).toBe(true)
      expect(scores.reduce((sum, s) => sum + Math.exp(s), 0)).toBeCloseTo(1, 9)
    }
    expect(await engine.score(canvas, [], [])).toEqual(new Float64Array())
  })

  it("rejects bad input with VDIFF_INVALID_ARGUMENT naming what is wrong", async () => {
    const engine = engines.get("plain")!
    const { vocabSize, embeddingSize, maxSequenceLength } = engine.info().config
    const canvas = [1, 2, 3]
    const cases: Array<[() => Promise<unknown>, RegExp]> = [
      [() => engine.score(canvas, [3], [1]), /positions\[0\] = 3 is outside the canvas/],
      [() => engine.score(canvas, [0, 1], [1]), /2 positions but 1 targets/],
      [() => engine.score(canvas, [0], [vocabSize]), /targets\[0\].*outside the vocabulary/],
      [() => engine.score([1, embeddingSize], [0], [1]), /canvas\[1\].*is not a token id/],
      [() => engine.score([], [], []), /1 to \d+ tokens, got 0/],
      [() => engine.score(new Array<number>(maxSequenceLength + 1).fill(1), [0], [1]), /got \d+/]
    ]
    for (const [score, message] of cases) {
      await expect(score()).rejects.toMatchObject({ code: "VDIFF_INVALID_ARGUMENT", message: expect.stringMatching(message) })
    }
  })
})
