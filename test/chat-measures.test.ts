/**
 * The measures of bench/chat.ts (issue 19's "replies that answer the line"): which words a reply takes up
 * from the line, the play's exchanges, and how replies are judged.
 */
import { describe, expect, it } from "vitest"
import { frequentWords, heldOutExchanges, judgeReplies, speeches, takesUp } from "../bench/chat.js"

describe("bench/chat.ts measures", () => {
  it("speeches are the NAME: blocks of the play, in order", () => {
    const text = "First Citizen:\nBefore we proceed,\nhear me.\n\nAll:\nSpeak, speak.\n\nnot a speech\n\nMENENIUS:\nWhy?\n"
    expect(speeches(text)).toEqual([
      ["First Citizen", "Before we proceed,\nhear me."],
      ["All", "Speak, speak."],
      ["MENENIUS", "Why?"]
    ])
  })

  it("frequentWords keeps the most frequent words, ties in order of first appearance", () => {
    expect([...frequentWords("b a b c a b d", 2)]).toEqual(["b", "a"])
    // c and d tie at one each: c came first.
    expect([...frequentWords("b a b c a b d", 3)]).toEqual(["b", "a", "c"])
  })

  it("takesUp looks for a shared word outside the frequent ones", () => {
    const frequent = new Set(["let", "it", "the", "my", "lord"])
    expect(takesUp("Well, let it strike.", "Why let it strike?", frequent)).toBe(true)
    // Only frequent words shared.
    expect(takesUp("Well, let it be.", "Let it, my lord.", frequent)).toBe(false)
    // Words are whole and case-blind: "strikes" is not "strike", "STRIKE" is.
    expect(takesUp("strike", "It strikes.", frequent)).toBe(false)
    expect(takesUp("strike", "STRIKE!", frequent)).toBe(true)
  })

  it("judgeReplies scores each reply against its own line and against the next exchange's", () => {
    const exchanges = [
      { line: "Where is the king?", reply: "" },
      { line: "What news from Rome?", reply: "" }
    ]
    const judged = judgeReplies(
      exchanges,
      [
        { text: "The king is at Rome.", closed: true },
        { text: "Good news, sir.", closed: false }
      ],
      new Set(["the", "is", "at", "sir"]),
      new Set(["the", "king", "is", "at", "good", "news", "sir"])
    )
    expect(judged.closed).toBe(0.5)
    // Reply 0 takes up "king"; reply 1 takes up "news".
    expect(judged.takesUp).toBe(1)
    // Against the other line: reply 0 has "rome" (line 1's), reply 1 nothing of line 0.
    expect(judged.takesUpOther).toBe(0.5)
    // "rome" is not a corpus word here: 7 of 8 words.
    expect(judged.corpusWordFraction).toBe(7 / 8)
    expect(judged.meanWords).toBe(4)
  })

  it("heldOutExchanges draws pairs of different speakers from the held-out tenth only", () => {
    const train = Array.from({ length: 90 }, (_, i) => `A:\ntrain line ${i}\n\nB:\ntrain reply ${i}`).join("\n\n")
    const heldOut = "X:\nWhere art thou?\n\nX:\nStill here.\n\nY:\nHere, my lord.\n\nZ:\nGo.\n"
    const corpus = `${train}\n\n${heldOut.padEnd(train.length / 9, " ")}`
    const exchanges = heldOutExchanges(corpus, 2)
    expect(exchanges).toEqual([
      { line: "Still here.", reply: "Here, my lord." },
      { line: "Here, my lord.", reply: "Go." }
    ])
    expect(() => heldOutExchanges(corpus, 3)).toThrow(/only 2 exchanges/)
  })
})
