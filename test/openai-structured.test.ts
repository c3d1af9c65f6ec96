/**
 * Structured output's template (src/openai/structured.ts), without a model: which schemas become a JSON
 * skeleton and which are refused with their reason; the skeleton laid out on the embedded model's
 * tokenizer (fixed tokens decode to the skeleton, slots are -1); and reading an answer back: whatever
 * tokens the model puts in the slots (quotes, backslashes, newlines, special tokens), the text is JSON
 * that parses and has the schema's keys.
 */
import { Effect, Option } from "effect"
import fc from "fast-check"
import { join } from "node:path"
import { beforeAll, describe, expect, it } from "vitest"
import * as Tokenizer from "../src/tokenizer/Tokenizer.js"
import { isRefusal, layOut, skeletonOf } from "../src/openai/structured.js"

let tokenizer: Tokenizer.TokenizerShape
beforeAll(async () => {
  tokenizer = await Effect.runPromise(Tokenizer.make(join(import.meta.dirname, "..", "models", "shakespeare")))
})

const object = (properties: Record<string, unknown>, extra: Record<string, unknown> = {}) => ({
  type: "object",
  properties,
  ...extra
})

describe("skeletonOf", () => {
  it("lays out objects with known keys: strings as slots, nested objects, fixed values", () => {
    const skeleton = skeletonOf(
      object(
        {
          name: { type: "string", description: "who" },
          kind: { const: "herald" },
          rank: { enum: [3] },
          house: object({ seat: { type: "string" } }, { required: ["seat"], additionalProperties: false })
        },
        { $schema: "https://json-schema.org/draft/2020-12/schema", required: ["name"] }
      )
    )
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.slots).toBe(2)
    expect(skeleton.parts).toEqual([
      { fixed: `{"name": "` },
      { slot: true },
      { fixed: `", "kind": "herald", "rank": 3, "house": {"seat": "` },
      { slot: true },
      { fixed: `"}}` }
    ])
  })

  it.each([
    ["a string at the top", { type: "string" }, "schema", /must be an object with known keys/],
    ["an object without properties", { type: "object" }, "schema", /needs its keys in `properties`/],
    ["a number below 10", object({ age: { type: "number", maximum: 9 } }), "schema.properties.age.maximum", /one digit may break it/],
    [
      "a multipleOf",
      object({ age: { type: "integer", multipleOf: 5 } }),
      "schema.properties.age.multipleOf",
      /not supported on an integer/
    ],
    ["an integer above 0", object({ n: { type: "integer", minimum: 1 } }), "schema.properties.n.minimum", /which may be 0/],
    [
      "an array without maxItems",
      object({ tags: { type: "array", items: { type: "string" } } }),
      "schema.properties.tags",
      /needs maxItems/
    ],
    [
      "an array of varying length whose items are objects",
      object({ n: { type: "array", items: object({ a: { type: "string" } }), maxItems: 3 } }),
      "schema.properties.n.minItems",
      /items must be strings or numbers/
    ],
    [
      "an array of more than 16 items",
      object({ n: { type: "array", items: { type: "string" }, maxItems: 17 } }),
      "schema.properties.n.maxItems",
      /from minItems to 16/
    ],
    [
      "uniqueItems",
      object({ n: { type: "array", items: { type: "string" }, maxItems: 2, uniqueItems: true } }),
      "schema.properties.n.uniqueItems",
      /not supported on an array/
    ],
    ["a pattern", object({ s: { type: "string", pattern: "^a$" } }), "schema.properties.s.pattern", /pattern/],
    ["a format", object({ s: { type: "string", format: "date" } }), "schema.properties.s.format", /format/],
    [
      "minLength above maxLength",
      object({ s: { type: "string", minLength: 3, maxLength: 2 } }),
      "schema.properties.s.minLength",
      /above maxLength/
    ],
    ["a negative maxLength", object({ s: { type: "string", maxLength: -1 } }), "schema.properties.s.maxLength", /integer >= 0/],
    ["two types", object({ s: { type: ["string", "integer"] } }), "schema.properties.s", /one type \(or one and null\)/],
    [
      "anyOf of two shapes",
      object({ s: { anyOf: [{ type: "string" }, { type: "integer" }, { type: "null" }] } }),
      "schema.properties.s",
      /anyOf of 2 shapes/
    ],
    ["an empty oneOf", object({ s: { oneOf: [] } }), "schema.properties.s.oneOf", /at least one schema/],
    ["a union of empty enums", object({ s: { anyOf: [{ enum: [] }, { enum: [] }] } }), "schema.properties.s.anyOf", /no value to take/],
    [
      "allOf of two schemas",
      object({ s: { allOf: [{ type: "string" }, { maxLength: 3 }] } }),
      "schema.properties.s.allOf",
      /one schema only/
    ],
    [
      "a constraint beside anyOf",
      object({ s: { anyOf: [{ type: "string" }], maxLength: 3 } }),
      "schema.properties.s.maxLength",
      /beside anyOf/
    ],
    ["a $ref to nothing", object({ s: { $ref: "#/$defs/x" } }), "schema.properties.s.$ref", /names nothing in this schema/],
    ["a $ref elsewhere", object({ s: { $ref: "https://example.com/s.json" } }), "schema.properties.s.$ref", /only references within it/],
    [
      "a constraint beside $ref",
      object({ s: { $ref: "#/$defs/x", maxLength: 3 } }, { $defs: { x: { type: "string" } } }),
      "schema.properties.s.maxLength",
      /beside \$ref/
    ],
    [
      "a recursive $ref",
      object(
        { child: { $ref: "#/$defs/node" } },
        { $defs: { node: object({ name: { type: "string" }, child: { $ref: "#/$defs/node" } }) } }
      ),
      "schema.$defs.node.properties.child.$ref",
      /is recursive/
    ],
    ["a $ref to the whole schema", object({ s: { $ref: "#" } }), "schema.properties.s.$ref", /"#" is recursive/],
    ["a top level that is a union", { anyOf: [{ const: 1 }, { const: 2 }] }, "schema", /must be an object/],
    ["an empty enum", object({ s: { enum: [] } }), "schema.properties.s.enum", /at least one value/],
    [
      "an enum with a pattern",
      object({ s: { type: "string", enum: ["a", "b"], pattern: "a" } }),
      "schema.properties.s.pattern",
      /with enum/
    ],
    [
      "an enum of 257 values",
      object({ s: { enum: Array.from({ length: 257 }, (_, i) => i) } }),
      "schema.properties.s.enum",
      /at most 256 values, got 257/
    ],
    ["a value without type", object({ s: {} }), "schema.properties.s", /needs a `type`/],
    [
      "additionalProperties with a schema",
      object({ s: { type: "string" } }, { additionalProperties: { type: "string" } }),
      "schema.additionalProperties",
      /only known keys/
    ],
    ["required naming an unknown key", object({ s: { type: "string" } }, { required: ["t"] }), "schema.required", /"t"/]
  ])("refuses %s", (_, schema, path, reason) => {
    const refusal = skeletonOf(schema)
    expect(isRefusal(refusal)).toBe(true)
    if (!isRefusal(refusal)) return
    expect(refusal.path).toBe(path)
    expect(refusal.message).toMatch(reason)
  })
})

describe("choices: enums and booleans", () => {
  const schema = object({
    ok: { type: "boolean" },
    mood: { type: "string", enum: ["merry", "sad", "merry"] },
    n: { enum: [1, null, { a: 2 }] },
    why: { type: "string" }
  })

  it("lays out each as a choice of its values' JSON text (duplicates once), a region one wider than its longest value", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.slots).toBe(1)
    expect(skeleton.parts).toEqual([
      { fixed: `{"ok": ` },
      { choice: ["true", "false"] },
      { fixed: `, "mood": ` },
      { choice: ['"merry"', '"sad"'] },
      { fixed: `, "n": ` },
      { choice: ["1", "null", '{"a":2}'] },
      { fixed: `, "why": "` },
      { slot: true },
      { fixed: `"}` }
    ])
    const laid = layOut(skeleton, 4, tokenizer)
    const encode = (text: string) => tokenizer.encode(text, { addSpecialTokens: false })
    expect(laid.choices.map((c) => c.values.map((v) => v.text))).toEqual([
      ["true", "false"],
      ['"merry"', '"sad"'],
      ["1", "null", '{"a":2}']
    ])
    for (const choice of laid.choices) {
      for (const value of choice.values) expect(value.tokens).toEqual(encode(value.text))
      expect(choice.width).toBe(Math.max(...choice.values.map((v) => v.tokens.length)) + 1)
      expect(laid.template.slice(choice.start, choice.start + choice.width).every((t) => t === -1)).toBe(true)
    }
    expect(laid.template.filter((t) => t === -1)).toHaveLength(laid.choices.reduce((sum, c) => sum + c.width, 0) + 4)
    expect(laid.pad).toEqual(encode(" ")[0])
  })

  it("reads a chosen value back as its JSON, the pads after it left out", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 4, tokenizer)
    const canvas = [...laid.template]
    const picks = [1, 0, 2]
    laid.choices.forEach((choice, c) => {
      const { tokens } = choice.values[picks[c]!]!
      for (let k = 0; k < choice.width; k++) canvas[choice.start + k] = k < tokens.length ? tokens[k]! : laid.pad
    })
    const slot = canvas.indexOf(-1)
    const words = tokenizer.encode(" Good night", { addSpecialTokens: false })
    for (let k = 0; k < 4; k++) canvas[slot + k] = k < words.length ? words[k]! : tokenizer.specialTokens.eos
    expect(JSON.parse(laid.render(canvas))).toEqual({ ok: false, mood: "merry", n: { a: 2 }, why: "Good night" })
  })
})

describe("arrays", () => {
  const schema = object({
    tags: { type: "array", items: { type: "string" }, minItems: 1, maxItems: 3 },
    pair: { type: "array", items: object({ who: { type: "string" }, n: { type: "integer" } }), minItems: 2, maxItems: 2 }
  })

  it("lays an array out at its longest; a varying one of strings is listed with its fewest items", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.slots).toBe(3 + 4)
    expect(skeleton.lists).toEqual([{ keys: ["tags"], min: 1 }])
    expect(skeleton.parts.slice(0, 7)).toEqual([
      { fixed: `{"tags": ["` },
      { slot: true },
      { fixed: `", "` },
      { slot: true },
      { fixed: `", "` },
      { slot: true },
      { fixed: `"], "pair": [{"who": "` }
    ])
  })

  it("drops the items the model left empty, down to minItems, and writes the rest in the skeleton's spacing", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 3, tokenizer)
    const eos = tokenizer.specialTokens.eos
    const encode = (text: string) => tokenizer.encode(text, { addSpecialTokens: false })
    const slot = (text: string) => [...encode(text), eos, eos, eos].slice(0, 3)
    const fill = (tags: ReadonlyArray<string>) => {
      const values = [...tags.flatMap(slot), ...slot(" Good"), ...slot("1"), ...slot(" night"), ...slot("2")]
      let v = 0
      return laid.template.map((t) => (t === -1 ? values[v++]! : t))
    }
    const parsed = (tags: ReadonlyArray<string>) => JSON.parse(laid.render(fill(tags)))
    expect(parsed([" York", "", " Kent"]).tags).toEqual(["York", "Kent"])
    expect(parsed(["", "", ""]).tags).toEqual([""])
    expect(parsed(["", " Kent", ""]).tags).toEqual(["Kent"])
    expect(parsed([" a", " b", " c"])).toEqual({
      tags: ["a", "b", "c"],
      pair: [
        { who: "Good", n: 1 },
        { who: "night", n: 2 }
      ]
    })
    expect(laid.render(fill([" York", "", ""]))).toBe('{"tags": ["York"], "pair": [{"who": "Good", "n": 1}, {"who": "night", "n": 2}]}')
  })

  it("a list of numbers of varying length: each first position may end its item; empty ones dropped, kept ones 0", () => {
    const skeleton = skeletonOf(object({ scores: { type: "array", items: { type: "integer", minimum: 0 }, minItems: 1, maxItems: 3 } }))
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.parts.filter((part) => "slot" in part)).toEqual(new Array(3).fill({ slot: true, number: "integer", optional: true }))
    const laid = layOut(skeleton, 2, tokenizer)
    const special = tokenizer.specialTokens
    const open = laid.template.flatMap((t, i) => (t === -1 ? [i] : []))
    const first = laid.allowedSets[laid.positionAllowed[open[0]!]!]!
    expect(first).toContain(special.eos)
    const ends = [special.eos, Option.getOrThrow(special.eot)]
    for (const id of first) expect(/^[0-9]+$/.test(tokenizer.decode([id])) || ends.includes(id)).toBe(true)
    const digit = (d: string) => tokenizer.encode(d, { addSpecialTokens: false })
    const eos = special.eos
    const read = (items: ReadonlyArray<ReadonlyArray<number>>) => {
      const values = items.flatMap((item) => [...item, eos, eos].slice(0, 2))
      let v = 0
      return JSON.parse(laid.render(laid.template.map((t) => (t === -1 ? values[v++]! : t)))).scores
    }
    expect(read([digit("7"), [eos], digit("42")])).toEqual([7, 42])
    expect(read([[eos], [eos], [eos]])).toEqual([0])
    expect(read([digit("3"), digit("5"), digit("8")])).toEqual([3, 5, 8])
    // With minItems equal to maxItems nothing is optional.
    const fixedLength = skeletonOf(object({ s: { type: "array", items: { type: "integer" }, minItems: 2, maxItems: 2 } }))
    if (isRefusal(fixedLength)) throw new Error(fixedLength.message)
    expect(fixedLength.parts.some((part) => "slot" in part && part.optional === true)).toBe(false)
  })
})

describe("numbers", () => {
  const schema = object({
    n: { type: "integer", minimum: 0 },
    x: { type: "number", minimum: -1 },
    d: { type: "integer", minimum: 1, maximum: 3 }
  })

  it("an integer or number is a slot without quotes; a small integer range is a choice of its values", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.slots).toBe(2)
    expect(skeleton.parts).toEqual([
      { fixed: `{"n": ` },
      { slot: true, number: "integer" },
      { fixed: `, "x": ` },
      { slot: true, number: "number" },
      { fixed: `, "d": ` },
      { choice: ["1", "2", "3"] },
      { fixed: "}" }
    ])
  })

  it("restricts a slot's first position to digits, the rest to digits (and a point for a number) or an end token", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 4, tokenizer)
    const slots = laid.template.flatMap((t, i) => (t === -1 ? [i] : [])).slice(0, 8)
    const text = (id: number) => tokenizer.decode([id])
    const special = tokenizer.specialTokens
    const ends = new Set([special.eos, Option.getOrThrow(special.eot)])
    for (const [k, position] of slots.entries()) {
      const set = laid.allowedSets[laid.positionAllowed[position]!]!
      const first = k % 4 === 0
      const number = k >= 4
      for (const id of set) {
        const t = text(id)
        if (first) expect(t).toMatch(/^[0-9]+$/)
        else if (!ends.has(id)) expect(t).toMatch(number ? /^[0-9]*\.?[0-9]*$/ : /^[0-9]+$/)
      }
      // Every token made of digits is in it, and the end tokens after the first position.
      for (let id = 0; id < tokenizer.vocabSize; id++) if (/^[0-9]+$/.test(text(id))) expect(set).toContain(id)
      for (const end of ends) expect(set.includes(end)).toBe(!first)
    }
    // Positions outside the number slots take anything.
    for (let i = 0; i < laid.template.length; i++) if (!slots.includes(i)) expect(laid.positionAllowed[i] ?? -1).toBe(-1)
  })

  it("keeps an upper bound by the digits: a slot no wider than the bound's digits at the longest digit token's length", () => {
    // zod's .int() bounds, and a bound of 3 digits; the embedded tokenizer's digit tokens are single digits.
    const skeleton = skeletonOf(
      object({
        n: { type: "integer", minimum: -9007199254740991, maximum: 9007199254740991 },
        m: { type: "integer", exclusiveMaximum: 1000 },
        x: { type: "number", maximum: 999 }
      })
    )
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.parts.filter((p) => "slot" in p)).toEqual([
      { slot: true, number: "integer", digits: 15, signed: true },
      { slot: true, number: "integer", digits: 3, signed: true },
      { slot: true, number: "number", digits: 2, signed: true }
    ])
    const laid = layOut(skeleton, 8, tokenizer)
    const runs: Array<number> = []
    laid.template.forEach((t, i) => {
      if (t === -1 && laid.template[i - 1] !== -1) runs.push(0)
      if (t === -1) runs[runs.length - 1]!++
    })
    expect(runs).toEqual([8, 3, 2])
  })

  it("takes a minus sign first where no lower bound can be broken: none, or one whose digits hold the upper bound's", () => {
    const signedOf = (node: Record<string, unknown>) => {
      const skeleton = skeletonOf(object({ n: node }))
      if (isRefusal(skeleton)) throw new Error(skeleton.message)
      return skeleton.parts.some((p) => "slot" in p && p.signed === true)
    }
    expect(signedOf({ type: "number" })).toBe(true)
    expect(signedOf({ type: "integer", maximum: 500 })).toBe(true)
    expect(signedOf({ type: "integer", minimum: -999, maximum: 999 })).toBe(true)
    expect(signedOf({ type: "integer", minimum: -99, maximum: 999 })).toBe(false)
    expect(signedOf({ type: "integer", minimum: -1000 })).toBe(false)
    expect(signedOf({ type: "integer", minimum: 0 })).toBe(false)
    expect(signedOf({ type: "integer", minimum: 0, exclusiveMinimum: -1000, maximum: 99 })).toBe(false)
    expect(signedOf({ type: "number", exclusiveMinimum: -1000, maximum: 999 })).toBe(true)

    const skeleton = skeletonOf(object({ n: { type: "integer" } }))
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 4, tokenizer)
    const slot = laid.template.flatMap((t, i) => (t === -1 ? [i] : []))
    const first = laid.allowedSets[laid.positionAllowed[slot[0]!]!]!
    const minus = tokenizer.encode("-", { addSpecialTokens: false })
    expect(minus).toHaveLength(1)
    expect(first).toContain(minus[0])
    expect([...first].sort((a, b) => a - b)).toEqual(first)
    for (const id of first) expect(tokenizer.decode([id])).toMatch(/^-?[0-9]*$/)
    // The sign only first.
    for (const position of slot.slice(1)) expect(laid.allowedSets[laid.positionAllowed[position]!]).not.toContain(minus[0])
    const eos = tokenizer.specialTokens.eos
    const read = (text: string) => {
      const tokens = [...tokenizer.encode(text, { addSpecialTokens: false })]
      while (tokens.length < 4) tokens.push(eos)
      let v = 0
      return JSON.parse(laid.render(laid.template.map((t) => (t === -1 ? tokens[v++]! : t)))).n
    }
    expect(read("-42")).toBe(-42)
    expect(read("-007")).toBe(-7)
    expect(read("-")).toBe(0)
    expect(Object.is(read("-0"), 0)).toBe(true)
  })

  it("reads a number back as JSON: its leading number, without leading zeros", () => {
    const skeleton = skeletonOf(object({ n: { type: "integer" }, x: { type: "number" } }))
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const width = 8
    const laid = layOut(skeleton, width, tokenizer)
    const eos = tokenizer.specialTokens.eos
    const encode = (text: string) => tokenizer.encode(text, { addSpecialTokens: false })
    const padded = (tokens: ReadonlyArray<number>) => [...tokens, ...new Array<number>(width - tokens.length).fill(eos)]
    const fill = (a: ReadonlyArray<number>, b: ReadonlyArray<number>) => {
      const values = [...padded(a), ...padded(b)]
      let v = 0
      return laid.template.map((t) => (t === -1 ? values[v++]! : t))
    }
    expect(JSON.parse(laid.render(fill(encode("007"), encode("12.50"))))).toEqual({ n: 7, x: 12.5 })
    expect(JSON.parse(laid.render(fill(encode("42"), encode("3."))))).toEqual({ n: 42, x: 3 })
    // Up to the first end token; a second point ends the number.
    expect(JSON.parse(laid.render(fill([...encode("5"), eos, ...encode("9")], encode("1.5.2"))))).toEqual({ n: 5, x: 1.5 })
  })
})

describe("layOut", () => {
  const schema = object({ name: { type: "string" }, house: object({ seat: { type: "string" } }) })

  it("puts the skeleton's tokens on the canvas and leaves slotTokens masks per value", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 5, tokenizer)
    const open = laid.template.flatMap((token, i) => (token === -1 ? [i] : []))
    expect(open).toHaveLength(10)
    // Two runs of 5 masks.
    expect(open[4]! - open[0]!).toBe(4)
    expect(open[9]! - open[5]!).toBe(4)
    const fixed = laid.template.filter((token) => token !== -1)
    expect(tokenizer.decode(fixed)).toBe(`{"name": "", "house": {"seat": ""}}`)
  })

  it("reads any slot contents back as JSON with the schema's keys", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 6, tokenizer)
    const special = tokenizer.specialTokens
    const awkward = ['"', "\\", "\n", "}", '{"a":', " \t"].map((text) => tokenizer.encode(text, { addSpecialTokens: false })[0]!)
    const token = fc.oneof(fc.integer({ min: 0, max: tokenizer.vocabSize - 1 }), fc.constantFrom(special.eos, special.mask, ...awkward))
    fc.assert(
      fc.property(fc.array(token, { minLength: 12, maxLength: 12 }), (values) => {
        let v = 0
        const canvas = laid.template.map((t) => (t === -1 ? values[v++]! : t))
        const parsed = JSON.parse(laid.render(canvas))
        expect(Object.keys(parsed)).toEqual(["name", "house"])
        expect(Object.keys(parsed.house)).toEqual(["seat"])
        expect(typeof parsed.name).toBe("string")
        expect(typeof parsed.house.seat).toBe("string")
        // Whitespace folded and trimmed, special tokens left out.
        expect(parsed.name).toBe(parsed.name.trim())
        expect(parsed.name).not.toMatch(/\s\s|\n|<\|/)
      }),
      { numRuns: 300 }
    )
  })

  it("ends a value at the model's end token: what follows it (a made-up next turn) is not the value", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 6, tokenizer)
    const words = (text: string) => tokenizer.encode(text, { addSpecialTokens: false })
    const special = tokenizer.specialTokens
    const eot = Option.getOrThrow(special.eot)
    const name = [...words(" Good"), eot, ...words(" user Why")].slice(0, 6)
    const seat = [...words(" York"), special.eos, ...words(" and more")].slice(0, 6)
    while (name.length < 6) name.push(special.mask)
    while (seat.length < 6) seat.push(special.mask)
    const values = [...name, ...seat]
    let v = 0
    const canvas = laid.template.map((t) => (t === -1 ? values[v++]! : t))
    expect(JSON.parse(laid.render(canvas))).toEqual({ name: "Good", house: { seat: "York" } })
  })
})

describe("schemas as libraries write them: $defs and $ref, unions, nullable values", () => {
  // Pydantic's shape: definitions in $defs, fields that point at them, Optional fields as anyOf with null,
  // Literal unions as anyOf of consts (zod writes those too), titles and defaults everywhere.
  const place = { title: "Place", type: "object", properties: { city: { title: "City", type: "string" } }, required: ["city"] }
  const schema = {
    title: "Plan",
    type: "object",
    $defs: { Place: place, Mood: { title: "Mood", type: "string", enum: ["merry", "sad"] } },
    properties: {
      home: { $ref: "#/$defs/Place" },
      away: { $ref: "#/$defs/Place", description: "where they go" },
      mood: { $ref: "#/$defs/Mood" },
      note: { anyOf: [{ type: "string" }, { type: "null" }], default: null, title: "Note" },
      seat: { anyOf: [{ $ref: "#/$defs/Place" }, { type: "null" }] },
      kind: {
        anyOf: [
          { type: "string", const: "war" },
          { type: "string", const: "peace" }
        ]
      },
      either: { oneOf: [{ const: "a" }, { type: "null" }] },
      ok: { type: ["boolean", "null"] },
      nothing: { type: "null" },
      wrapped: { allOf: [{ $ref: "#/definitions/Old" }], description: "an older style" }
    },
    definitions: { Old: place },
    required: ["home", "away"]
  }

  it("follows $ref, lays a nullable value out as its shape, and chooses among a union's known values", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.slots).toBe(5)
    expect(skeleton.parts).toEqual([
      { fixed: `{"home": {"city": "` },
      { slot: true },
      { fixed: `"}, "away": {"city": "` },
      { slot: true },
      { fixed: `"}, "mood": ` },
      { choice: [`"merry"`, `"sad"`] },
      { fixed: `, "note": "` },
      { slot: true },
      { fixed: `", "seat": {"city": "` },
      { slot: true },
      { fixed: `"}, "kind": ` },
      { choice: [`"war"`, `"peace"`] },
      { fixed: `, "either": ` },
      { choice: [`"a"`, "null"] },
      { fixed: `, "ok": ` },
      { choice: ["true", "false", "null"] },
      { fixed: `, "nothing": null, "wrapped": {"city": "` },
      { slot: true },
      { fixed: `"}}` }
    ])
  })

  it("follows JSON pointers with escapes, and a definition used twice is laid out twice", () => {
    const skeleton = skeletonOf(
      object(
        { a: { $ref: "#/$defs/a~1b" }, b: { $ref: "#/$defs/a~1b" }, c: { $ref: "#/properties/a" } },
        { $defs: { "a/b": { const: 1 } } }
      )
    )
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.parts).toEqual([{ fixed: `{"a": 1, "b": 1, "c": 1}` }])
  })
})

describe("tuples", () => {
  it("lays each item of a tuple out in its place: prefixItems (2020-12, zod's z.tuple) or a list of items (draft 7)", () => {
    for (const tuple of [
      { type: "array", prefixItems: [{ type: "string" }, { type: "integer" }], items: false },
      { type: "array", items: [{ type: "string" }, { type: "integer" }] },
      { type: "array", prefixItems: [{ type: "string" }, { type: "integer" }], minItems: 2, maxItems: 2 }
    ]) {
      const skeleton = skeletonOf(object({ p: tuple }))
      if (isRefusal(skeleton)) throw new Error(skeleton.message)
      expect(skeleton.parts).toEqual([
        { fixed: `{"p": ["` },
        { slot: true },
        { fixed: `", ` },
        { slot: true, number: "integer", signed: true },
        { fixed: "]}" }
      ])
    }
  })

  it.each([
    [
      "items after its own",
      { type: "array", prefixItems: [{ type: "string" }], items: { type: "string" } },
      "schema.properties.p.items",
      /after its own/
    ],
    ["an empty tuple", { type: "array", prefixItems: [] }, "schema.properties.p.prefixItems", /1 to 16 items/],
    [
      "minItems above its length",
      { type: "array", prefixItems: [{ type: "string" }], minItems: 2 },
      "schema.properties.p.minItems",
      /above the tuple's length/
    ],
    ["prefixItems not a list", { type: "array", prefixItems: { type: "string" } }, "schema.properties.p.prefixItems", /list of schemas/]
  ])("refuses a tuple with %s", (_, tuple, path, reason) => {
    const refusal = skeletonOf(object({ p: tuple }))
    expect(isRefusal(refusal)).toBe(true)
    if (!isRefusal(refusal)) return
    expect(refusal.path).toBe(path)
    expect(refusal.message).toMatch(reason)
  })
})

describe("string lengths", () => {
  const schema = object({
    motto: { type: "string", minLength: 3, maxLength: 5 },
    long: { type: "string", minLength: 12 },
    none: { type: "string", maxLength: 0 }
  })

  it("a maxLength caps the slot and cuts the text read back; a minLength widens it and keeps its first positions visible", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    expect(skeleton.parts).toEqual([
      { fixed: `{"motto": "` },
      { slot: true, minChars: 3, maxChars: 5 },
      { fixed: `", "long": "` },
      { slot: true, minChars: 12 },
      { fixed: `", "none": ""}` }
    ])
    const laid = layOut(skeleton, 8, tokenizer)
    const open = laid.template.flatMap((token, i) => (token === -1 ? [i] : []))
    expect(open).toHaveLength(5 + 12)
    // The first 3 of motto's and the 12 of long's positions take one set: tokens that write a visible character.
    const restricted = open.filter((i) => (laid.positionAllowed[i] ?? -1) !== -1)
    expect(restricted).toEqual([...open.slice(0, 3), ...open.slice(5)])
    expect(new Set(restricted.map((i) => laid.positionAllowed[i]))).toEqual(new Set([0]))
    const visible = laid.allowedSets[0]!
    const special = tokenizer.specialTokens
    for (const id of [special.eos, special.mask, Option.getOrThrow(special.eot), ...tokenizer.encode(" \n", { addSpecialTokens: false })]) {
      expect(visible).not.toContain(id)
    }
    for (const id of visible) expect(tokenizer.decode([id], { skipSpecialTokens: true }).trim().length).toBeGreaterThan(0)
    expect(visible.length).toBeGreaterThan(tokenizer.vocabSize / 2)
  })

  it("reads any contents back within the bounds: at least minLength when its first positions are visible tokens, at most maxLength", () => {
    const skeleton = skeletonOf(schema)
    if (isRefusal(skeleton)) throw new Error(skeleton.message)
    const laid = layOut(skeleton, 8, tokenizer)
    const visible = laid.allowedSets[0]!
    const special = tokenizer.specialTokens
    const any = fc.oneof(fc.integer({ min: 0, max: tokenizer.vocabSize - 1 }), fc.constantFrom(special.eos, special.mask))
    const open = laid.template.flatMap((token, i) => (token === -1 ? [i] : []))
    fc.assert(
      fc.property(
        fc.array(any, { minLength: 17, maxLength: 17 }),
        fc.array(fc.constantFrom(...visible), { minLength: 17, maxLength: 17 }),
        (free, kept) => {
          const canvas = [...laid.template]
          open.forEach((position, k) => {
            canvas[position] = (laid.positionAllowed[position] ?? -1) === -1 ? free[k]! : kept[k]!
          })
          const parsed = JSON.parse(laid.render(canvas)) as { motto: string; long: string; none: string }
          expect(parsed.motto.length).toBeGreaterThanOrEqual(3)
          expect(parsed.motto.length).toBeLessThanOrEqual(5)
          expect(parsed.long.length).toBeGreaterThanOrEqual(12)
          expect(parsed.none).toBe("")
        }
      ),
      { numRuns: 200 }
    )
  })
})
