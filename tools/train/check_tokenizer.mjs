// Checks that @huggingface/tokenizers (what the server uses) encodes exactly as tools/train/bpe.py's Encoder
// (what training used): compares with the ids `bpe.py --write-corpus-ids` wrote for the corpus, and checks
// that decoding gives the text back.
//   node tools/train/check_tokenizer.mjs TOKENIZER_DIR CORPUS_FILE IDS_JSON
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Tokenizer } from "@huggingface/tokenizers"

const [dir, textFile, idsFile] = process.argv.slice(2)
const tokenizer = new Tokenizer(
  JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8")),
  JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8"))
)
const text = readFileSync(textFile, "utf8")
const expected = JSON.parse(readFileSync(idsFile, "utf8"))
const ids = tokenizer.encode(text, { add_special_tokens: false }).ids
let firstDiff = -1
for (let i = 0; i < Math.max(ids.length, expected.length); i++) {
  if (ids[i] !== expected[i]) { firstDiff = i; break }
}
const decoded = tokenizer.decode(ids)
console.log(`js ${ids.length} tokens, python ${expected.length} tokens, first difference at ${firstDiff}`)
console.log(`js decode round-trips: ${decoded === text}`)
if (firstDiff !== -1 || decoded !== text) process.exit(1)
