import { mkdtemp, readFile, rm, writeFile, copyFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Either, Option } from "effect"
import * as fc from "fast-check"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { IncrementalDetokenizer } from "../src/tokenizer/IncrementalDetokenizer.js"
import { type TokenizerShape, make } from "../src/tokenizer/Tokenizer.js"

// The embedded model: its own byte-level BPE (tools/train/bpe.py), trained on ASCII Shakespeare, so every
// non-ASCII character is split into one-byte tokens — the hard case for streaming.
const modelDir = join(import.meta.dirname, "..", "models", "shakespeare")

let tokenizer: TokenizerShape
let modelConfig: Record<string, number>
beforeAll(async () => {
  tokenizer = await Effect.runPromise(make(modelDir))
  modelConfig = JSON.parse(await readFile(join(modelDir, "config.json"), "utf8"))
})

const samples = {
  ascii: "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  Tabs\tand  double  spaces; 'tis 1592!",
  multiByte: "naïve café — Straße, Ελληνικά, русский, 日本語のテキスト, ½ ≠ ∞",
  emoji: "Hark 👋🏽! A family 👨‍👩‍👧 under the 🇬🇧 flag 🎭🗡️",
  specials: "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWho art thou?<|eot_id|><|endoftext|>"
}

describe("Tokenizer of the embedded model", () => {
  it("resolves the special tokens from config.json and tokenizer_config.json", () => {
    const s = tokenizer.specialTokens
    expect(s.mask).toBe(modelConfig["mask_token_id"])
    expect(s.eos).toBe(modelConfig["eos_token_id"])
    expect(tokenizer.tokenId("<|mdm_mask|>")).toEqual(Option.some(s.mask))
    expect(tokenizer.tokenId("<|endoftext|>")).toEqual(Option.some(s.eos))
    expect(s.bos).toEqual(tokenizer.tokenId("<|startoftext|>"))
    expect(s.eot).toEqual(tokenizer.tokenId("<|eot_id|>"))
    expect(Option.isSome(s.bos) && Option.isSome(s.eot)).toBe(true)
    expect(s.pad).toBe(s.eos) // LLaDA pads with EOS
    expect(tokenizer.vocabSize).toBe(modelConfig["vocab_size"])
  })

  for (const [name, text] of Object.entries(samples)) {
    it(`round-trips ${name} text`, () => {
      const ids = tokenizer.encode(text, { addSpecialTokens: false })
      expect(ids.every((id) => Number.isInteger(id) && id >= 0 && id < tokenizer.vocabSize)).toBe(true)
      expect(tokenizer.decode(ids)).toBe(text)
    })
  }

  it("encodes special tokens as single ids, and can skip them when decoding", () => {
    const ids = tokenizer.encode(samples.specials, { addSpecialTokens: false })
    const s = tokenizer.specialTokens
    const id = (t: string) => Option.getOrThrow(tokenizer.tokenId(t))
    expect(ids[0]).toBe(Option.getOrThrow(s.bos))
    expect(ids[1]).toBe(id("<|start_header_id|>"))
    expect(ids.slice(-2)).toEqual([Option.getOrThrow(s.eot), s.eos])
    expect(ids.filter((i) => i >= id("<|startoftext|>")).length).toBe(5)
    expect(tokenizer.decode(ids, { skipSpecialTokens: true })).toBe("user\n\nWho art thou?")
  })

  it("puts BOS first only when asked for special tokens", () => {
    const bos = Option.getOrThrow(tokenizer.specialTokens.bos)
    const plain = tokenizer.encode("To be, or not to be", { addSpecialTokens: false })
    expect(tokenizer.encode("To be, or not to be")).toEqual([bos, ...plain])
    expect(plain).not.toContain(bos)
  })

  it("decodes ids the tokenizer does not know to nothing", () => {
    const ids = tokenizer.encode("Romeo", { addSpecialTokens: false })
    expect(tokenizer.decode([...ids, tokenizer.vocabSize + 5, -1])).toBe("Romeo")
    expect(tokenizer.decode([])).toBe("")
  })

  it("round-trips arbitrary Unicode strings", () => {
    fc.assert(
      fc.property(fc.string({ unit: "grapheme", maxLength: 40 }), (text) => {
        expect(tokenizer.decode(tokenizer.encode(text, { addSpecialTokens: false }))).toBe(text)
      }),
      { numRuns: 300 }
    )
  })
})

/** Feeds ids one at a time; returns every delta and the flush. */
const stream = (detokenizer: IncrementalDetokenizer, ids: ReadonlyArray<number>) => {
  const deltas = ids.map((id) => detokenizer.push(id))
  return { deltas, rest: detokenizer.flush() }
}

describe("IncrementalDetokenizer", () => {
  for (const [name, text] of Object.entries(samples)) {
    it(`streams ${name} text one token at a time exactly as the full decode`, () => {
      const ids = tokenizer.encode(text, { addSpecialTokens: false })
      const { deltas, rest } = stream(tokenizer.detokenizer(), ids)
      expect(deltas.join("") + rest).toBe(tokenizer.decode(ids))
      expect(rest).toBe("") // the text ends with a complete character: nothing is left for flush
      for (const delta of deltas) expect(delta).not.toContain("\uFFFD")
    })
  }

  it("holds back the bytes of a split character until it completes", () => {
    const ids = tokenizer.encode("🎭", { addSpecialTokens: false })
    expect(ids.length).toBe(4) // four UTF-8 bytes, one token each
    const { deltas } = stream(tokenizer.detokenizer(), ids)
    expect(deltas).toEqual(["", "", "", "🎭"])
  })

  it("skips special tokens when asked, as the full decode does", () => {
    const ids = tokenizer.encode(samples.specials, { addSpecialTokens: false })
    const { deltas, rest } = stream(tokenizer.detokenizer({ skipSpecialTokens: true }), ids)
    expect(deltas.join("") + rest).toBe(tokenizer.decode(ids, { skipSpecialTokens: true }))
  })

  it("releases an unfinished character on flush, as the full decode renders it", () => {
    const ids = tokenizer.encode("ok 🎭", { addSpecialTokens: false }).slice(0, -1) // drop the last byte
    const { deltas, rest } = stream(tokenizer.detokenizer(), ids)
    expect(deltas.join("")).toBe("ok ")
    expect(rest).toBe("\uFFFD")
    expect(deltas.join("") + rest).toBe(tokenizer.decode(ids))
  })

  it("agrees with the full decode when tokens arrive in chunks of varying size", () => {
    // A denoising step may commit several tokens at once.
    fc.assert(
      fc.property(
        fc.string({ unit: "grapheme", maxLength: 30 }),
        fc.array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 8 }),
        (text, chunkSizes) => {
          const ids = tokenizer.encode(text, { addSpecialTokens: false })
          const detokenizer = tokenizer.detokenizer()
          let out = ""
          for (let at = 0, k = 0; at < ids.length; k++) {
            const size = chunkSizes[k % chunkSizes.length]!
            out += detokenizer.pushAll(ids.slice(at, at + size))
            at += size
          }
          expect(out + detokenizer.flush()).toBe(text)
        }
      ),
      { numRuns: 300 }
    )
  })
})

describe("loading errors", () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "vdiff-tokenizer-"))
  })
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it("fails with TokenizerLoadError naming a missing file", async () => {
    const result = await Effect.runPromise(Effect.either(make(join(dir, "nowhere"))))
    expect(Either.isLeft(result) && result.left._tag).toBe("TokenizerLoadError")
    expect(Either.isLeft(result) && result.left.message).toContain("tokenizer.json")
  })

  it("fails with MissingSpecialToken when no mask token is named anywhere", async () => {
    // The real tokenizer without its mask token, and a config.json without mask_token_id.
    const tokenizerJson = JSON.parse(await readFile(join(modelDir, "tokenizer.json"), "utf8"))
    tokenizerJson.added_tokens = tokenizerJson.added_tokens.filter((t: { content: string }) => t.content !== "<|mdm_mask|>")
    const tokenizerConfig = JSON.parse(await readFile(join(modelDir, "tokenizer_config.json"), "utf8"))
    delete tokenizerConfig.mask_token
    const { mask_token_id: _, ...config } = modelConfig
    await writeFile(join(dir, "tokenizer.json"), JSON.stringify(tokenizerJson))
    await writeFile(join(dir, "tokenizer_config.json"), JSON.stringify(tokenizerConfig))
    await writeFile(join(dir, "config.json"), JSON.stringify(config))
    const result = await Effect.runPromise(Effect.either(make(dir)))
    expect(Either.isLeft(result) && result.left._tag).toBe("MissingSpecialToken")
    // With mask_token_id back in config.json, the same directory loads.
    await copyFile(join(modelDir, "config.json"), join(dir, "config.json"))
    const loaded = await Effect.runPromise(make(dir))
    expect(loaded.specialTokens.mask).toBe(modelConfig["mask_token_id"])
  })
})
