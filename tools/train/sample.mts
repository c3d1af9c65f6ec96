// Prints greedy generations of a model directory through the native engine, for a few prompts.
//   npx tsx tools/train/sample.mts MODEL_DIR [GEN_LENGTH] [BLOCK_LENGTH]
import { Effect } from "effect"
import { loadAddon } from "../../src/engine/native.js"
import { make } from "../../src/tokenizer/Tokenizer.js"

const [dir, genText = "48", blockText = "16"] = process.argv.slice(2)
const genLength = Number(genText)
const blockLength = Number(blockText)
const tokenizer = await Effect.runPromise(make(dir!))
const engine = await loadAddon().loadModel(dir!, { threads: 2 })
for (const prompt of ["ROMEO:\n", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the winter of"]) {
  const id = engine.create(tokenizer.encode(prompt), {
    genLength, blockLength, steps: genLength, temperature: 0, remasking: "low_confidence", cfgScale: 0, seed: 0
  })
  for (let done = false; !done; ) done = (await engine.step([id]))[0]!.finished
  console.log(JSON.stringify(prompt + tokenizer.decode(Array.from(engine.canvas(id)))))
  engine.release(id)
}
