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

/** A special token of tokenizer.json's `added_tokens`. */
const addedToken = (id: number, content: string) => ({
  id,
  content,
  single_word: false,
  lstrip: false,
  rstrip: false,
  normalized: false,
  special: true
})

/**
 * A byte-level BPE tokenizer.json as @huggingface/tokenizers reads it: `vocab` and `merges`, special tokens
 * by id, an optional post-processor, and whether the decoder adds a prefix space.
 */
export const byteLevelBpe = (options: {
  readonly vocab: Record<string, number>
  readonly merges: ReadonlyArray<[string, string]>
  readonly special: ReadonlyArray<{ readonly id: number; readonly content: string }>
  readonly postProcessor?: unknown
  readonly decoderPrefixSpace: boolean
}) => ({
  version: "1.0",
  truncation: null,
  padding: null,
  added_tokens: options.special.map((s) => addedToken(s.id, s.content)),
  normalizer: null,
  pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
  post_processor: options.postProcessor ?? null,
  decoder: { type: "ByteLevel", add_prefix_space: options.decoderPrefixSpace, trim_offsets: true, use_regex: true },
  model: {
    type: "BPE",
    dropout: null,
    unk_token: null,
    continuing_subword_prefix: null,
    end_of_word_suffix: null,
    fuse_unk: false,
    byte_fallback: false,
    ignore_merges: false,
    vocab: options.vocab,
    merges: options.merges
  }
})
