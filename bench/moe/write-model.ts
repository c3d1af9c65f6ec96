/**
 * bench/moe: writes a make-model preset straight into Q8_0 / Q4_0 (or unquantized, `--format none`: the
 * preset's own dtype) with the shards' data computed by the native writer bench/moe/fill.cpp (the
 * TypeScript writer makes a few million elements a second; the llada2-mini shape has 16.26 billion).
 * Everything else — the tensor list, the shards, each shard's header, config.json, the index — is
 * make-model's own code (makeModel with writeQuantizedShard / writeShard), and before writing, the native
 * writer is checked byte for byte against the TypeScript one on llada2-tiny (bf16, sharded) and
 * sdar-moe-tiny (f32).
 *
 * `--plan-only` writes everything but the shards: next to each shard name its header (NAME.header) and
 * its plan (NAME.plan.json, paths relative to the directory), so that `moe-fill NAME.plan.json` writes
 * the shard later on a machine without Node (bench/gpu/moe.sh on a lent GPU).
 *
 *   npx tsx bench/moe/write-model.ts --fill BIN --format q4_0|q8_0|none --out DIR [--preset llada2-mini]
 *     [--seed 1] [--threads 2] [--check-only] [--plan-only]
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { basename, join } from "node:path"
import { parseArgs } from "node:util"
import { makeModel, type PresetTensor, uniformKeys } from "../../src/model/makeModel.js"
import { isQuantizable, type QuantFormat, quantizedHeader, quantizedLayout } from "../../src/model/quantize.js"
import { encodeHeader, type TensorSource, tensorBytes } from "../../src/model/safetensors.js"

const { values: args } = parseArgs({
  options: {
    fill: { type: "string" },
    format: { type: "string", default: "q4_0" },
    out: { type: "string" },
    preset: { type: "string", default: "llada2-mini" },
    seed: { type: "string", default: "1" },
    threads: { type: "string", default: "2" },
    "check-only": { type: "boolean", default: false },
    "plan-only": { type: "boolean", default: false }
  }
})
if (args.fill === undefined || (args.out === undefined && !args["check-only"])) {
  console.error("usage: write-model.ts --fill BIN --format q4_0|q8_0|none --out DIR [--preset NAME] [--seed N] [--threads N] [--plan-only]")
  process.exit(2)
}
if (args.format !== "q4_0" && args.format !== "q8_0" && args.format !== "none") {
  throw new Error(`--format must be q4_0, q8_0 or none, got ${args.format}`)
}
/** The quantization, or none (`none`: the preset's dtype, unquantized). */
const format: QuantFormat | undefined = args.format === "none" ? undefined : args.format
const fill = args.fill
const planOnly = args["plan-only"]

/**
 * One shard through the native writer: its header and plan in files next to it, the data by moe-fill
 * (run now, the files removed after; with --plan-only kept for a later run, and the shard's size returned).
 */
const nativeShard = async (
  path: string,
  tensors: ReadonlyArray<TensorSource>,
  q: QuantFormat | undefined,
  metadata: Readonly<Record<string, string>>,
  later = false
): Promise<number> => {
  const headerPath = `${path}.header`
  const planPath = `${path}.plan.json`
  const header = q === undefined ? encodeHeader(tensors, metadata) : quantizedHeader(tensors, q, metadata)
  writeFileSync(headerPath, header)
  const plan = {
    path: later ? basename(path) : path,
    header: later ? basename(headerPath) : headerPath,
    format: q ?? "none",
    threads: Number(args.threads),
    tensors: tensors.map((t) => {
      const init = (t as PresetTensor).init
      if (init === undefined) throw new Error(`${t.name}: not a preset tensor`)
      const [rows, cols] = t.shape.length === 2 ? t.shape : [1, t.shape[0]!]
      return {
        dtype: t.dtype,
        rows,
        cols,
        quantize: q !== undefined && isQuantizable(t.name, t),
        ...(init.kind === "ones" ? { kind: "ones" } : { kind: "uniform", ...uniformKeys(init.seed, t.name, init.std) })
      }
    })
  }
  writeFileSync(planPath, JSON.stringify(plan))
  if (later) {
    const data =
      q === undefined ? tensors.reduce((n, t) => n + tensorBytes(t), 0) : quantizedLayout(tensors, q).reduce((n, t) => n + t.bytes, 0)
    return header.length + data
  }
  try {
    return Number(execFileSync(fill, [planPath], { encoding: "utf8" }).trim())
  } finally {
    rmSync(headerPath, { force: true })
    rmSync(planPath, { force: true })
  }
}

/** makeModel's shard writers for `q` through the native writer. */
const nativeWriters = (q: QuantFormat | undefined, later: boolean) =>
  q === undefined
    ? {
        writeShard: (path: string, tensors: ReadonlyArray<TensorSource>, metadata: Readonly<Record<string, string>>) =>
          nativeShard(path, tensors, undefined, metadata, later)
      }
    : {
        quantize: q,
        writeQuantizedShard: (
          path: string,
          tensors: ReadonlyArray<TensorSource>,
          fq: QuantFormat,
          metadata: Readonly<Record<string, string>>
        ) => nativeShard(path, tensors, fq, metadata, later)
      }

/** The native writer against the TypeScript one, every file byte for byte. */
const check = async (): Promise<void> => {
  const dir = mkdtempSync(join(tmpdir(), "vdiff-moe-check-"))
  try {
    for (const [preset, dtype, maxShardBytes] of [
      ["llada2-tiny", "BF16", 300_000],
      ["sdar-moe-tiny", "F32", undefined]
    ] as const) {
      const a = join(dir, `${preset}-ts`)
      const b = join(dir, `${preset}-native`)
      const common = {
        preset,
        seed: 5,
        dtype,
        ...(format !== undefined ? { quantize: format } : {}),
        ...(maxShardBytes !== undefined ? { maxShardBytes } : {})
      }
      await makeModel({ ...common, out: a })
      await makeModel({ ...common, out: b, ...nativeWriters(format, false) })
      const files = readdirSync(a).sort()
      if (files.join() !== readdirSync(b).sort().join()) throw new Error(`${preset}: different files`)
      for (const f of files) {
        if (!readFileSync(join(a, f)).equals(readFileSync(join(b, f)))) throw new Error(`${preset} ${format}: ${f} differs`)
      }
      console.error(`check: ${preset} ${dtype} ${args.format}: ${files.length} files equal to the TypeScript writer's`)
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

await check()
if (!args["check-only"]) {
  const started = performance.now()
  const written = await makeModel({
    preset: args.preset,
    seed: Number(args.seed),
    out: args.out!,
    ...nativeWriters(format, planOnly),
    onProgress: (line) => console.error(planOnly ? line.replace(/^wrote /, "planned ") : line)
  })
  console.log(JSON.stringify({ ...written, format: args.format, planOnly, seconds: (performance.now() - started) / 1000 }))
}
