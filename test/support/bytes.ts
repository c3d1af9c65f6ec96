/**
 * GPT-2's reversible map from bytes to printable characters, in which byte-level BPE vocabularies are
 * written (tokenizer.json's `vocab` keys): the tiny tokenizers of the HTTP and OpenAI tests are built on it.
 */
export const byteChars = (): Array<string> => {
  const printable: Array<number> = []
  for (let c = 33; c <= 126; c++) printable.push(c)
  for (let c = 161; c <= 172; c++) printable.push(c)
  for (let c = 174; c <= 255; c++) printable.push(c)
  const chars = new Array<string>(256)
  for (const b of printable) chars[b] = String.fromCharCode(b)
  let extra = 0
  for (let b = 0; b < 256; b++) if (chars[b] === undefined) chars[b] = String.fromCharCode(256 + extra++)
  return chars
}
