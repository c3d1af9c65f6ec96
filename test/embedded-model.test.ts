/**
 * The embedded model (models/shakespeare) generates like the corpus it was trained on, through the same
 * path a LLaDA-8B checkpoint takes: tokenizer → chat template → native engine → detokenizer.
 *
 * "Corpus-like" is measured on words (maximal runs of letters, lowercased): at least 90% of the words
 * generated at temperature 0 must be words of tinyshakespeare (tools/train/corpus-words.txt lists them).
 * Why 90%: the shipped model's words are all corpus words (62 of 62 for these prompts when this was
 * written; a model gluing BPE pieces into invented words would lose a few), while the same architecture
 * with untrained weights glues fragments into non-words ("hasterayrayray", "pherpher") and scores 63%
 * (the last test checks that it fails), so 90% separates the two with room on both sides. At least 40
 * words must be generated, so a model that writes only newlines or EOS cannot pass by saying nothing
 * (the shipped model at 50 training steps wrote nothing but newlines).
 */
import { copyFile, mkdtemp, readFile, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Option } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { fromTokenizerConfig } from "../src/chat/ChatFormatter.js"
import { type NativeEngine, type NativeSamplingParams, loadAddon } from "../src/engine/native.js"
import { parseLladaConfig, uniformFill, writeModelDir } from "../src/model/makeModel.js"
import { lladaTensors } from "../src/model/presets.js"
import { tokenizerMismatch } from "../src/server/ModelHost.js"
import { type TokenizerShape, make as makeTokenizer } from "../src/tokenizer/Tokenizer.js"

const root = join(import.meta.dirname, "..")
const modelDir = join(root, "models", "shakespeare")
const MIN_CORPUS_WORD_FRACTION = 0.9
const MIN_WORDS = 40

const prompts = ["ROMEO:\n", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter of"]

const greedy: NativeSamplingParams = {
  genLength: 48,
  blockLength: 16,
  steps: 48,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed: 0
}

interface ReferenceCase {
  readonly kind: "completion" | "chat"
  readonly text: string
  readonly prompt: ReadonlyArray<number>
  readonly params: { gen_length: number; block_length: number; steps: number; eot_token_id: number }
  readonly answer: ReadonlyArray<number>
}

const words = (text: string): Array<string> => text.toLowerCase().match(/[a-z]+/g) ?? []

let corpusWords: Set<string>
let tokenizer: TokenizerShape
let engine: NativeEngine
let scratch: string

beforeAll(async () => {
  corpusWords = new Set((await readFile(join(root, "tools", "train", "corpus-words.txt"), "utf8")).split("\n"))
  tokenizer = await Effect.runPromise(makeTokenizer(modelDir))
  engine = await loadAddon().loadModel(modelDir, { threads: 2 })
  scratch = await mkdtemp(join(tmpdir(), "vdiff-embedded-"))
})
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true })
})

/** Runs one sequence to the end and returns its answer tokens. */
const generate = async (model: NativeEngine, prompt: ReadonlyArray<number>, params: NativeSamplingParams) => {
  const id = model.create(prompt, params)
  try {
    for (;;) {
      const [result] = await model.step([id])
      if (result!.finished) return Array.from(model.canvas(id))
    }
  } finally {
    model.release(id)
  }
}

/** Generated text per completion prompt, the answer decoded without special tokens. */
const completions = async (model: NativeEngine) => {
  const out: Array<string> = []
  for (const prompt of prompts) {
    const answer = await generate(model, tokenizer.encode(prompt), greedy)
    out.push(tokenizer.decode(answer, { skipSpecialTokens: true }))
  }
  return out
}

const corpusFraction = (texts: ReadonlyArray<string>) => {
  const all = texts.flatMap(words)
  return { count: all.length, fraction: all.filter((w) => corpusWords.has(w)).length / Math.max(1, all.length) }
}

describe("the embedded Shakespeare model", () => {
  it("loads with the config its tokenizer agrees with", () => {
    const config = engine.info().config
    expect(config.vocabSize).toBe(tokenizer.vocabSize)
    expect(config.maskTokenId).toBe(tokenizer.specialTokens.mask)
    expect(config.eosTokenId).toBe(tokenizer.specialTokens.eos)
    expect(tokenizerMismatch(config, tokenizer)).toBeUndefined()
    // Another model's config under this tokenizer (the `small` preset: 10,240 ids, mask 10,239) is reported.
    expect(tokenizerMismatch({ vocabSize: 10_240, maskTokenId: 10_239 }, tokenizer)).toBe(
      "its mask token is id 8188, config.json's mask_token_id 10239"
    )
    expect(tokenizerMismatch({ vocabSize: 2048, maskTokenId: 8188 }, tokenizer)).toBe(
      "it has 8192 tokens, more than the model's vocab_size 2048"
    )
  })

  it("generates deterministically at temperature 0", async () => {
    const prompt = tokenizer.encode(prompts[0]!)
    const first = await generate(engine, prompt, greedy)
    const second = await generate(engine, prompt, greedy)
    expect(second).toEqual(first)
    expect(first).not.toContain(tokenizer.specialTokens.mask)
  })

  it(`writes corpus words: at least ${MIN_CORPUS_WORD_FRACTION * 100}% of what it generates`, async () => {
    const texts = await completions(engine)
    const { count, fraction } = corpusFraction(texts)
    expect(count, JSON.stringify(texts)).toBeGreaterThanOrEqual(MIN_WORDS)
    expect(fraction, JSON.stringify(texts)).toBeGreaterThanOrEqual(MIN_CORPUS_WORD_FRACTION)
  })

  it("answers a chat turn in the corpus's words and ends the answer before the canvas does", async () => {
    const formatter = await Effect.runPromise(fromTokenizerConfig(tokenizer.tokenizerConfig))
    const rendered = await Effect.runPromise(formatter.render([{ role: "user", content: "What news from Rome, good friend?" }]))
    const eot = Option.getOrThrow(tokenizer.specialTokens.eot)
    // Short blocks: with one long block the low-confidence sampler commits the (easy) EOS padding first
    // and leaves this small model a one-word answer.
    const answer = await generate(engine, tokenizer.encode(rendered.text, { addSpecialTokens: false }), {
      ...greedy,
      genLength: 64,
      steps: 64,
      blockLength: 8,
      eotTokenId: eot
    })
    // Chat fine-tuning taught the model to close its turn with <|eot_id|> and/or EOS padding; a model
    // that only saw plain text never does.
    const end = answer.findIndex((t) => t === eot || t === tokenizer.specialTokens.eos)
    expect(end, `answer ${JSON.stringify(tokenizer.decode(answer))}`).toBeGreaterThan(0)
    const reply = tokenizer.decode(answer.slice(0, end))
    const { count, fraction } = corpusFraction([reply])
    expect(count, reply).toBeGreaterThanOrEqual(3)
    expect(fraction, reply).toBeGreaterThanOrEqual(MIN_CORPUS_WORD_FRACTION)
  })

  it("answers exactly as the PyTorch reference does (tools/reference, greedy, low-confidence remasking)", async () => {
    // Written by tools/train/reference_answers.py from this model directory; each case records its
    // decision margins (all well above float32 rounding), so exact token equality is a fair demand.
    const cases: ReadonlyArray<ReferenceCase> = JSON.parse(await readFile(join(root, "tools", "train", "reference-answers.json"), "utf8"))
    const formatter = await Effect.runPromise(fromTokenizerConfig(tokenizer.tokenizerConfig))
    expect(cases.length).toBeGreaterThanOrEqual(4)
    for (const c of cases) {
      // The prompt ids the reference used are the ones the server's tokenizer and chat template produce.
      const prompt =
        c.kind === "completion"
          ? tokenizer.encode(c.text)
          : tokenizer.encode((await Effect.runPromise(formatter.render([{ role: "user", content: c.text }]))).text, {
              addSpecialTokens: false
            })
      expect(prompt, c.text).toEqual(c.prompt)
      const answer = await generate(engine, c.prompt, {
        ...greedy,
        genLength: c.params.gen_length,
        blockLength: c.params.block_length,
        steps: c.params.steps,
        eotTokenId: c.params.eot_token_id
      })
      expect(answer, c.text).toEqual(c.answer)
    }
  })

  it("fails the corpus test with untrained weights of the same shape", async () => {
    // The same config and tokenizer, weights drawn like the training script's initialisation (std 0.02).
    const config = JSON.parse(await readFile(join(modelDir, "config.json"), "utf8"))
    const randomDir = join(scratch, "random")
    await writeModelDir(
      randomDir,
      config,
      lladaTensors(parseLladaConfig(config)).map((t) => ({
        name: t.name,
        dtype: "BF16" as const,
        shape: t.shape,
        fill: t.kind === "norm" ? (out: Float32Array) => out.fill(1) : uniformFill(1, t.name, 0.02)
      }))
    )
    for (const name of ["tokenizer.json", "tokenizer_config.json"]) {
      await copyFile(join(modelDir, name), join(randomDir, name))
    }
    const random = await loadAddon().loadModel(randomDir, { threads: 2 })
    const texts = await completions(random)
    const { count, fraction } = corpusFraction(texts)
    expect(count >= MIN_WORDS && fraction >= MIN_CORPUS_WORD_FRACTION, JSON.stringify(texts)).toBe(false)
  })
})
