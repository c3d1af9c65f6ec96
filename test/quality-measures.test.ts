/**
 * The degenerate-text measures of bench/quality.ts (issue 19's targets for the embedded model): the
 * longest run of one token in a row, and distinct-2.
 */
import { describe, expect, it } from "vitest"
import { distinct2, longestRun } from "../bench/quality.js"

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
})
