// Prints generations of a model directory through the native engine: completions of a few prompts, and
// (--chat) replies to a few user lines through the model's chat template. Greedy unless --temperature is
// given (then --top-p, --min-p and --seed apply too).
//   npx tsx tools/train/sample.mts MODEL_DIR [GEN_LENGTH] [BLOCK_LENGTH] [--chat] [--temperature T]
//       [--top-p P] [--min-p M] [--seed S]
import { parseArgs } from "node:util"
import { Effect, Option } from "effect"
import { fromTokenizerConfig } from "../../src/chat/ChatFormatter.js"
import { loadAddon } from "../../src/engine/native.js"
import { make } from "../../src/tokenizer/Tokenizer.js"

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    chat: { type: "boolean", default: false },
    temperature: { type: "string", default: "0" },
    "top-p": { type: "string" },
    "min-p": { type: "string" },
    seed: { type: "string", default: "0" }
  }
})
const chat = values.chat
const [dir, genText = "48", blockText = "16"] = positionals
const genLength = Number(genText)
const blockLength = Number(blockText)
const tokenizer = await Effect.runPromise(make(dir!))
const engine = await loadAddon().loadModel(dir!, { threads: 2 })
const eot = Option.getOrUndefined(tokenizer.specialTokens.eot)

const generate = async (prompt: ReadonlyArray<number>): Promise<Array<number>> => {
  const id = engine.create(prompt, {
    genLength,
    blockLength,
    steps: genLength,
    temperature: Number(values.temperature),
    ...(values["top-p"] === undefined ? {} : { topP: Number(values["top-p"]) }),
    ...(values["min-p"] === undefined ? {} : { minP: Number(values["min-p"]) }),
    remasking: "low_confidence",
    cfgScale: 0,
    seed: Number(values.seed),
    ...(eot === undefined ? {} : { eotTokenId: eot })
  })
  try {
    for (let done = false; !done; ) done = (await engine.step([id]))[0]!.finished
    return Array.from(engine.canvas(id))
  } finally {
    engine.release(id)
  }
}

if (chat) {
  const formatter = await Effect.runPromise(fromTokenizerConfig(tokenizer.tokenizerConfig))
  const ends = new Set([tokenizer.specialTokens.eos, ...(eot === undefined ? [] : [eot])])
  for (const line of [
    "What news from Rome, good friend?",
    "Wilt thou be gone? It is not yet near day.",
    "I pray thee, tell me where the king is.",
    "Why dost thou weep, my lord?",
    "Shall we to the court to-night?"
  ]) {
    const rendered = await Effect.runPromise(formatter.render([{ role: "user", content: line }]))
    const answer = await generate(tokenizer.encode(rendered.text, { addSpecialTokens: false }))
    const end = answer.findIndex((t) => ends.has(t))
    console.log(JSON.stringify({ user: line, assistant: tokenizer.decode(end < 0 ? answer : answer.slice(0, end)) }))
  }
} else {
  for (const prompt of ["ROMEO:\n", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter of"]) {
    console.log(JSON.stringify(prompt + tokenizer.decode(await generate(tokenizer.encode(prompt)))))
  }
}
