/**
 * The tokenizer of a model directory: tokenizer.json + tokenizer_config.json read with
 * @huggingface/tokenizers (pure JavaScript), plus the special token ids the engine needs, resolved from
 * config.json and the tokenizer files.
 *
 * @since 0.1.0
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { Context, Effect, Layer, Option, Schema } from "effect"
import { IncrementalDetokenizer } from "./IncrementalDetokenizer.js"

/** A file of the model directory is missing, is not JSON, or is not a tokenizer the library accepts. */
export class TokenizerLoadError extends Schema.TaggedError<TokenizerLoadError>()("TokenizerLoadError", {
  path: Schema.String,
  message: Schema.String
}) {}

/** A special token the engine cannot work without (mask, eos) is named nowhere in the model directory. */
export class MissingSpecialToken extends Schema.TaggedError<MissingSpecialToken>()("MissingSpecialToken", {
  modelDir: Schema.String,
  token: Schema.Literal("mask", "eos"),
  message: Schema.String
}) {}

export type TokenizerError = TokenizerLoadError | MissingSpecialToken

/** Ids of the special tokens, as the engine and the serving layer use them. */
export interface SpecialTokens {
  /** Beginning of text; what encoding with special tokens puts first (absent in some tokenizers). */
  readonly bos: Option.Option<number>
  /** End of text: config.json's eos_token_id; also fills the unused tail of a generated answer. */
  readonly eos: number
  /** End of a chat turn (`<|eot_id|>` in LLaDA-Instruct); an answer stops there. */
  readonly eot: Option.Option<number>
  /** The mask token of the diffusion process: config.json's mask_token_id. */
  readonly mask: number
  /** Padding; LLaDA pads with EOS. */
  readonly pad: number
}

export interface EncodeOptions {
  /** Apply the tokenizer's post-processor (for LLaDA-style tokenizers: put BOS first). Default true. */
  readonly addSpecialTokens?: boolean
}

export interface DecodeOptions {
  /** Leave out special tokens (BOS, EOS, EOT, mask, chat headers). Default false. */
  readonly skipSpecialTokens?: boolean
}

export interface TokenizerShape {
  readonly modelDir: string
  /** Number of ids the tokenizer knows (the largest id plus one). */
  readonly vocabSize: number
  readonly specialTokens: SpecialTokens
  /** tokenizer_config.json as read (the chat formatter takes its template and token names from here). */
  readonly tokenizerConfig: Readonly<Record<string, unknown>>
  readonly encode: (text: string, options?: EncodeOptions) => ReadonlyArray<number>
  /**
   * Ids unknown to the tokenizer (a model's embedding may have more rows than the tokenizer has tokens)
   * decode to nothing, as in Hugging Face's tokenizers. Byte-level BPE decoding is exact: no "clean up"
   * of spaces before punctuation is applied, so decode(encode(text)) === text.
   */
  readonly decode: (ids: ReadonlyArray<number>, options?: DecodeOptions) => string
  /** The id of a token given by its text (e.g. "<|eot_id|>"), if the vocabulary has it. */
  readonly tokenId: (token: string) => Option.Option<number>
  /** A fresh streaming detokenizer (see IncrementalDetokenizer) over this tokenizer's decode. */
  readonly detokenizer: (options?: DecodeOptions) => IncrementalDetokenizer
}

export class Tokenizer extends Context.Tag("vdiff/Tokenizer")<Tokenizer, TokenizerShape>() {}

const readJson = (path: string): Effect.Effect<Record<string, unknown>, TokenizerLoadError> =>
  Effect.tryPromise({
    try: async () => {
      const value: unknown = JSON.parse(await readFile(path, "utf8"))
      if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error("not a JSON object")
      return value as Record<string, unknown>
    },
    catch: (cause) => new TokenizerLoadError({ path, message: `cannot read ${path}: ${errorMessage(cause)}` })
  })

const errorMessage = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

/** tokenizer_config.json names tokens either as a string or as a serialized AddedToken `{content, ...}`. */
const tokenName = (value: unknown): Option.Option<string> => {
  if (typeof value === "string") return Option.some(value)
  if (typeof value === "object" && value !== null && typeof (value as { content?: unknown }).content === "string") {
    return Option.some((value as { content: string }).content)
  }
  return Option.none()
}

const integer = (value: unknown): Option.Option<number> =>
  typeof value === "number" && Number.isSafeInteger(value) && value >= 0 ? Option.some(value) : Option.none()

/** LLaDA-Instruct's names for the tokens that tokenizer_config.json has no standard key for. */
const EOT_TOKEN = "<|eot_id|>"
const MASK_TOKEN = "<|mdm_mask|>"

/**
 * Loads the tokenizer of a model directory (tokenizer.json, tokenizer_config.json and config.json).
 *
 * Special tokens: mask and eos come from config.json (mask_token_id, eos_token_id) — the ids the model
 * was trained with — falling back to tokenizer_config.json's mask_token/eos_token; bos and pad come from
 * tokenizer_config.json (bos_token, pad_token), falling back to config.json and, for pad, to eos; eot is
 * the token `<|eot_id|>` when the vocabulary has it.
 */
export const make = (modelDir: string): Effect.Effect<TokenizerShape, TokenizerError> =>
  Effect.gen(function* () {
    const tokenizerJsonPath = join(modelDir, "tokenizer.json")
    const tokenizerJson = yield* readJson(tokenizerJsonPath)
    const tokenizerConfig = yield* readJson(join(modelDir, "tokenizer_config.json"))
    const modelConfig = yield* readJson(join(modelDir, "config.json"))
    const hf = yield* Effect.try({
      try: () => new HfTokenizer(tokenizerJson, tokenizerConfig),
      catch: (cause) => new TokenizerLoadError({ path: tokenizerJsonPath, message: `unsupported tokenizer: ${errorMessage(cause)}` })
    })

    const tokenId = (token: string): Option.Option<number> => Option.fromNullable(hf.token_to_id(token))
    const namedId = (key: string): Option.Option<number> => Option.flatMap(tokenName(tokenizerConfig[key]), tokenId)
    const missing = (token: "mask" | "eos", keys: string) =>
      new MissingSpecialToken({ modelDir, token, message: `${modelDir} names no ${token} token (looked at ${keys})` })

    const mask = yield* integer(modelConfig["mask_token_id"]).pipe(
      Option.orElse(() => namedId("mask_token")),
      Option.orElse(() => tokenId(MASK_TOKEN)),
      Effect.mapError(() => missing("mask", `config.json mask_token_id, tokenizer_config.json mask_token, ${MASK_TOKEN}`))
    )
    const eos = yield* integer(modelConfig["eos_token_id"]).pipe(
      Option.orElse(() => namedId("eos_token")),
      Effect.mapError(() => missing("eos", "config.json eos_token_id, tokenizer_config.json eos_token"))
    )
    const bos = namedId("bos_token").pipe(Option.orElse(() => integer(modelConfig["bos_token_id"])))
    const pad = namedId("pad_token").pipe(
      Option.orElse(() => integer(modelConfig["pad_token_id"])),
      Option.getOrElse(() => eos)
    )
    const specialTokens: SpecialTokens = { bos, eos, eot: tokenId(EOT_TOKEN), mask, pad }

    let vocabSize = 0
    for (const id of hf.get_vocab(true).values()) vocabSize = Math.max(vocabSize, id + 1)

    const encode = (text: string, options?: EncodeOptions): ReadonlyArray<number> =>
      hf.encode(text, { add_special_tokens: options?.addSpecialTokens ?? true }).ids

    const decode = (ids: ReadonlyArray<number>, options?: DecodeOptions): string => {
      const known = ids.filter((id) => hf.id_to_token(id) !== undefined)
      if (known.length === 0) return "" // the library throws on an empty list
      return hf.decode(known, {
        skip_special_tokens: options?.skipSpecialTokens ?? false,
        clean_up_tokenization_spaces: false
      })
    }

    return {
      modelDir,
      vocabSize,
      specialTokens,
      tokenizerConfig,
      encode,
      decode,
      tokenId,
      detokenizer: (options) => new IncrementalDetokenizer((ids) => decode(ids, options))
    }
  })

/** A layer providing the tokenizer of `modelDir`. */
export const layer = (modelDir: string): Layer.Layer<Tokenizer, TokenizerError> => Layer.effect(Tokenizer, make(modelDir))
