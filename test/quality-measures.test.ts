/**
 * The degenerate-text measures of bench/quality.ts (issue 19's targets for the embedded model): the
 * longest run of one token in a row, and distinct-2; and the words an answer is judged by.
 */
import { describe, expect, it } from "vitest"
import { mkdtemp, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { answerWords, distinct2, longestRun, parseMode, servedMode } from "../bench/quality.js"

describe("bench/quality.ts measures", () => {
  it("longestRun counts the most times one token stands in a row, per answer", () => {
    expect(longestRun([[1, 2, 3]])).toBe(1)
    expect(longestRun([[5, 5, 5, 2, 5, 5]])).toBe(3)
    // Runs do not continue from one answer into the next.
    expect(
      longestRun([
        [7, 7],
        [7, 7, 1]
      ])
    ).toBe(2)
    expect(longestRun([[], [4]])).toBe(1)
    expect(longestRun([])).toBe(0)
  })

  it("distinct2 is distinct bigrams over all bigrams, without bigrams across answers", () => {
    expect(distinct2([[1, 2, 3, 4]])).toBe(1)
    // "sir, sir, sir": (1,1) three times among four bigrams.
    expect(distinct2([[1, 1, 1, 1, 2]])).toBe(2 / 4)
    // The same bigram in two answers counts once; (2,3) never forms across the boundary.
    expect(
      distinct2([
        [1, 2],
        [3, 1, 2]
      ])
    ).toBe(2 / 3)
    expect(distinct2([[9]])).toBe(0)
    // Words too: "my lord, my lord" has bigrams (my,lord) twice and (lord,my) once.
    expect(distinct2([["my", "lord", "my", "lord"]])).toBe(2 / 3)
  })

  it("parseMode reads each sampling option after the cache and threshold", () => {
    expect(parseMode("dual+0.9:t0.8:m0.05:b8:cfg2")).toEqual({
      name: "dual+0.9:t0.8:m0.05:b8:cfg2",
      kvCache: "dual",
      parallelThreshold: 0.9,
      temperature: 0.8,
      minP: 0.05,
      blockLength: 8,
      cfgScale: 2
    })
    expect(() => parseMode("none:cfg")).toThrow(/unknown option "cfg"/)
  })

  it("answerWords judges a word the prompt's cut splits as one word, and skips one the canvas end cuts", () => {
    // The prompt ends inside "Britain": the answer's "ain" is the rest of it.
    expect(answerWords("Now, for Brit", "ain's sake, my lord")).toEqual(["britain", "s", "sake", "my", "lord"])
    // A prompt that ends at a word's end, or an answer that starts with a space, splits nothing.
    expect(answerWords("Now, for England", " and my lord")).toEqual(["and", "my", "lord"])
    expect(answerWords("KING:\n", "Ay, sir")).toEqual(["ay", "sir"])
    expect(answerWords("", "Ay")).toEqual(["ay"])
    // An answer the canvas cut inside a word ("hort" of "short"): that word is not judged...
    expect(answerWords("KING:\n", "Ay, sir, in hort", true)).toEqual(["ay", "sir", "in"])
    // ...but one that ended, or whose last piece is not a letter, is judged whole.
    expect(answerWords("KING:\n", "Ay, sir, in hort", false)).toEqual(["ay", "sir", "in", "hort"])
    expect(answerWords("KING:\n", "Ay, sir.", true)).toEqual(["ay", "sir"])
  })

  it("the mode 'served' is the server's defaults under the model's generation_config.json", async () => {
    const dir = await mkdtemp(join(tmpdir(), "vdiff-quality-"))
    // No file: the server's own defaults (greedy, no cache, no threshold, the run's block).
    expect(servedMode(dir)).toEqual({ name: "served", kvCache: "none", parallelThreshold: 0 })
    await writeFile(join(dir, "generation_config.json"), JSON.stringify({ temperature: 1.2, min_p: 0.2, block_length: 8, eos_token_id: 3 }))
    expect(servedMode(dir)).toEqual({ ...parseMode("none:t1.2:m0.2:b8"), name: "served" })
    // A value the server would refuse fails here too, and a setting the bench cannot reproduce is named.
    await writeFile(join(dir, "generation_config.json"), JSON.stringify({ temperature: -1 }))
    expect(() => servedMode(dir)).toThrow(/generation_config.json/)
    await writeFile(join(dir, "generation_config.json"), JSON.stringify({ diffusion_steps: 64 }))
    expect(() => servedMode(dir)).toThrow(/does not model diffusion_steps/)
    await writeFile(join(dir, "generation_config.json"), JSON.stringify({ cfg_scale: 1.5 }))
    expect(servedMode(dir)).toEqual({ ...parseMode("none:cfg1.5"), name: "served" })
  })
})
