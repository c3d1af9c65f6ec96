import * as fc from "fast-check"
import { beforeAll, describe, expect, it } from "vitest"
import { ChoiceDecoder } from "../src/openai/ChoiceDecoder.js"
import type { TokenizerShape } from "../src/tokenizer/Tokenizer.js"
import { eotOf, tinyTokenizer } from "./openai-support.js"

let tokenizer: TokenizerShape
beforeAll(async () => {
  tokenizer = await tinyTokenizer()
})

const decoderFor = (genLength: number, stopStrings: ReadonlyArray<string> = [], stopTokens: ReadonlyArray<number> = []) =>
  new ChoiceDecoder({
    genLength,
    endTokens: new Set([tokenizer.specialTokens.eos, eotOf(tokenizer)]),
    stopTokens: new Set(stopTokens),
    stopStrings,
    detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
  })

/** Commits `answer` one step per group of positions; returns each step's delta text. */
const run = (decoder: ChoiceDecoder, answer: ReadonlyArray<number>, steps: ReadonlyArray<ReadonlyArray<number>>) =>
  steps.map((positions) => decoder.commit(positions.map((position) => ({ position, token: answer[position]!, probability: 0.5 }))).text)

const encode = (text: string) => [...tokenizer.encode(text, { addSpecialTokens: false })]
const leftToRight = (n: number) => Array.from({ length: n }, (_, i) => [i])

describe("ChoiceDecoder", () => {
  it("reads the committed prefix only, and ends at the first EOS without counting it", () => {
    const eos = tokenizer.specialTokens.eos
    const answer = [...encode("Hello world"), eos, eos]
    const decoder = decoderFor(answer.length)
    // Position 1 first: nothing is final until position 0 is committed too.
    expect(decoder.commit([{ position: 1, token: answer[1]!, probability: 0.9 }]).text).toBe("")
    const delta = decoder.commit([{ position: 0, token: answer[0]!, probability: 0.8 }])
    expect(delta).toEqual({ text: "Hello world", firstToken: 0, endToken: 2, finishReason: null })
    expect(decoder.probabilities).toEqual([Math.fround(0.8), Math.fround(0.9)])
    const end = decoder.commit([{ position: 2, token: eos, probability: 1 }])
    expect(end.finishReason).toBe("stop")
    expect(decoder.tokenIds).toEqual(answer.slice(0, 2))
    expect(decoder.text).toBe("Hello world")
  })

  it("holds back a possible stop string until it is decided", () => {
    const answer = encode("Hello world night")
    const decoder = decoderFor(answer.length, ["world day"])
    const deltas = run(decoder, answer, leftToRight(answer.length))
    // "world" could begin "world day": held until " night" shows it does not.
    expect(deltas).toEqual(["Hello", " ", "world night"])
    expect(decoder.finishReason).toBe("length")
  })

  it("cuts the text at a stop string inside a token and counts the tokens read", () => {
    const answer = encode("Hello world night the")
    const decoder = decoderFor(answer.length, ["igh"])
    expect(run(decoder, answer, leftToRight(answer.length)).join("")).toBe("Hello world n")
    expect(decoder.finishReason).toBe("stop")
    expect(decoder.tokenIds).toEqual(answer.slice(0, 3))
  })

  it("keeps the stop string in the text with include_stop_str_in_output", () => {
    const answer = encode("Hello world night the")
    const decoder = new ChoiceDecoder({
      genLength: answer.length,
      endTokens: new Set(),
      stopTokens: new Set(),
      stopStrings: ["night", "igh"],
      includeStopString: true,
      detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
    })
    // The earliest stop string ends the text, with itself.
    expect(run(decoder, answer, leftToRight(answer.length)).join("")).toBe("Hello world night")
    expect(decoder.finishReason).toBe("stop")
  })

  it("looks for stop strings only from the min_tokens-th token on", () => {
    const answer = encode("Hello world night the")
    const withMin = (minTokens: number, stopStrings = ["o"]) => {
      const decoder = new ChoiceDecoder({
        genLength: answer.length,
        endTokens: new Set([tokenizer.specialTokens.eos]),
        stopTokens: new Set(),
        stopStrings,
        minTokens,
        detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
      })
      run(decoder, answer, leftToRight(answer.length))
      return decoder
    }
    expect(withMin(0).text).toBe("Hell")
    // "o" in "Hello" and "world" (tokens 1 and 2) is passed over; the stop string is looked for from the third token on.
    const third = withMin(3)
    expect(third.text).toBe("Hello world night the")
    expect(third.finishReason).toBe("length")
    expect(withMin(2).text).toBe("Hello w")
    // One that begins before the min_tokens-th token and ends in its text counts, as in vLLM.
    expect(answer.length).toBeGreaterThanOrEqual(4)
    const across = withMin(2, ["lo w"])
    expect([across.text, across.finishReason]).toEqual(["Hel", "stop"])
    expect([withMin(3, ["lo w"]).text, withMin(3, ["lo w"]).finishReason]).toEqual(["Hello world night the", "length"])
  })

  it("ends at a stop token, which is counted but not in the text", () => {
    const answer = encode("Hello world night")
    const decoder = decoderFor(answer.length, [], [answer[1]!])
    expect(run(decoder, answer, leftToRight(answer.length)).join("")).toBe("Hello")
    expect(decoder.tokenIds).toEqual(answer.slice(0, 2))
    expect(decoder.finishReason).toBe("stop")
  })

  it("never emits part of a character split over tokens", () => {
    const answer = encode("a👋é")
    const decoder = decoderFor(answer.length)
    const deltas = run(decoder, answer, leftToRight(answer.length))
    expect(deltas).toEqual(["a", "", "", "", "👋", "", "é"])
  })

  it("adds up to the full decode cut at the first stop, in any commit order (property)", () => {
    const words = ["Hello", " world", " night", " Good", " the", " é", "👋", "ö", " x", "y", "\n"]
    const eos = tokenizer.specialTokens.eos
    fc.assert(
      fc.property(
        fc.array(fc.constantFrom(...words), { minLength: 1, maxLength: 12 }),
        fc.array(fc.constantFrom("night", "ld n", "👋", "é", "Good the", "zz", "o"), { maxLength: 2 }),
        fc.integer({ min: 1, max: 6 }),
        fc.integer({ min: 0, max: 1_000_000 }),
        fc.boolean(),
        (parts, stops, blockLength, shuffleSeed, withEos) => {
          const text = parts.join("")
          const answer = [...encode(text), ...(withEos ? [eos, eos] : [])]
          // Block by block; inside a block an arbitrary order, one or two positions per step.
          const steps: Array<Array<number>> = []
          let seed = shuffleSeed
          for (let start = 0; start < answer.length; start += blockLength) {
            const block = Array.from({ length: Math.min(blockLength, answer.length - start) }, (_, i) => start + i)
            while (block.length > 0) {
              seed = (seed * 1103515245 + 12345) % 2147483648
              steps.push(block.splice(seed % block.length, 1 + (seed % 2)))
            }
          }
          const decoder = decoderFor(answer.length, stops)
          let streamed = ""
          for (const delta of run(decoder, answer, steps)) {
            streamed += delta
            expect(delta).not.toContain("\uFFFD")
          }
          // As an autoregressive server would: the answer ends at the first token after which the text
          // holds a stop string, cut where the earliest stop string found then begins.
          const textTokens = encode(text)
          let expected = text
          let stopped = false
          for (let k = 1; k <= textTokens.length && !stopped; k++) {
            const prefix = tokenizer.decode(textTokens.slice(0, k))
            const cuts = stops.map((stop) => prefix.indexOf(stop)).filter((at) => at >= 0)
            if (cuts.length > 0) {
              expected = prefix.slice(0, Math.min(...cuts))
              stopped = true
            }
          }
          expect(streamed).toBe(expected)
          expect(decoder.text).toBe(expected)
          expect(decoder.finishReason).toBe(stopped || withEos ? "stop" : "length")
        }
      ),
      { numRuns: 1000 }
    )
  })
})
