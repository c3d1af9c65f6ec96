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
        { role: "function", content: "42" }
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

describe("tools in the conversation", () => {
  const calls: ChatMessage["tool_calls"] = [
    { id: "call_1", function: { name: "get_place", arguments: '{"city":"Verona","near":["Mantua"]}' } }
  ]
  const conversation: ReadonlyArray<ChatMessage> = [
    { role: "user", content: "Where?" },
    { role: "assistant", content: null as unknown as undefined, tool_calls: calls },
    { role: "tool", tool_call_id: "call_1", content: "Fair Verona" }
  ]
  const tools = [{ type: "function", function: { name: "get_place", parameters: { type: "object" } } }]

  it("a template that reads tool_calls gets them as Hugging Face passes them (arguments parsed), and the tools", async () => {
    const reader = {
      chat_template:
        "{% if tools %}TOOLS {{ tools[0].function.name }}{{ '\\n' }}{% endif %}" +
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }} " +
        "{{ c.function.arguments.city }} {{ c.function.arguments.near[0] }}{% endfor %}" +
        "{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }}: {{ m.content }}{% else %}{{ m.role }}: {{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"
    }
    const rendered = await Effect.runPromise(Effect.flatMap(fromTokenizerConfig(reader), (f) => f.render(conversation, { tools })))
    expect(rendered.text).toBe("TOOLS get_place\nuser: Where?\nCALL call_1 get_place Verona Mantua\nRESULT call_1: Fair Verona\n")
  })

  it("a template that does not read tool_calls (the embedded model's) gets each call as the JSON laid on the canvas", async () => {
    const text = await Effect.runPromise(
      Effect.gen(function* () {
        const formatter = yield* ChatFormatter
        return (yield* formatter.render(conversation, { tools })).text
      }).pipe(Effect.provide(chatLayer.pipe(Layer.provideMerge(tokenizerLayer(modelDir)))))
    )
    expect(text).toBe(
      "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>" +
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_place", "arguments": {"city": "Verona", "near": ["Mantua"]}}<|eot_id|>' +
        "<|start_header_id|>tool<|end_header_id|>\n\nFair Verona<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
  })

  it("the fallback format writes the call after the content, and arguments that are not JSON as they came", async () => {
    const result = await render({}, [
      { role: "user", content: "Where?" },
      { role: "assistant", content: "Let me look.", tool_calls: [{ function: { name: "look", arguments: "not json" } }] },
      { role: "tool", content: "here" }
    ])
    expect(Either.getOrThrow(result).text).toBe(
      'User: Where?\n\nAssistant: Let me look.\n{"name": "look", "arguments": "not json"}\n\nTool: here\n\nAssistant:'
    )
  })

  it("refuses tool_calls on a message that is not the assistant's, and a message with neither content nor calls", async () => {
    const onUser = await render({}, [{ role: "user", content: "hi", tool_calls: calls }])
    expect(Either.isLeft(onUser) && onUser.left).toMatchObject({ reason: "UnsupportedContent", param: "messages[0].tool_calls" })
    const empty = await render({}, [{ role: "user", content: "hi" }, { role: "assistant" }])
    expect(Either.isLeft(empty) && empty.left).toMatchObject({ reason: "UnsupportedContent", param: "messages[1].content" })
    expect(Either.isLeft(empty) && empty.left.message).toMatch(/only an assistant message with tool_calls/)
  })
})
