/**
 * Streaming detokenization: turns token ids arriving one at a time into text deltas whose concatenation
 * is the decode of all the ids.
 *
 * A token of a byte-level BPE may carry only part of a UTF-8 character (an emoji is often four one-byte
 * tokens), and decoders that strip or add spaces depend on neighbouring tokens, so decoding token by token
 * is wrong. Instead the detokenizer keeps a small window of tokens: `decode(window)` is compared with
 * `decode(window without its newest tokens)` and only the new suffix is emitted — and only when it does not
 * end in U+FFFD, which is what a decoder produces for a character whose bytes have not all arrived yet.
 * Once text is emitted the window moves past it, so each push costs a decode of a few tokens, and no text
 * is ever emitted twice. `flush()` at the end releases whatever is still held back (a character that never
 * completed decodes to U+FFFD there, as it does in a full decode).
 *
 * @since 0.1.0
 */

const REPLACEMENT_CHARACTER = "\uFFFD"

export class IncrementalDetokenizer {
  private readonly tokens: Array<number> = []
  /** Start of the window: tokens before it are emitted and no longer decoded. */
  private prefixOffset = 0
  /** Tokens in [prefixOffset, readOffset) are already emitted; later ones are not yet. */
  private readOffset = 0

  /** @param decode decodes a list of ids to text (the empty list to ""), e.g. `Tokenizer.decode`. */
  constructor(private readonly decode: (ids: ReadonlyArray<number>) => string) {}

  /** Adds one token and returns the text it completes: possibly "", never a partial character. */
  push(tokenId: number): string {
    this.tokens.push(tokenId)
    return this.emit(false)
  }

  /** Adds several tokens (e.g. the tokens committed in one denoising step) and returns the new text. */
  pushAll(tokenIds: Iterable<number>): string {
    let text = ""
    for (const id of tokenIds) text += this.push(id)
    return text
  }

  /** Returns all text still held back; call once after the last token. */
  flush(): string {
    return this.emit(true)
  }

  /** Every token pushed so far. */
  get tokenIds(): ReadonlyArray<number> {
    return this.tokens
  }

  private emit(final: boolean): string {
    if (this.readOffset === this.tokens.length) return ""
    const emitted = this.decode(this.tokens.slice(this.prefixOffset, this.readOffset))
    const full = this.decode(this.tokens.slice(this.prefixOffset))
    if (!final && (full.length <= emitted.length || full.endsWith(REPLACEMENT_CHARACTER))) return ""
    this.prefixOffset = this.readOffset
    this.readOffset = this.tokens.length
    return full.slice(emitted.length)
  }
}
