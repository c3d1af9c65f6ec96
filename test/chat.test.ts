import { join } from "node:path"
import { Effect, Either, Layer, Option } from "effect"
import { describe, expect, it } from "vitest"
import { type ChatMessage, ChatFormatter, fromTokenizerConfig, layer as chatLayer } from "../src/chat/ChatFormatter.js"
import { Tokenizer, layer as tokenizerLayer } from "../src/tokenizer/Tokenizer.js"

const modelDir = join(import.meta.dirname, "..", "models", "shakespeare")

const conversation: ReadonlyArray<ChatMessage> = [
  { role: "system", content: "You are a player in a Shakespeare play." },
  { role: "user", content: "Who comes here?" },
  { role: "assistant", content: "A friend, my lord." },
  { role: "user", content: "Speak, then: what news?" }
]

const render = (config: Record<string, unknown>, messages: ReadonlyArray<ChatMessage>, addGenerationPrompt?: boolean) =>
  Effect.runPromise(
    Effect.either(
      Effect.flatMap(fromTokenizerConfig(config), (f) =>
        f.render(messages, addGenerationPrompt === undefined ? {} : { addGenerationPrompt })
      )
    )
  )

describe("fallback chat format (no chat_template)", () => {
  it("is exactly 'Role: content' joined by blank lines, ending with 'Assistant:'", async () => {
    const result = await render({}, conversation)
    expect(result).toEqual(
      Either.right({
        text:
          "System: You are a player in a Shakespeare play.\n\nUser: Who comes here?\n\n" +
          "Assistant: A friend, my lord.\n\nUser: Speak, then: what news?\n\nAssistant:",
        addSpecialTokens: true
      })
    )
  })

  it("omits the final 'Assistant:' without a generation prompt, and joins text parts with a newline", async () => {
    const result = await render(
      {},
      [
        {
          role: "user",
          content: [
            { type: "text", text: "Good morrow." },
            { type: "text", text: "What hour is it?" }
          ]
        }
      ],
      false
    )
    expect(Either.getOrThrow(result).text).toBe("User: Good morrow.\nWhat hour is it?")
  })
})

describe("the embedded model's chat template", () => {
  const formatterAndTokenizer = Effect.all([ChatFormatter, Tokenizer]).pipe(
    Effect.provide(chatLayer.pipe(Layer.provideMerge(tokenizerLayer(modelDir))))
  )

  it("renders LLaDA-Instruct's turn format and encodes with one BOS", async () => {
    const [formatter, tokenizer] = await Effect.runPromise(formatterAndTokenizer)
    expect(formatter.hasTemplate).toBe(true)
    const rendered = await Effect.runPromise(formatter.render(conversation))
    expect(rendered).toEqual({
      text:
        "<|startoftext|>" +
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a player in a Shakespeare play.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nWho comes here?<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\nA friend, my lord.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nSpeak, then: what news?<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
      addSpecialTokens: false
    })
    const ids = tokenizer.encode(rendered.text, { addSpecialTokens: rendered.addSpecialTokens })
    const bos = Option.getOrThrow(tokenizer.specialTokens.bos)
    const eot = Option.getOrThrow(tokenizer.specialTokens.eot)
    expect(ids[0]).toBe(bos)
    expect(ids.filter((id) => id === bos).length).toBe(1)
    expect(ids.filter((id) => id === eot).length).toBe(4)
    expect(tokenizer.decode(ids)).toBe(rendered.text)
  })

  it("leaves the generation prompt out when asked", async () => {
    const [formatter] = await Effect.runPromise(formatterAndTokenizer)
    const rendered = await Effect.runPromise(formatter.render([{ role: "user", content: "Hail!" }], { addGenerationPrompt: false }))
    expect(rendered.text).toBe("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHail!<|eot_id|>")
  })
})

describe("validation", () => {
  const template = { chat_template: "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" }

  for (const [name, config] of [
    ["fallback", {}],
    ["template", template]
  ] as const) {
    it(`rejects an empty message list (${name})`, async () => {
      const result = await render(config, [])
      expect(Either.isLeft(result) && result.left).toMatchObject({
        _tag: "InvalidChatRequest",
        reason: "EmptyMessages",
        param: "messages"
      })
    })

    it(`rejects an unknown role (${name})`, async () => {
      const result = await render(config, [
        { role: "user", content: "hi" },
        { role: "tool", content: "42" }
      ])
      expect(Either.isLeft(result) && result.left).toMatchObject({
        _tag: "InvalidChatRequest",
        reason: "UnknownRole",
        param: "messages[1].role"
      })
    })

    it(`rejects non-text content parts (${name})`, async () => {
      const result = await render(config, [
        {
          role: "user",
          content: [
            { type: "text", text: "What is in this picture?" },
            { type: "image_url", image_url: { url: "data:image/png;base64,AAAA" } }
          ]
        }
      ])
      expect(Either.isLeft(result) && result.left).toMatchObject({
        _tag: "InvalidChatRequest",
        reason: "UnsupportedContent",
        param: "messages[0].content[1]"
      })
    })
  }

  it("rejects content that is neither a string nor a list of parts", async () => {
    const result = await render({}, [{ role: "user", content: null as unknown as string }])
    expect(Either.isLeft(result) && result.left).toMatchObject({
      _tag: "InvalidChatRequest",
      reason: "UnsupportedContent",
      param: "messages[0].content"
    })
  })

  it("turns the template's raise_exception into a request error", async () => {
    const strict = {
      chat_template:
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('The first message must be a system message') }}{% endif %}ok"
    }
    const result = await render(strict, [{ role: "user", content: "hi" }])
    expect(Either.isLeft(result) && result.left).toMatchObject({
      _tag: "InvalidChatRequest",
      reason: "RejectedByTemplate",
      message: "The first message must be a system message"
    })
    expect(Either.getOrThrow(await render(strict, [{ role: "system", content: "hi" }])).text).toBe("ok")
  })

  it("reports a template that does not parse as a ChatTemplateError", async () => {
    const result = await render({ chat_template: "{% for m in messages %}{{ m.role }" }, conversation)
    expect(Either.isLeft(result) && result.left._tag).toBe("ChatTemplateError")
  })
})
