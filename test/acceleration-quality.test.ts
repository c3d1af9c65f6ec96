/**
 * Approximate decoding keeps the quality of vanilla decoding on the embedded model, within a stated
 * margin, by the two measures of bench/quality.ts: the corpus-likeness of the answers and the model's own
 * masked-token loss on them. The same measure must see a real loss of quality: sampling at temperature
 * 1.5 has to fall outside the margin, or the margin would be too wide to mean anything.
 *
 * Margin: own loss at most 8% above vanilla's, corpus-word fraction at most 3 points below. Measured when
 * this was written (12 prompts, gen 64, the stage-2 model): prefix, dual and dual + threshold 0.9 within 1% and
 * 0.5 points; temperature 1.5 about +40% and -11 points. On the stage-5 model (vocabulary 8192, 2026-12-06) the
 * same 12 prompts give prefix +4.1%, dual and dual + 0.9 +5.0%, temperature 1.5 +92% and -3.3 points, while 48
 * prompts of gen 128 give prefix +0.7% and dual +0.0%: on 12 short answers a few tokens move the figure by
 * several percent, so the margin (first 5%) is 8%, still an eleventh of what the hot sampler costs.
 * bench/quality.ts prints the full comparison (README).
 */
import { describe, expect, it } from "vitest"
import { measureQuality, parseMode } from "../bench/quality.js"

const MAX_LOSS_INCREASE = 0.08
const MAX_CORPUS_DROP = 0.03

const withinMargin = (m: { ownLoss: number; corpusWordFraction: number }, vanilla: typeof m) =>
  m.ownLoss <= vanilla.ownLoss * (1 + MAX_LOSS_INCREASE) && m.corpusWordFraction >= vanilla.corpusWordFraction - MAX_CORPUS_DROP

describe("quality of approximate decoding on the embedded model", () => {
  it("prefix, dual and dual + threshold 0.9 stay within the margin of vanilla; a hot sampler does not", async () => {
    const report = await measureQuality({
      prompts: 12,
      genLength: 64,
      blockLength: 32,
      promptTokens: 32,
      threads: 2,
      modes: ["none", "prefix", "dual", "dual+0.9", "hot1.5"].map(parseMode)
    })
    const [vanilla, ...others] = report.modes
    // Vanilla writes corpus-like text the model finds likely (a uniform guess would be ln 2048 = 7.6).
    expect(vanilla!.corpusWordFraction).toBeGreaterThan(0.9)
    expect(vanilla!.ownLoss).toBeLessThan(Math.log(2048) / 2)
    expect(vanilla!.words).toBeGreaterThan(12 * 20)
    for (const m of others) {
      const inside = withinMargin(m, vanilla!)
      const figures =
        `${m.mode.name}: own loss ${m.ownLoss.toFixed(3)} vs ${vanilla!.ownLoss.toFixed(3)}, corpus ` +
        `${m.corpusWordFraction.toFixed(3)} vs ${vanilla!.corpusWordFraction.toFixed(3)}`
      expect(inside, figures).toBe(m.mode.temperature === undefined)
    }
    // The cached modes did decode differently (the comparison is not of identical answers).
    expect(others.find((m) => m.mode.name === "dual")!.agreement).toBeLessThan(1)
  }, 300_000) // 12 prompts x 4 modes on the embedded model: about 40 s on a fast core, minutes on a slow shared one
})
