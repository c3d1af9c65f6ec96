/**
 * bench/moe: writes a make-model preset straight into Q8_0 / Q4_0 with the shards' data computed by the
 * native writer bench/moe/fill.cpp (the TypeScript writer makes a few million elements a second; the
 * llada2-mini shape has 16.26 billion). Everything else — the tensor list, the shards, each shard's
 * header, config.json, the index — is make-model's own code (makeModel with writeQuantizedShard), and
 * before writing, the native writer is checked byte for byte against the TypeScript one on llada2-tiny
 * (bf16, sharded) and sdar-moe-tiny (f32).
 *
 *   npx tsx bench/moe/write-model.ts --fill BIN --format q4_0|q8_0 --out DIR [--preset llada2-mini] [--seed 1]
 *     [--threads 2] [--check-only]
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { makeModel, type PresetTensor, uniformKeys } from "../../src/model/makeModel.js"
import { isQuantizable, type QuantFormat, quantizedHeader } from "../../src/model/quantize.js"
import type { TensorSource } from "../../src/model/safetensors.js"

const { values: args } = parseArgs({
  options: {
    fill: { type: "string" },
    format: { type: "string", default: "q4_0" },
    out: { type: "string" },
    preset: { type: "string", default: "llada2-mini" },
    seed: { type: "string", default: "1" },
    threads: { type: "string", default: "2" },
    "check-only": { type: "boolean", default: false }
  }
})
if (args.fill === undefined || (args.out === undefined && !args["check-only"])) {
  console.error("usage: write-model.ts --fill BIN --format q4_0|q8_0 --out DIR [--preset NAME] [--seed N] [--threads N]")
  process.exit(2)
}
const format = args.format as QuantFormat
if (format !== "q4_0" && format !== "q8_0") throw new Error(`--format must be q4_0 or q8_0, got ${args.format}`)
const fill = args.fill

/** One shard through the native writer: the plan and header in temporary files, the data by moe-fill. */
const nativeShard = async (
  path: string,
  tensors: ReadonlyArray<TensorSource>,
  q: QuantFormat,
  metadata: Readonly<Record<string, string>>
): Promise<number> => {
  const headerPath = `${path}.header`
  const planPath = `${path}.plan.json`
  writeFileSync(headerPath, quantizedHeader(tensors, q, metadata))
  const plan = {
    path,
    header: headerPath,
    format: q,
    threads: Number(args.threads),
    tensors: tensors.map((t) => {
      const init = (t as PresetTensor).init
      if (init === undefined) throw new Error(`${t.name}: not a preset tensor`)
      const [rows, cols] = t.shape.length === 2 ? t.shape : [1, t.shape[0]!]
      return {
        dtype: t.dtype,
        rows,
        cols,
        quantize: isQuantizable(t.name, t),
        ...(init.kind === "ones" ? { kind: "ones" } : { kind: "uniform", ...uniformKeys(init.seed, t.name, init.std) })
      }
    })
  }
  writeFileSync(planPath, JSON.stringify(plan))
  try {
    return Number(execFileSync(fill, [planPath], { encoding: "utf8" }).trim())
  } finally {
    rmSync(headerPath, { force: true })
    rmSync(planPath, { force: true })
  }
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
      const common = { preset, seed: 5, dtype, quantize: format, ...(maxShardBytes !== undefined ? { maxShardBytes } : {}) }
      await makeModel({ ...common, out: a })
      await makeModel({ ...common, out: b, writeQuantizedShard: nativeShard })
      const files = readdirSync(a).sort()
      if (files.join() !== readdirSync(b).sort().join()) throw new Error(`${preset}: different files`)
      for (const f of files) {
        if (!readFileSync(join(a, f)).equals(readFileSync(join(b, f)))) throw new Error(`${preset} ${format}: ${f} differs`)
      }
      console.error(`check: ${preset} ${dtype} ${format}: ${files.length} files equal to the TypeScript writer's`)
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
    quantize: format,
    writeQuantizedShard: nativeShard,
    onProgress: (line) => console.error(line)
  })
  console.log(JSON.stringify({ ...written, format, seconds: (performance.now() - started) / 1000 }))
}
