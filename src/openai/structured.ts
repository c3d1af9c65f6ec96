/**
 * Structured output, diffusion's way: `response_format: {type: "json_schema", json_schema: {schema}}`.
 *
 * A masked diffusion model does not write left to right: it fills masked positions of a canvas in any
 * order, around whatever is already there. So the JSON skeleton of the answer — braces, keys, quotes,
 * colons and commas — is tokenized and put on the canvas from the start (the engine's `template`), and
 * the model denoises only the values, each in a slot of a fixed number of tokens, in place. No grammar:
 * the structure cannot come out wrong because the model never writes it.
 *
 * What a template can honour: an object with known keys (`properties`), whose values are strings (a slot
 * each), numbers (a slot without quotes whose positions the engine keeps to digits, a minus sign first where
 * no lower bound can be broken: positionAllowed),
 * nested objects of the same kind, fixed values (`const`, a one-value `enum`), and booleans and enums: a
 * region as wide as the longest value plus one, whose value is chosen before denoising by scoring each in
 * place (chains.ts) and padded with spaces. Every property is written, in schema order. A slot's text is
 * read back up to its first end token (EOS, end of turn), with special tokens left out, whitespace runs
 * folded to one space and trimmed, and JSON-escaped (a number's as its leading number), so the reply always
 * parses and matches the schema. Arrays are laid out at maxItems; a list of strings or numbers drops the
 * items the model left empty. A string's maxLength narrows its slot and cuts what is read back; its minLength keeps
 * that many first positions to tokens that write a visible character.
 *
 * Schemas as libraries write them: local `$ref`s are followed (Pydantic's `$defs`, `definitions`, any JSON
 * pointer; a recursive one is refused), `allOf` of one schema is that schema, a union (`anyOf`, `oneOf`,
 * a list of types) of one shape and null is laid out as the shape (null is never written, which the
 * schema allows), and a union of known values only (consts, enums, booleans, null) is chosen among them.
 * What cannot be honoured is refused (400) with the reason and the place: arrays without maxItems (or of
 * varying length with items other than strings and numbers), unions of several shapes, string formats and
 * patterns, and bounds digits cannot keep.
 */
import { Effect, Option } from "effect"
import { BadRequest } from "../api/errors.js"
import { Tokenizer, type TokenizerShape } from "../tokenizer/Tokenizer.js"
import type { ResponseFormat } from "./protocol.js"
import { MAX_CHOICE_CANVASES, MAX_CHOICES, type TemplateChoice, templateCanvasCount } from "./chains.js"
import { NOT_COMMITTED } from "./ChoiceDecoder.js"
import { spacedJson } from "../chat/ChatFormatter.js"

/**
 * Tokens per string value when the request gives no answer length; with one, the slots share evenly what
 * the skeleton leaves of it.
 */
export const DEFAULT_SLOT_TOKENS = 8

/** A piece of the answer: fixed JSON text, the slot of a string value, or a value chosen among known ones (their JSON text). */
type Part =
  | { readonly fixed: string }
  | {
      readonly slot: true
      readonly number?: NumberKind
      readonly digits?: number
      /** A number without a lower bound: its first position may take a minus sign. */
      readonly signed?: boolean
      /** An item of a list of varying length: the number's first position may end it (read back as null, dropped). */
      readonly optional?: boolean
      /** A string's minLength: its first minChars positions take only tokens that write a visible character. */
      readonly minChars?: number
      /** A string's maxLength: the slot is no wider, and the text read back is cut to it. */
      readonly maxChars?: number
    }
  | { readonly choice: ReadonlyArray<string> }

/** A number slot's kind: digits only, or digits with one decimal point. */
type NumberKind = "integer" | "number"

/** Why a schema cannot be honoured, and where in it. */
export interface SchemaRefusal {
  readonly message: string
  readonly path: string
}

/** The skeleton of a schema: fixed text, slots and choices, in order (adjacent fixed pieces merged). */
export interface Skeleton {
  readonly parts: ReadonlyArray<Part>
  /** Slots: string and number values (choices not counted). */
  readonly slots: number
  /**
   * Arrays of strings or numbers laid out at their longest (maxItems slots): where each is (its keys from
   * the top) and the fewest items it keeps. Read back, the items the model left empty are dropped down to
   * that fewest.
   */
  readonly lists?: ReadonlyArray<ShortenableList>
}

/** An array of strings or numbers of minItems to maxItems items, at `keys` in the answer. */
interface ShortenableList {
  readonly keys: ReadonlyArray<string | number>
  readonly min: number
}

/** The most items an array may be laid out with. */
const MAX_ARRAY_ITEMS = 16

/** Keys that describe a value without constraining it, taken on any node (`$defs` holds what `$ref` names). */
const ANNOTATION_KEYS = new Set([
  "title",
  "description",
  "default",
  "examples",
  "deprecated",
  "readOnly",
  "writeOnly",
  "$comment",
  "$schema",
  "$id",
  "$defs",
  "definitions"
])
const KNOWN_ARRAY_KEYS = new Set(["type", "items", "minItems", "maxItems", "prefixItems", "additionalItems"])
const KNOWN_OBJECT_KEYS = new Set(["type", "properties", "required", "additionalProperties", "strict"])
const KNOWN_STRING_KEYS = new Set(["type", "minLength", "maxLength"])
const KNOWN_CHOICE_KEYS = new Set(["type", "enum"])
const KNOWN_BOOLEAN_KEYS = new Set(["type"])
const STRING_CONSTRAINTS = ["format", "pattern"] as const
const KNOWN_NUMBER_KEYS = new Set(["type", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"])
/** Whether `key` may stand on a node of the kind whose own keys are `known`. */
const takes = (known: ReadonlySet<string>, key: string) => known.has(key) || ANNOTATION_KEYS.has(key)
/** The most values an integer range (minimum to maximum) may hold to be chosen among them. */
const MAX_RANGE_VALUES = 64

/**
 * The most digits a value may have to stay under an upper bound: an integer of d digits is at most
 * 10^d - 1, a number's integer part of d digits below 10^d.
 */
const digitsUnder = (bound: number, exclusive: boolean, kind: NumberKind): number => {
  const fits = (d: number) => {
    const top = kind === "integer" ? 10 ** d - 1 : 10 ** d
    return exclusive && kind === "integer" ? top < bound : top <= bound
  }
  let d = 0
  while (d < 400 && fits(d + 1)) d++
  return d
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === "object" && value !== null && !Array.isArray(value)

const typesOf = (schema: Record<string, unknown>): ReadonlyArray<unknown> =>
  schema["type"] === undefined ? [] : Array.isArray(schema["type"]) ? schema["type"] : [schema["type"]]

const TOP_OBJECT = 'the answer must be an object with known keys: give the schema type "object" and its properties'

/**
 * What a local `$ref` points to ("#", "#/$defs/Name", any JSON pointer into the schema) and its path for
 * errors ("schema.$defs.Name"); undefined when it names nothing there.
 */
const pointed = (root: unknown, ref: string): { readonly node: unknown; readonly path: string } | undefined => {
  if (ref !== "#" && !ref.startsWith("#/")) return undefined
  let node = root
  let path = "schema"
  for (const raw of ref === "#" ? [] : ref.slice(2).split("/")) {
    let segment: string
    try {
      segment = decodeURIComponent(raw).replace(/~1/g, "/").replace(/~0/g, "~")
    } catch {
      return undefined
    }
    if (Array.isArray(node) && /^(0|[1-9][0-9]*)$/.test(segment)) {
      node = node[Number(segment)]
      path += `[${segment}]`
    } else if (isObject(node) && Object.hasOwn(node, segment)) {
      node = node[segment]
      path += `.${segment}`
    } else return undefined
  }
  return node === undefined ? undefined : { node, path }
}

/**
 * The JSON texts of the values a schema allows when it allows only known ones (a const, an enum, a
 * boolean, null), else undefined: what a union of such schemas chooses among.
 */
const valuesOnly = (node: unknown): ReadonlyArray<string> | undefined => {
  if (!isObject(node)) return undefined
  if ("const" in node) return [JSON.stringify(node["const"])]
  if (Array.isArray(node["enum"])) return node["enum"].map((value) => JSON.stringify(value))
  const types = typesOf(node)
  if (types.length === 0 || !types.every((type) => type === "boolean" || type === "null")) return undefined
  if (Object.keys(node).some((key) => key !== "type" && !ANNOTATION_KEYS.has(key))) return undefined
  return types.flatMap((type) => (type === "boolean" ? ["true", "false"] : ["null"]))
}

/**
 * The skeleton of a JSON schema, or why a template cannot honour it. `path` names the place in the
 * schema for the error message ("schema.properties.name").
 */
export const skeletonOf = (schema: unknown): Skeleton | SchemaRefusal => {
  const parts: Array<Part> = []
  let slots = 0
  const fixed = (text: string) => {
    const last = parts[parts.length - 1]
    if (last !== undefined && "fixed" in last) parts[parts.length - 1] = { fixed: last.fixed + text }
    else parts.push({ fixed: text })
  }
  const refuse = (path: string, message: string): SchemaRefusal => ({ path, message })
  const lists: Array<ShortenableList> = []

  // The references being laid out, outermost first ("#" is the schema itself): one met again is recursion.
  const expanding: Array<string> = ["#"]
  /** A node with its `$ref`s followed: the schema it stands for, where that is, and the references taken. */
  const follow = (
    start: unknown,
    startPath: string
  ): { readonly node: unknown; readonly path: string; readonly refs: ReadonlyArray<string> } | SchemaRefusal => {
    let node = start
    let path = startPath
    const refs: Array<string> = []
    while (isObject(node) && "$ref" in node) {
      const ref = node["$ref"]
      const beside = Object.keys(node).find((key) => key !== "$ref" && !ANNOTATION_KEYS.has(key))
      if (beside !== undefined) return refuse(`${path}.${beside}`, `${beside} beside $ref is not supported: give it in the definition`)
      if (typeof ref !== "string") return refuse(`${path}.$ref`, "$ref must be a string")
      if (expanding.includes(ref) || refs.includes(ref)) {
        return refuse(
          `${path}.$ref`,
          `$ref ${JSON.stringify(ref)} is recursive: the answer's JSON skeleton is fixed before denoising, so it cannot nest without end`
        )
      }
      const target = pointed(schema, ref)
      if (target === undefined) {
        return refuse(
          `${path}.$ref`,
          `$ref ${JSON.stringify(ref)} names nothing in this schema: only references within it ("#/$defs/Name", "#/definitions/Name") are followed`
        )
      }
      refs.push(ref)
      node = target.node
      path = target.path
    }
    return { node, path, refs }
  }
  /** A value chosen among known ones (their JSON texts): fixed when there is one. */
  const choose = (texts: ReadonlyArray<string>, path: string): SchemaRefusal | undefined => {
    const distinct = [...new Set(texts)]
    if (distinct.length === 0) return refuse(path, "the value has no value to take: list at least one")
    if (distinct.length > MAX_CHOICES)
      return refuse(path, `a value may be chosen among at most ${MAX_CHOICES} values, got ${distinct.length}`)
    if (distinct.length === 1) fixed(distinct[0]!)
    else parts.push({ choice: distinct })
    return undefined
  }

  /** A schema's type when it is a plain value (string, integer, number; through $ref, allOf of one, a nullable union), else undefined. */
  const valueKind = (start: unknown): string | undefined => {
    const followed = follow(start, "")
    if (isRefusal(followed) || !isObject(followed.node)) return undefined
    const node = followed.node
    if (Array.isArray(node["allOf"]) && node["allOf"].length === 1) return valueKind(node["allOf"][0])
    for (const union of ["anyOf", "oneOf"]) {
      const branches = node[union]
      if (!Array.isArray(branches)) continue
      const shaped = branches.filter((branch) => !(isObject(branch) && typesOf(branch).length === 1 && typesOf(branch)[0] === "null"))
      return shaped.length === 1 ? valueKind(shaped[0]) : undefined
    }
    const shapes = typesOf(node).filter((type) => type !== "null")
    return shapes.length === 1 && ["string", "integer", "number"].includes(shapes[0] as string) ? (shapes[0] as string) : undefined
  }

  const walk = (node: unknown, path: string, top: boolean, keys: ReadonlyArray<string | number> = []): SchemaRefusal | undefined => {
    const followed = follow(node, path)
    if (isRefusal(followed)) return followed
    expanding.push(...followed.refs)
    const refusal = place(followed.node, followed.path, top, keys)
    expanding.length -= followed.refs.length
    return refusal
  }

  const place = (node: unknown, path: string, top: boolean, keys: ReadonlyArray<string | number>): SchemaRefusal | undefined => {
    if (!isObject(node)) return refuse(path, "a schema must be a JSON object")
    if ("allOf" in node) {
      const all = node["allOf"]
      if (!Array.isArray(all) || all.length !== 1) {
        return refuse(`${path}.allOf`, "allOf is supported with one schema only: give the value's schema in one piece")
      }
      const beside = Object.keys(node).find((key) => key !== "allOf" && !ANNOTATION_KEYS.has(key))
      if (beside !== undefined) return refuse(`${path}.${beside}`, `${beside} beside allOf is not supported: give it inside`)
      return walk(all[0], `${path}.allOf[0]`, top, keys)
    }
    for (const union of ["anyOf", "oneOf"] as const) {
      if (!(union in node)) continue
      const branches = node[union]
      if (!Array.isArray(branches) || branches.length === 0) return refuse(`${path}.${union}`, `${union} must list at least one schema`)
      const beside = Object.keys(node).find((key) => key !== union && !ANNOTATION_KEYS.has(key))
      if (beside !== undefined) return refuse(`${path}.${beside}`, `${beside} beside ${union} is not supported: give it in each schema`)
      const values: Array<ReadonlyArray<string> | undefined> = []
      for (const [i, branch] of branches.entries()) {
        const followed = follow(branch, `${path}.${union}[${i}]`)
        if (isRefusal(followed)) return followed
        values.push(valuesOnly(followed.node))
      }
      // Known values only (consts, enums, booleans, null): chosen among all of them.
      if (values.every((texts) => texts !== undefined)) {
        if (top) return refuse(path, TOP_OBJECT)
        return choose(values.flat() as Array<string>, `${path}.${union}`)
      }
      // One shape, or null: the shape is laid out (null is never written, and the value is always valid).
      const shaped = values.flatMap((texts, i) => (texts?.every((text) => text === "null") ? [] : [i]))
      if (shaped.length === 1) return walk(branches[shaped[0]!], `${path}.${union}[${shaped[0]}]`, top, keys)
      return refuse(
        path,
        `${union} of ${shaped.length} shapes is not supported: the answer's JSON skeleton is fixed before denoising, so a ` +
          "value may be one shape or null (the shape is laid out), or known values (chosen among)"
      )
    }
    if (top && !(typesOf(node).length === 1 && typesOf(node)[0] === "object")) return refuse(path, TOP_OBJECT)
    if ("const" in node) {
      fixed(JSON.stringify(node["const"]))
      return undefined
    }
    if ("enum" in node) {
      const values = node["enum"]
      if (!Array.isArray(values) || values.length === 0) return refuse(`${path}.enum`, "enum must list at least one value")
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_CHOICE_KEYS, key)) return refuse(`${path}.${key}`, `${key} is not supported with enum`)
      }
      return choose(
        values.map((value) => JSON.stringify(value)),
        `${path}.enum`
      )
    }
    for (const combinator of ["not", "if"]) {
      if (combinator in node) {
        return refuse(
          path,
          `${combinator} is not supported: the answer's JSON skeleton is fixed before denoising, so every value's shape must be known`
        )
      }
    }
    const types = typesOf(node)
    // A nullable value is laid out as its type: it is always written, which the schema allows.
    const shapes = types.filter((type) => type !== "null")
    if (types.length > 0 && shapes.length === 0) {
      const beside = Object.keys(node).find((key) => key !== "type" && !ANNOTATION_KEYS.has(key))
      if (beside !== undefined) return refuse(`${path}.${beside}`, `${beside} is not supported on null`)
      fixed("null")
      return undefined
    }
    if (shapes.length !== 1) {
      return refuse(
        path,
        types.length === 0
          ? "each value needs a `type` (object or string), a `const` or a one-value `enum`"
          : "a value must have one type (or one and null): the skeleton is fixed before denoising"
      )
    }
    const nullable = shapes.length < types.length
    const type = shapes[0]
    if (type === "integer" || type === "number") {
      const { minimum, maximum } = node
      // A small integer range is an enum: chosen among its values.
      if (
        type === "integer" &&
        Number.isInteger(minimum) &&
        Number.isInteger(maximum) &&
        Object.keys(node).every((k) => k !== "multipleOf")
      ) {
        const low = minimum as number
        const high = maximum as number
        if (high < low) return refuse(`${path}.maximum`, "maximum is below minimum")
        if (high - low + 1 <= MAX_RANGE_VALUES) {
          const values = Array.from({ length: high - low + 1 }, (_, i) => String(low + i))
          if (values.length === 1) fixed(values[0]!)
          else parts.push({ choice: values })
          return undefined
        }
      }
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_NUMBER_KEYS, key)) {
          return refuse(
            `${path}.${key}`,
            `${key} is not supported on ${type === "integer" ? "an integer" : "a number"}: its slot takes digits` +
              (type === "integer"
                ? ` (an integer range of at most ${MAX_RANGE_VALUES} values, minimum to maximum, is chosen among its values)`
                : "")
          )
        }
      }
      // The value is written as digits, negative (a minus sign first) only where no lower bound can be
      // broken by it (below); so a minimum above 0 could be broken.
      for (const bound of ["minimum", "exclusiveMinimum"] as const) {
        const value = node[bound]
        if (value !== undefined && !(typeof value === "number" && value < 0) && !(bound === "minimum" && value === 0)) {
          return refuse(
            `${path}.${bound}`,
            `${bound} ${JSON.stringify(value)} is not supported: a number slot takes digits, which may be 0`
          )
        }
      }
      // An upper bound is kept by the number of digits: at most `digits`, each value is below it.
      let digits: number | undefined
      for (const bound of ["maximum", "exclusiveMaximum"] as const) {
        const value = node[bound]
        if (value === undefined) continue
        if (typeof value !== "number" || !Number.isFinite(value)) return refuse(`${path}.${bound}`, `${bound} must be a number`)
        const d = digitsUnder(value, bound === "exclusiveMaximum", type)
        if (d < 1) {
          return refuse(
            `${path}.${bound}`,
            `${bound} ${value} is not supported: a number slot takes digits, and one digit may break it` +
              (type === "integer" ? ` (give a minimum too: a range of at most ${MAX_RANGE_VALUES} values is chosen among them)` : "")
          )
        }
        digits = Math.min(digits ?? d, d)
      }
      // Negative values: without a lower bound, or with one whose digits hold as many as the upper bound's
      // (zod's .int() bounds, ±(2^53 - 1), both leave 15).
      let signed = node["minimum"] === undefined && node["exclusiveMinimum"] === undefined
      if (!signed && digits !== undefined) {
        const lows = (["minimum", "exclusiveMinimum"] as const).flatMap((bound) => {
          const value = node[bound]
          if (value === undefined) return []
          return [typeof value === "number" && value < 0 ? digitsUnder(-value, bound === "exclusiveMinimum", type) : -1]
        })
        signed = lows.length > 0 && Math.min(...lows) >= digits
      }
      parts.push({ slot: true, number: type, ...(digits === undefined ? {} : { digits }), ...(signed ? { signed } : {}) })
      slots++
      return undefined
    }
    if (type === "boolean") {
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_BOOLEAN_KEYS, key)) return refuse(`${path}.${key}`, `${key} is not supported on a boolean`)
      }
      parts.push({ choice: nullable ? ["true", "false", "null"] : ["true", "false"] })
      return undefined
    }
    if (type === "object") {
      const properties = node["properties"]
      if (!isObject(properties) || Object.keys(properties).length === 0) {
        return refuse(path, "an object needs its keys in `properties`: only objects with known keys can be laid out on the canvas")
      }
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_OBJECT_KEYS, key)) return refuse(`${path}.${key}`, `${key} is not supported on an object`)
      }
      if (isObject(node["additionalProperties"])) {
        return refuse(`${path}.additionalProperties`, "additionalProperties with a schema is not supported: only known keys are written")
      }
      const required = node["required"]
      if (required !== undefined) {
        if (!Array.isArray(required)) return refuse(`${path}.required`, "required must be a list of keys")
        const missing = required.find((key) => typeof key !== "string" || !Object.hasOwn(properties, key))
        if (missing !== undefined) {
          return refuse(`${path}.required`, `required names ${JSON.stringify(missing)}, which is not in properties`)
        }
      }
      fixed("{")
      let first = true
      for (const [key, value] of Object.entries(properties)) {
        fixed(`${first ? "" : ", "}${JSON.stringify(key)}: `)
        first = false
        const refusal = walk(value, `${path}.properties.${key}`, false, [...keys, key])
        if (refusal !== undefined) return refusal
      }
      fixed("}")
      return undefined
    }
    if (type === "array") {
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_ARRAY_KEYS, key)) return refuse(`${path}.${key}`, `${key} is not supported on an array`)
      }
      // A tuple (prefixItems, or draft 7's list of items): each item laid out in its place, no item after them.
      if ("prefixItems" in node && !Array.isArray(node["prefixItems"]))
        return refuse(`${path}.prefixItems`, "prefixItems must be a list of schemas")
      const tuple = Array.isArray(node["prefixItems"]) ? "prefixItems" : Array.isArray(node["items"]) ? "items" : undefined
      if (tuple !== undefined) {
        const places = node[tuple] as ReadonlyArray<unknown>
        const after = tuple === "prefixItems" ? node["items"] : node["additionalItems"]
        if (after !== undefined && after !== false && node["maxItems"] !== places.length) {
          return refuse(
            `${path}.${tuple === "prefixItems" ? "items" : "additionalItems"}`,
            "a tuple's items after its own are not supported: give items false or maxItems equal to its length"
          )
        }
        if (places.length === 0 || places.length > MAX_ARRAY_ITEMS)
          return refuse(`${path}.${tuple}`, `a tuple may have 1 to ${MAX_ARRAY_ITEMS} items`)
        const { minItems } = node
        if (minItems !== undefined && !(Number.isInteger(minItems) && (minItems as number) <= places.length)) {
          return refuse(`${path}.minItems`, "minItems above the tuple's length is not supported")
        }
        fixed("[")
        for (const [i, place] of places.entries()) {
          if (i > 0) fixed(", ")
          const refusal = walk(place, `${path}.${tuple}[${i}]`, false, [...keys, i])
          if (refusal !== undefined) return refusal
        }
        fixed("]")
        return undefined
      }
      const { items, minItems = 0, maxItems } = node
      if (!isObject(items)) return refuse(`${path}.items`, "an array needs the schema of its items in `items`")
      if (!Number.isInteger(minItems) || (minItems as number) < 0) return refuse(`${path}.minItems`, "minItems must be an integer >= 0")
      if (maxItems === undefined) {
        return refuse(path, "an array needs maxItems: its items are laid out on the canvas before denoising, at most that many")
      }
      if (!Number.isInteger(maxItems) || (maxItems as number) < (minItems as number) || (maxItems as number) > MAX_ARRAY_ITEMS) {
        return refuse(`${path}.maxItems`, `maxItems must be an integer from minItems to ${MAX_ARRAY_ITEMS}`)
      }
      const min = minItems as number
      const max = maxItems as number
      fixed("[")
      // Each item's parts: with fewer items than the most, each must be one value the model may leave empty.
      const itemSlots: Array<ReadonlyArray<number>> = []
      for (let i = 0; i < max; i++) {
        if (i > 0) fixed(", ")
        const from = parts.length
        const refusal = walk(items, `${path}.items`, false, [...keys, i])
        if (refusal !== undefined) return refusal
        itemSlots.push(parts.flatMap((part, at) => (at >= from && !("fixed" in part) ? [at] : [])))
      }
      fixed("]")
      if (min < max) {
        // Fewer items than the most: strings and numbers, whose slots the model may leave empty, are dropped
        // when empty; a number slot's first position then takes an end token too.
        const droppable = valueKind(items) !== undefined && itemSlots.every((at) => at.length === 1 && "slot" in parts[at[0]!]!)
        if (!droppable) {
          return refuse(
            `${path}.minItems`,
            "an array of a varying number of items is laid out at its longest and its empty items dropped, so its " +
              "items must be strings or numbers; give minItems equal to maxItems for other items"
          )
        }
        for (const [at] of itemSlots) {
          const part = parts[at!]!
          if ("slot" in part && part.number !== undefined) parts[at!] = { ...part, optional: true }
        }
        lists.push({ keys, min })
      }
      return undefined
    }
    if (type === "string") {
      for (const constraint of STRING_CONSTRAINTS) {
        if (constraint in node) {
          return refuse(`${path}.${constraint}`, `${constraint} is not supported: a string value is whatever the model writes in its slot`)
        }
      }
      for (const key of Object.keys(node)) {
        if (!takes(KNOWN_STRING_KEYS, key)) return refuse(`${path}.${key}`, `${key} is not supported on a string`)
      }
      const lengths: { minLength?: number; maxLength?: number } = {}
      for (const bound of ["minLength", "maxLength"] as const) {
        const value = node[bound]
        if (value === undefined) continue
        if (!Number.isInteger(value) || (value as number) < 0) return refuse(`${path}.${bound}`, `${bound} must be an integer >= 0`)
        lengths[bound] = value as number
      }
      const { minLength = 0, maxLength } = lengths
      if (maxLength !== undefined && minLength > maxLength) return refuse(`${path}.minLength`, "minLength is above maxLength")
      if (maxLength === 0) {
        fixed('""')
        return undefined
      }
      fixed('"')
      parts.push({
        slot: true,
        ...(minLength > 0 ? { minChars: minLength } : {}),
        ...(maxLength === undefined ? {} : { maxChars: maxLength })
      })
      slots++
      fixed('"')
      return undefined
    }
    return refuse(
      path,
      `values of type ${JSON.stringify(type)} are not supported: the skeleton is fixed before denoising, ` +
        "so a value's shape must be known (strings, numbers and nested objects are written in place, booleans " +
        "and enums chosen among their values)"
    )
  }

  const refusal = walk(schema, "schema", true)
  return refusal ?? { parts, slots, ...(lists.length === 0 ? {} : { lists }) }
}

export const isRefusal = <A extends object>(value: A | SchemaRefusal): value is SchemaRefusal => "message" in value

/** A skeleton laid out as answer positions: the engine's template and how to read the answer back. */
export interface JsonTemplate {
  /** genLength entries: NOT_COMMITTED (-1) where the model writes or a value is chosen, else the fixed token. */
  readonly template: ReadonlyArray<number>
  readonly slotTokens: number
  /** The values chosen among known ones, scored before denoising (chains.ts), in order. */
  readonly choices: ReadonlyArray<TemplateChoice>
  /** The token that pads a chosen value to its width: a space (-1 when the tokenizer has no single one). */
  readonly pad: number
  /**
   * The tokens number slots may take, by answer position (the engine's positionAllowed and allowedSets):
   * a slot's first position digits only, the rest digits (with a decimal point for "number") or an end token.
   */
  readonly positionAllowed: ReadonlyArray<number>
  readonly allowedSets: ReadonlyArray<ReadonlyArray<number>>
  /** Number slots whose upper bound allows fewer digits (listed) than one token may hold: refused. */
  readonly narrow: ReadonlyArray<number>
  /** The JSON text of a finished answer canvas. */
  readonly render: (canvas: ArrayLike<number>) => string
}

/** What a prompt carries of a laid-out template (PreparedPrompt's `template` and `templateChoices`). */
export const promptTemplate = (laid: JsonTemplate) => ({
  template: laid.template,
  templateChoices: { choices: laid.choices, pad: laid.pad },
  ...(laid.positionAllowed.length === 0
    ? {}
    : { templateAllowed: { positionAllowed: laid.positionAllowed, allowedSets: laid.allowedSets } })
})

/** The tokens of a choice's values, as laid out. */
const valuesOf = (texts: ReadonlyArray<string>, tokenizer: TokenizerShape) =>
  texts.map((text) => ({ text, tokens: tokenizer.encode(text, { addSpecialTokens: false }) }))

/** A choice's width: its longest value's tokens and the pad that ends it. */
const widthOf = (values: ReadonlyArray<{ readonly tokens: ReadonlyArray<number> }>): number =>
  Math.max(...values.map((value) => value.tokens.length)) + 1

/** Positions of the fixed parts and the choices, for sizing the slots before the layout. */
export const fixedTokens = (skeleton: Skeleton, tokenizer: TokenizerShape): number =>
  skeleton.parts.reduce(
    (sum, part) =>
      sum +
      ("fixed" in part
        ? tokenizer.encode(part.fixed, { addSpecialTokens: false }).length
        : "choice" in part
          ? widthOf(valuesOf(part.choice, tokenizer))
          : 0),
    0
  )

/** The token of one space, which pads a chosen value (whitespace JSON allows after a value); -1 if a space is not one token. */
const padToken = (tokenizer: TokenizerShape): number => {
  const tokens = tokenizer.encode(" ", { addSpecialTokens: false })
  return tokens.length === 1 ? tokens[0]! : -1
}

/**
 * The tokens made of digits only, those of digits with one decimal point, and those of a minus sign and
 * digits (or the sign alone), of a tokenizer, with the most digits one of them holds (computed once).
 */
const numberTokens = new WeakMap<
  TokenizerShape,
  {
    readonly digits: ReadonlyArray<number>
    readonly points: ReadonlyArray<number>
    readonly minus: ReadonlyArray<number>
    readonly longest: number
  }
>()
const numberTokensOf = (tokenizer: TokenizerShape) => {
  let found = numberTokens.get(tokenizer)
  if (found === undefined) {
    const digits: Array<number> = []
    const points: Array<number> = []
    const minus: Array<number> = []
    let longest = 1
    for (let id = 0; id < tokenizer.vocabSize; id++) {
      const text = tokenizer.decode([id])
      if (/^[0-9]+$/.test(text)) digits.push(id)
      else if (/^[0-9]*\.[0-9]*$/.test(text)) points.push(id)
      else if (/^-[0-9]*$/.test(text)) minus.push(id)
      else continue
      longest = Math.max(longest, text.replace(/[.-]/, "").length)
    }
    found = { digits, points, minus, longest }
    numberTokens.set(tokenizer, found)
  }
  return found
}

/**
 * The tokens that write at least one visible character on their own (not whitespace only, not a special
 * token, no piece of a character): n of them in a row write at least n characters. Computed once.
 */
const visibleTokens = new WeakMap<TokenizerShape, ReadonlyArray<number>>()
const visibleTokensOf = (tokenizer: TokenizerShape) => {
  let found = visibleTokens.get(tokenizer)
  if (found === undefined) {
    const tokens: Array<number> = []
    for (let id = 0; id < tokenizer.vocabSize; id++) {
      const text = tokenizer.decode([id], { skipSpecialTokens: true })
      if (/\S/.test(text) && !text.includes("\uFFFD")) tokens.push(id)
    }
    found = tokens
    visibleTokens.set(tokenizer, found)
  }
  return found
}

/**
 * A text cut to at most `max` characters, whole code points only: within maxLength whether it counts code
 * points (JSON Schema) or UTF-16 units (JavaScript's length, zod's).
 */
const cut = (text: string, max: number): string => {
  let out = ""
  for (const point of text) {
    if (out.length + point.length > max) break
    out += point
  }
  return out
}

/**
 * A number slot's text read back as JSON: its longest leading number (a minus sign where the slot takes
 * one, digits, and for "number" a decimal point and digits), without leading zeros. The engine keeps the
 * slot to digits, so there is one; a slot without (a sign alone, or never written by the engine) reads as 0.
 */
const numberText = (text: string, kind: NumberKind): string => {
  const match = (kind === "integer" ? /^-?[0-9]+/ : /^-?[0-9]+(\.[0-9]+)?/).exec(text)
  if (match === null) return "0"
  return kind === "integer" ? BigInt(match[0]).toString() : JSON.stringify(Number(match[0]))
}

/** Lays a skeleton out with `slotTokens` positions per string or number value. */
export const layOut = (skeleton: Skeleton, slotTokens: number, tokenizer: TokenizerShape): JsonTemplate => {
  const template: Array<number> = []
  const pieces: Array<
    | { readonly fixed: string }
    | {
        readonly start: number
        readonly width: number
        readonly number?: NumberKind | undefined
        readonly maxChars?: number | undefined
        readonly optional?: boolean | undefined
      }
    | { readonly chosen: TemplateChoice }
  > = []
  const choices: Array<TemplateChoice> = []
  const special = tokenizer.specialTokens
  const ends = new Set([special.eos, ...Option.toArray(special.eot)])
  // Sets of the number slots' positions: [first of an integer or number, rest of an integer, rest of a number].
  const positionAllowed: Array<number> = []
  const allowedSets: Array<ReadonlyArray<number>> = []
  const setOf = new Map<string, number>()
  // The digits of upper bounds too tight for one token of this tokenizer.
  const narrow: Array<number> = []
  const useSet = (name: string, tokens: () => ReadonlyArray<number>) => {
    let index = setOf.get(name)
    if (index === undefined) {
      index = allowedSets.push(tokens()) - 1
      setOf.set(name, index)
    }
    return index
  }
  for (const part of skeleton.parts) {
    if ("fixed" in part) {
      template.push(...tokenizer.encode(part.fixed, { addSpecialTokens: false }))
      pieces.push(part)
    } else if ("choice" in part) {
      const values = valuesOf(part.choice, tokenizer)
      const choice = { start: template.length, width: widthOf(values), values }
      for (let i = 0; i < choice.width; i++) template.push(NOT_COMMITTED)
      choices.push(choice)
      pieces.push({ chosen: choice })
    } else {
      const kind = part.number
      let width = slotTokens
      if (kind !== undefined) {
        const { digits, points, minus, longest } = numberTokensOf(tokenizer)
        // Under an upper bound, no more tokens than its digits fill at the longest token's digits each.
        if (part.digits !== undefined) width = Math.min(slotTokens, Math.floor(part.digits / longest))
        if (width < 1) narrow.push(part.digits!)
        const firsts = () => [...(part.signed === true ? minus : []), ...digits, ...(part.optional === true ? ends : [])]
        const first = useSet(`first${part.signed === true ? "-signed" : ""}${part.optional === true ? "-optional" : ""}`, () =>
          firsts().sort((a, b) => a - b)
        )
        const rest = useSet(kind, () => [...digits, ...(kind === "number" ? points : []), ...ends])
        while (positionAllowed.length < template.length) positionAllowed.push(-1)
        for (let i = 0; i < width; i++) positionAllowed.push(i === 0 ? first : rest)
      } else {
        // A string at least minChars long: as many positions, each writing a visible character (no end token).
        if (part.minChars !== undefined) width = Math.max(width, part.minChars)
        if (part.maxChars !== undefined) width = Math.min(width, part.maxChars)
        if (part.minChars !== undefined) {
          const visible = useSet("visible", () => visibleTokensOf(tokenizer))
          while (positionAllowed.length < template.length) positionAllowed.push(-1)
          for (let i = 0; i < part.minChars; i++) positionAllowed.push(visible)
        }
      }
      pieces.push({ start: template.length, width, number: kind, maxChars: part.maxChars, optional: part.optional })
      for (let i = 0; i < width; i++) template.push(NOT_COMMITTED)
    }
  }
  return {
    template,
    slotTokens,
    choices,
    pad: padToken(tokenizer),
    positionAllowed,
    allowedSets,
    narrow,
    render: (canvas) =>
      withoutEmptyItems(
        pieces
          .map((piece) => {
            if ("fixed" in piece) return piece.fixed
            if ("chosen" in piece) {
              // The value's tokens, then its pads.
              const { start, width } = piece.chosen
              const tokens = Array.from({ length: width }, (_, k) => canvas[start + k]!).filter((t) => t !== NOT_COMMITTED)
              return tokenizer.decode(tokens).trim()
            }
            // A value ends where the model ended it (EOS, end of turn), as a plain answer does: what the model
            // wrote after that (a made-up next turn) is not the value.
            const tokens: Array<number> = []
            for (let i = piece.start; i < piece.start + piece.width; i++) {
              const token = canvas[i]!
              if (ends.has(token)) break
              if (token !== NOT_COMMITTED && token !== special.mask) tokens.push(token)
            }
            const text = tokenizer.decode(tokens, { skipSpecialTokens: true }).replace(/\s+/g, " ").trim()
            // An optional number the model left empty (or gave only a sign) is null, dropped with the list's empties.
            if (piece.number !== undefined)
              return piece.optional === true && !/^-?[0-9]/.test(text) ? "null" : numberText(text, piece.number)
            return JSON.stringify(piece.maxChars === undefined ? text : cut(text, piece.maxChars)).slice(1, -1)
          })
          .join(""),
        skeleton.lists ?? []
      )
  }
}

/**
 * The answer's JSON with each list's empty items (strings, numbers left null) dropped, down to its fewest
 * items (the first ones kept),
 * written again in the skeleton's spacing; the text as it is when there are no lists.
 */
const withoutEmptyItems = (text: string, lists: ReadonlyArray<ShortenableList>): string => {
  if (lists.length === 0) return text
  const value = JSON.parse(text) as Record<string, unknown>
  for (const { keys, min } of lists) {
    // The list's parent object or array, by the keys the skeleton recorded (the top is always an object).
    type Node = Record<string | number, unknown>
    let parent = value as Node
    for (const key of keys.slice(0, -1)) parent = parent[key] as Node
    const last = keys[keys.length - 1]!
    const items = parent[last] as ReadonlyArray<string | number | null>
    // Every item written, and as many empty ones (the first) as minItems still asks for: a string as "", a
    // number as 0.
    const empty = (item: string | number | null) => item === "" || item === null
    let empties = Math.max(0, min - items.filter((item) => !empty(item)).length)
    parent[last] = items.filter((item) => !empty(item) || empties-- > 0).map((item) => (item === null ? 0 : item))
  }
  return spacedJson(value)
}

// ---- a request's structured output -------------------------------------------------------------------

/** What a request asked for: a JSON schema to lay out, where it was given, and its answer length. */
export interface StructuredRequest {
  /** "text" or absent: plain text; "json_schema": lay `schema` out; anything else is refused. */
  readonly type: string | undefined
  readonly schema: unknown
  /** The request field holding the format ("response_format", "text.format", "guided_json"). */
  readonly param: string
  /** Where the schema itself is, for errors; default `${param}.schema` (response_format.json_schema.schema). */
  readonly schemaParam?: string
  /** The answer length the request asked for, if any: the slots share what the skeleton leaves. */
  readonly maxTokens: { readonly value: number; readonly param: string } | undefined
  /** Fields given that cannot be honoured with a template (stop, stop_token_ids, min_tokens, ignore_eos). */
  readonly conflicting: ReadonlyArray<string>
}

/** The fields a request set that a JSON template cannot honour: the answer is exactly the skeleton, which no stop cuts. */
export const templateConflicts = (request: {
  readonly stop?: unknown
  readonly stop_token_ids?: unknown
  readonly min_tokens?: number | undefined
  readonly ignore_eos?: boolean | undefined
}): ReadonlyArray<string> => [
  ...(request.stop === undefined ? [] : ["stop"]),
  ...(request.stop_token_ids === undefined ? [] : ["stop_token_ids"]),
  ...((request.min_tokens ?? 0) > 0 ? ["min_tokens"] : []),
  ...(request.ignore_eos === true ? ["ignore_eos"] : [])
]

/** A schema given as an object, or as its JSON text (vLLM takes both). */
const parsedSchema = (value: unknown, param: string) => {
  if (typeof value !== "string") return Effect.succeed(value)
  return Effect.try({
    try: () => JSON.parse(value) as unknown,
    catch: () => new BadRequest({ message: `${param} must be a JSON schema: an object, or its JSON text`, param })
  })
}

/**
 * The format a request (completions or chat) asks its answer to take, wherever it gives it:
 * response_format (text or json_schema), vLLM's guided_json, or structured_outputs.json; a 400 when it
 * gives a schema twice.
 */
export const requestedFormat = (request: {
  readonly response_format?: ResponseFormat | undefined
  readonly guided_json?: unknown
  readonly structured_outputs?: unknown
}) =>
  Effect.gen(function* () {
    const given: Array<{ readonly type: string; readonly schema: unknown; readonly param: string; readonly schemaParam: string }> = []
    const format = request.response_format
    if (format !== undefined && format.type !== "text") {
      given.push({
        type: format.type,
        schema: format.json_schema?.schema,
        param: "response_format",
        schemaParam: "response_format.json_schema.schema"
      })
    }
    if (request.guided_json !== undefined) {
      given.push({
        type: "json_schema",
        schema: yield* parsedSchema(request.guided_json, "guided_json"),
        param: "guided_json",
        schemaParam: "guided_json"
      })
    }
    const json = (request.structured_outputs as { json?: unknown } | null | undefined)?.json
    if (json !== undefined && json !== null) {
      const param = "structured_outputs.json"
      given.push({ type: "json_schema", schema: yield* parsedSchema(json, param), param, schemaParam: param })
    }
    if (given.length > 1) {
      return yield* new BadRequest({
        message: `give the answer's format once: ${given.map((g) => g.param).join(" and ")} were both given`,
        param: given[1]!.param
      })
    }
    return given[0]
  })

/**
 * The template of a request's structured output, undefined for plain text, or a 400 saying why it cannot
 * be honoured.
 */
export const planStructured = (request: StructuredRequest) =>
  Effect.gen(function* () {
    const { param, type } = request
    if (type === undefined || type === "text") return undefined
    if (type === "json_object") {
      return yield* new BadRequest({
        message:
          `${param} "json_object" is not supported: the keys of the object are not known, so its skeleton ` +
          `cannot be laid out on the canvas; use "json_schema" with the object's properties`,
        param,
        code: "unsupported_parameter"
      })
    }
    if (type !== "json_schema") {
      return yield* new BadRequest({
        message: `${param} "${type}" is not supported; "text" and "json_schema" are`,
        param,
        code: "unsupported_parameter"
      })
    }
    const schemaParam = request.schemaParam ?? (param === "response_format" ? "response_format.json_schema.schema" : `${param}.schema`)
    if (request.schema === undefined) {
      return yield* new BadRequest({ message: `${schemaParam} is required for "json_schema"`, param: schemaParam })
    }
    const conflict = request.conflicting[0]
    if (conflict !== undefined) {
      return yield* new BadRequest({
        message: `${conflict} cannot be used with structured output: the answer is exactly the JSON skeleton, which ends where the skeleton does and which no stop cuts`,
        param: conflict,
        code: "unsupported_parameter"
      })
    }
    return yield* templateOf(request.schema, { schemaParam, maxTokens: request.maxTokens })
  })

/** Whether a schema is of an object without keys (or absent): a function's parameters that take nothing. */
const takesNothing = (schema: unknown): boolean => {
  if (schema === undefined) return true
  if (!isObject(schema) || !(schema["type"] === undefined || schema["type"] === "object")) return false
  if (["const", "enum", "anyOf", "oneOf", "allOf", "$ref"].some((key) => key in schema)) return false
  const properties = schema["properties"]
  return properties === undefined || (isObject(properties) && Object.keys(properties).length === 0)
}

/**
 * A schema's skeleton laid out on the canvas (the slots sized by the answer length, when the request gave
 * one), or a 400 naming the place in the schema that cannot be honoured. `wrap` puts fixed text around
 * the schema's JSON (a tool call's name around its arguments).
 */
export const templateOf = (
  schema: unknown,
  options: {
    readonly schemaParam: string
    readonly maxTokens: StructuredRequest["maxTokens"]
    readonly wrap?: { readonly before: ReadonlyArray<string>; readonly after: string; readonly under: string }
    /** An object without properties is "{}" (a function that takes no arguments). */
    readonly emptyObject?: boolean
  }
) =>
  Effect.gen(function* () {
    const { schemaParam, wrap } = options
    const inner = options.emptyObject === true && takesNothing(schema) ? { parts: [{ fixed: "{}" }], slots: 0 } : skeletonOf(schema)
    if (isRefusal(inner)) {
      return yield* new BadRequest({
        message: `the schema cannot be honoured at ${inner.path.replace(/^schema/, schemaParam)}: ${inner.message}`,
        param: schemaParam,
        code: "unsupported_schema"
      })
    }
    const skeleton: Skeleton =
      wrap === undefined
        ? inner
        : {
            // Each piece of `before` is tokenized on its own.
            parts: [...wrap.before.map((fixed) => ({ fixed })), ...inner.parts, { fixed: wrap.after }],
            slots: inner.slots,
            lists: (inner.lists ?? []).map((list) => ({ ...list, keys: [wrap.under, ...list.keys] }))
          }
    const tokenizer = yield* Tokenizer
    const fixed = fixedTokens(skeleton, tokenizer)
    let slotTokens = skeleton.slots === 0 ? 0 : DEFAULT_SLOT_TOKENS
    if (options.maxTokens !== undefined && skeleton.slots > 0) {
      slotTokens = Math.floor((options.maxTokens.value - fixed) / skeleton.slots)
      if (slotTokens < 1) {
        return yield* new BadRequest({
          message:
            `${options.maxTokens.param} ${options.maxTokens.value} leaves no room for the values: the JSON ` +
            `skeleton takes ${fixed} tokens and each of its ${skeleton.slots} string values needs at least one`,
          param: options.maxTokens.param
        })
      }
    }
    const laid = layOut(skeleton, slotTokens, tokenizer)
    if (options.maxTokens !== undefined && laid.template.length > options.maxTokens.value) {
      return yield* new BadRequest({
        message:
          `${options.maxTokens.param} ${options.maxTokens.value} is too short for the schema's minLength: the answer ` +
          `takes ${laid.template.length} tokens with a position for each character a minLength asks for`,
        param: options.maxTokens.param
      })
    }
    if (laid.narrow.length > 0) {
      return yield* new BadRequest({
        message: `an upper bound that leaves ${laid.narrow[0]} digits is not supported with this model: one token of its tokenizer may hold more digits`,
        param: schemaParam,
        code: "unsupported_schema"
      })
    }
    if (laid.choices.length > 0 && laid.pad === -1) {
      return yield* new BadRequest({
        message:
          "enums and booleans are not supported with this model: its tokenizer has no single token for a space, which pads a chosen value",
        param: schemaParam,
        code: "unsupported_schema"
      })
    }
    const canvases = templateCanvasCount(laid.choices)
    if (canvases > MAX_CHOICE_CANVASES) {
      return yield* new BadRequest({
        message: `the schema's enums and booleans take ${canvases} canvases to score, more than ${MAX_CHOICE_CANVASES} (a value's tokens + 1 each)`,
        param: schemaParam,
        code: "unsupported_schema"
      })
    }
    return laid
  })
