/**
 * Turns the committed tokens of one answer into the text of one OpenAI choice, step by step.
 *
 * In block-wise decoding a committed token is never masked again, so the contiguous committed prefix of
 * the answer is final: the decoder reads that prefix as it grows and never looks past its end. Reading
 * stops at the first end token (EOS or end-of-turn: neither text nor counted — what follows it is
 * padding), at a stop token (counted, not in the text) or at a stop string (cut from the text). Text is
 * detokenized incrementally, so a character split over several tokens is emitted only when complete, and
 * text that could still become a stop string is held back until that is decided.
 *
 * The non-streaming and the streaming responses both read answers through this class, so the streamed
 * deltas always add up to the non-streamed text.
 */
import type { CommittedToken, TopLogprob } from "../engine/Engine.js"
import type { IncrementalDetokenizer } from "../tokenizer/IncrementalDetokenizer.js"
import type { FinishReason } from "./protocol.js"

export interface ChoiceDecoderOptions {
  readonly genLength: number
  /** End the answer and are not part of it (EOS, end-of-turn). */
  readonly endTokens: ReadonlySet<number>
  /** stop_token_ids: end the answer; counted as generated, left out of the text. */
  readonly stopTokens: ReadonlySet<number>
  readonly stopStrings: ReadonlyArray<string>
  /**
   * min_tokens: a stop string ends the answer only in the text of its minTokens-th token or a later one, so
   * the answer holds at least minTokens tokens, as in vLLM (the engine keeps end and stop tokens off the
   * positions before it); default 0.
   */
  readonly minTokens?: number | undefined
  /** include_stop_str_in_output: the text ends with the stop string that ended it, not before it. */
  readonly includeStopString?: boolean | undefined
  readonly detokenizer: IncrementalDetokenizer
  /**
   * Answer positions fixed from the start (genLength entries: NOT_COMMITTED where the model writes, else
   * the token): the engine commits them before the first step and never reports them, so the decoder
   * holds them as committed, with probability 1, from the start (structured output's JSON skeleton).
   */
  readonly template?: ReadonlyArray<number> | undefined
  /** The finish reason of an answer that fills its whole length; default "length". */
  readonly lengthReason?: FinishReason | undefined
}

/** What one batch of commits added to the choice. */
export interface ChoiceDelta {
  /** New final text (possibly ""). */
  readonly text: string
  /** The tokens read in this update: `tokenIds` (and `probabilities`, `textOffsets`) [firstToken, endToken). */
  readonly firstToken: number
  readonly endToken: number
  /** Set when this update ended the choice. */
  readonly finishReason: FinishReason | null
}

/** What `canvas` holds at a position nothing has been committed to yet. */
export const NOT_COMMITTED = -1

const noAlternatives: ReadonlyArray<TopLogprob> = []

export class ChoiceDecoder {
  /** The answer canvas: token ids, NOT_COMMITTED where still masked. */
  readonly canvas: Int32Array
  // The arrays below only ever grow, so a delta's index range into them stays valid.
  /** Tokens of the answer, in order, up to where it ended (the usage's completion tokens). */
  readonly tokenIds: Array<number> = []
  /** The probability each of `tokenIds` had when it was committed. */
  readonly probabilities: Array<number> = []
  /**
   * Each of `tokenIds`'s likeliest alternatives at the step that committed it, as the engine reported
   * them (with the engine setting topLogprobs; empty otherwise, and for fixed or early-stop tokens).
   */
  readonly alternatives: Array<ReadonlyArray<TopLogprob>> = []
  /** Where each of `tokenIds`'s text starts in the decoded answer. */
  readonly textOffsets: Array<number> = []
  /** All text emitted so far. */
  text = ""
  finishReason: FinishReason | null = null
  /** The end token (EOS, end of turn) the answer ended at, with its probability and alternatives; not among `tokenIds`. */
  endedBy: { readonly token: number; readonly probability: number; readonly alternatives: ReadonlyArray<TopLogprob> } | undefined

  private readonly committedProbabilities: Float32Array
  private readonly committedAlternatives: Array<ReadonlyArray<TopLogprob>>
  /** First answer position not read yet. */
  private next = 0
  /** Decoded text not emitted yet because it could be the start of a stop string. */
  private held = ""
  /** Length of all text the detokenizer has produced. */
  private decodedLength = 0

  constructor(private readonly options: ChoiceDecoderOptions) {
    this.canvas = new Int32Array(options.genLength).fill(NOT_COMMITTED)
    this.committedProbabilities = new Float32Array(options.genLength)
    this.committedAlternatives = new Array(options.genLength).fill(noAlternatives)
    options.template?.forEach((token, position) => {
      if (token !== NOT_COMMITTED) {
        this.canvas[position] = token
        this.committedProbabilities[position] = 1
      }
    })
  }

  get finished(): boolean {
    return this.finishReason !== null
  }

  /** Whether the answer position holds a committed token. */
  isCommitted(position: number): boolean {
    return this.canvas[position] !== NOT_COMMITTED
  }

  /** Records the tokens one step committed and reads as far as the committed prefix now reaches. */
  commit(committed: ReadonlyArray<CommittedToken>): ChoiceDelta {
    for (const c of committed) {
      this.canvas[c.position] = c.token
      this.committedProbabilities[c.position] = c.probability
      if (c.top !== undefined) this.committedAlternatives[c.position] = c.top
    }
    const firstToken = this.tokenIds.length
    if (this.finished) return { text: "", firstToken, endToken: firstToken, finishReason: null }
    let text = ""
    const { endTokens, stopTokens, detokenizer, genLength } = this.options
    while (!this.finished && this.next < genLength && this.isCommitted(this.next)) {
      const position = this.next++
      const token = this.canvas[position]!
      if (endTokens.has(token)) {
        this.endedBy = {
          token,
          probability: this.committedProbabilities[position]!,
          alternatives: this.committedAlternatives[position]!
        }
        text += this.finish("stop")
        break
      }
      this.tokenIds.push(token)
      this.probabilities.push(this.committedProbabilities[position]!)
      this.alternatives.push(this.committedAlternatives[position]!)
      this.textOffsets.push(this.decodedLength)
      if (stopTokens.has(token)) {
        text += this.finish("stop")
        break
      }
      const piece = detokenizer.push(token)
      this.decodedLength += piece.length
      text += this.accept(piece)
    }
    if (!this.finished && this.next === genLength) text += this.finish(this.options.lengthReason ?? "length")
    this.text += text
    return { text, firstToken, endToken: this.tokenIds.length, finishReason: this.finishReason }
  }

  /** Ends the choice: releases what the detokenizer and the stop-string check still hold. */
  private finish(reason: FinishReason): string {
    const rest = this.options.detokenizer.flush()
    this.decodedLength += rest.length
    let text = this.accept(rest)
    if (!this.finished) {
      text += this.held
      this.held = ""
      this.finishReason = reason
    }
    return text
  }

  /**
   * Takes newly decoded text and returns what can be emitted: everything before a stop string (which ends
   * the choice), else everything except the longest tail that a stop string could still begin with.
   */
  private accept(piece: string): string {
    if (this.finished) return ""
    const before = this.held.length
    this.held += piece
    const stops = this.options.stopStrings
    if (stops.length === 0 || this.held === "") {
      const text = this.held
      this.held = ""
      return text
    }
    // A stop string counts when it ends in this piece (what was held before holds none that counts), and
    // from the minTokens-th token on; before that its beginning is still held, so that one which ends in
    // the minTokens-th token's text is found.
    let cut = -1
    let end = -1
    if (this.tokenIds.length >= (this.options.minTokens ?? 0)) {
      for (const stop of stops) {
        const at = this.held.indexOf(stop, Math.max(0, before - stop.length + 1))
        if (at >= 0 && (cut < 0 || at < cut)) {
          cut = at
          end = at + stop.length
        }
      }
    }
    if (cut >= 0) {
      const text = this.held.slice(0, this.options.includeStopString === true ? end : cut)
      this.held = ""
      this.finishReason = "stop"
      return text
    }
    const keep = longestStopPrefixTail(this.held, stops)
    const text = this.held.slice(0, this.held.length - keep)
    this.held = this.held.slice(this.held.length - keep)
    return text
  }
}

/** Length of the longest tail of `text` that is a proper prefix of one of `stops`. */
const longestStopPrefixTail = (text: string, stops: ReadonlyArray<string>): number => {
  let longest = 0
  for (const stop of stops) {
    for (let length = Math.min(stop.length - 1, text.length); length > longest; length--) {
      if (text.endsWith(stop.slice(0, length))) {
        longest = length
        break
      }
    }
  }
  return longest
}
