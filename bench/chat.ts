/**
 * Do the embedded model's chat replies answer the line they follow? Held-out exchanges of the plays (one
 * speech, then a different speaker's reply) give the user lines; the model replies to each through its chat
 * template, as `POST /v1/chat/completions` does, and each reply is judged by
 *   - closed: it ends with the end of its turn (<|eot_id|> or EOS) before the canvas runs out, and holds no
 *     turn header (a reply that writes "user" and goes on as the next speaker did not close);
 *   - takes up the line: it shares a word with the line that is not among the 120 most frequent words of the
 *     training text ("Well, let it strike." / "Why let it strike?"), the measure tools/train/data.py's
 *     `replies_taking_up` uses to pick its --sft-echo conversations;
 *   - the same against another line (the next exchange's): the rate a reply reaches by chance, so the
 *     difference is what the line itself made the model say;
 *   - corpus words and word count, as bench/quality.ts judges answers.
 * Shakespeare's own replies to the same lines are judged the same way, as the scale.
 *
 *   npx tsx bench/chat.ts [--lines 40 --gen 128 --block 32 --modes served,none --corpus tinyshakespeare.txt
 *       --model DIR --threads 2 --show 5]
 *
 * Modes are bench/quality.ts's ("served": the server's defaults under the model's generation_config.json);
 * a mode without a block length of its own (":b8") uses --block, the server's default 32. Reply i is
 * seeded 7 + i.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { Effect, Option } from "effect"
import { fromTokenizerConfig } from "../src/chat/ChatFormatter.js"
import { loadAddon } from "../src/engine/native.js"
import { make as makeTokenizer } from "../src/tokenizer/Tokenizer.js"
import {
  embeddedModelDir,
  endTokensOf,
  generateAll,
  heldOutText,
  type Mode,
  modeParams,
  parseMode,
  readCorpusWords,
  servedMode,
  splitCorpus,
  words
} from "./quality.js"

const root = join(import.meta.dirname, "..")

/** [speaker, speech] for every "NAME:" block of the play text (blocks are separated by blank lines). */
export const speeches = (text: string): Array<readonly [string, string]> =>
  text.split("\n\n").flatMap((block) => {
    const lines = block.replace(/^\n+|\n+$/g, "").split("\n")
    return lines.length >= 2 && lines[0]!.endsWith(":") ? [[lines[0]!.slice(0, -1), lines.slice(1).join("\n").trim()] as const] : []
  })

/** The `count` most frequent words of `text`, ties in order of first appearance (Python's most_common). */
export const frequentWords = (text: string, count: number): Set<string> => {
  const counts = new Map<string, number>()
  for (const w of words(text)) counts.set(w, (counts.get(w) ?? 0) + 1)
  return new Set(
    [...counts.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, count)
      .map(([w]) => w)
  )
}

/** Whether `reply` shares a word with `line` that is not a frequent word. */
export const takesUp = (line: string, reply: string, frequent: ReadonlySet<string>): boolean => {
  const said = new Set(words(line).filter((w) => !frequent.has(w)))
  return words(reply).some((w) => said.has(w))
}

export interface Exchange {
  readonly line: string
  /** What the play's next speaker answered. */
  readonly reply: string
}

/** `count` exchanges spread evenly over the held-out text: different speakers, a line of at most 30 words. */
export const heldOutExchanges = (corpus: string, count: number): Array<Exchange> => {
  const turns = speeches(heldOutText(corpus))
  const all: Array<Exchange> = []
  for (let i = 0; i + 1 < turns.length; i++) {
    const [speaker, line] = turns[i]!
    const [next, reply] = turns[i + 1]!
    if (speaker !== next && words(line).length <= 30) all.push({ line, reply })
  }
  if (all.length < count) throw new Error(`the held-out text has only ${all.length} exchanges`)
  return Array.from({ length: count }, (_, i) => all[Math.floor((i * all.length) / count)]!)
}

export interface ChatJudged {
  readonly closed: number
  readonly takesUp: number
  /** The same rate against another exchange's line. */
  readonly takesUpOther: number
  readonly corpusWordFraction: number
  readonly meanWords: number
}

/** Judges replies (text up to the end of the turn, and whether it closed) to `exchanges`' lines. */
export const judgeReplies = (
  exchanges: ReadonlyArray<Exchange>,
  replies: ReadonlyArray<{ readonly text: string; readonly closed: boolean }>,
  frequent: ReadonlySet<string>,
  corpusWords: ReadonlySet<string>
): ChatJudged => {
  const n = replies.length
  const all = replies.flatMap((r) => words(r.text))
  const share = (f: (i: number) => boolean) => Array.from({ length: n }, (_, i) => i).filter(f).length / n
  return {
    closed: share((i) => replies[i]!.closed),
    takesUp: share((i) => takesUp(exchanges[i]!.line, replies[i]!.text, frequent)),
    takesUpOther: share((i) => takesUp(exchanges[(i + 1) % n]!.line, replies[i]!.text, frequent)),
    corpusWordFraction: all.length === 0 ? 0 : all.filter((w) => corpusWords.has(w)).length / all.length,
    meanWords: all.length / n
  }
}

export interface ChatReport {
  readonly heldOut: ChatJudged
  readonly modes: ReadonlyArray<{ readonly mode: Mode; readonly judged: ChatJudged; readonly replies: ReadonlyArray<string> }>
}

export const measureChat = async (options: {
  readonly corpus: string
  readonly lines: number
  readonly genLength: number
  /** The block length of a mode that sets none (the server's default is 32). */
  readonly blockLength: number
  readonly modes: ReadonlyArray<Mode>
  readonly threads: number
  readonly modelDir: string
}): Promise<{ exchanges: Array<Exchange>; report: ChatReport }> => {
  const tokenizer = await Effect.runPromise(makeTokenizer(options.modelDir))
  const formatter = await Effect.runPromise(fromTokenizerConfig(tokenizer.tokenizerConfig))
  const engine = await loadAddon().loadModel(options.modelDir, { threads: options.threads })
  const corpusWords = readCorpusWords()
  const exchanges = heldOutExchanges(options.corpus, options.lines)
  const frequent = frequentWords(splitCorpus(options.corpus).train, 120)
  const eot = Option.getOrUndefined(tokenizer.specialTokens.eot)
  const ends = endTokensOf(tokenizer)
  const headers = new Set(["<|start_header_id|>", "<|end_header_id|>"].flatMap((t) => tokenizer.encode(t, { addSpecialTokens: false })))
  const prompts = await Promise.all(
    exchanges.map(async ({ line }) => {
      const rendered = await Effect.runPromise(formatter.render([{ role: "user", content: line }]))
      return tokenizer.encode(rendered.text, { addSpecialTokens: rendered.addSpecialTokens })
    })
  )
  const modes: Array<ChatReport["modes"][number]> = []
  for (const mode of options.modes) {
    const params = { ...modeParams(mode, options.genLength, options.blockLength, eot), earlyStop: true, eotTokenId: eot ?? -1 }
    const { answers } = await generateAll(engine, prompts, params)
    const replies = answers.map((answer) => {
      const end = answer.findIndex((t) => ends.has(t))
      const turn = end < 0 ? answer : answer.slice(0, end)
      return { text: tokenizer.decode(turn, { skipSpecialTokens: true }), closed: end >= 0 && !turn.some((t) => headers.has(t)) }
    })
    modes.push({ mode, judged: judgeReplies(exchanges, replies, frequent, corpusWords), replies: replies.map((r) => r.text) })
  }
  const heldOut = judgeReplies(
    exchanges,
    exchanges.map(({ reply }) => ({ text: reply, closed: true })),
    frequent,
    corpusWords
  )
  return { exchanges, report: { heldOut, modes } }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({
    options: {
      lines: { type: "string", default: "40" },
      gen: { type: "string", default: "128" },
      block: { type: "string", default: "32" },
      threads: { type: "string", default: "2" },
      modes: { type: "string", default: "served,none" },
      corpus: { type: "string", default: join(root, "..", "shared", "data", "tinyshakespeare.txt") },
      model: { type: "string", default: embeddedModelDir },
      show: { type: "string", default: "5" }
    }
  })
  const modelDir = values.model!
  const { exchanges, report } = await measureChat({
    corpus: readFileSync(values.corpus!, "utf8"),
    lines: Number(values.lines),
    genLength: Number(values.gen),
    blockLength: Number(values.block),
    threads: Number(values.threads),
    modelDir,
    modes: values.modes!.split(",").map((name) => (name === "served" ? servedMode(modelDir) : parseMode(name)))
  })
  const row = (cells: ReadonlyArray<string>) => cells.map((c, i) => (i === 0 ? c.padEnd(22) : c.padStart(10))).join(" ")
  console.log(
    `${modelDir}: replies to ${exchanges.length} held-out lines, gen ${values.gen}, block ${values.block} (or the mode's), one token a step`
  )
  console.log(row(["replies", "closed", "take up", "by chance", "corpus", "words"]))
  const print = (name: string, j: ChatJudged) =>
    console.log(
      row([
        name,
        j.closed.toFixed(3),
        j.takesUp.toFixed(3),
        j.takesUpOther.toFixed(3),
        j.corpusWordFraction.toFixed(3),
        j.meanWords.toFixed(1)
      ])
    )
  print("Shakespeare's", report.heldOut)
  for (const m of report.modes) print(m.mode.name, m.judged)
  for (const m of report.modes) {
    console.log(`\n${m.mode.name}:`)
    for (let i = 0; i < Math.min(Number(values.show), exchanges.length); i++) {
      console.log(`  ${JSON.stringify(exchanges[i]!.line)}\n    -> ${JSON.stringify(m.replies[i])}`)
    }
  }
}
