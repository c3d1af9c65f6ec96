#!/usr/bin/env node
// Acceleration benchmark: vanilla denoising against the KV cache modes and parallel decoding, per answer
// length and batch size, with vdiff-cli bench.
//
//   node bench/acceleration.mjs --model DIR [--gen 128,256,512 --batch 1,8 --block 32 --prompt-len 32
//       --modes none,prefix,dual,dual+threshold --threshold 0.9 --threads 2 --skip none:8:512,...
//       --kv-cache-dtype f32|bf16 --prompt-ids 1,2,3 --json results.json]
//
// Every run uses steps = gen (the reference's one token per step; parallel decoding replaces that
// quota). A mode "<cache>+threshold" adds --threshold to that cache mode. --skip MODE:BATCH:GEN leaves
// a combination out (vanilla at batch 8 and gen 512 takes about an hour of CPU on two cores). Without
// --prompt-ids the prompt is --prompt-len random tokens, after which a trained model is rarely confident:
// parallel decoding wants a real prompt.
// Prints, per gen and batch: tokens/s (wall), tokens per CPU second (all threads: steadier on a shared
// machine), the speedup of each over vanilla, steps, forward passes per token, and the positions
// computed per token in whole canvases (what the cache cuts).
import { existsSync, readFileSync } from "node:fs"
import { join } from "node:path"
import { fixed, flags, list, log, report, root, run, runMain, table } from "./lib.mjs"

const opts = flags({
  model: undefined,
  cli: join(root, "build", "native", "vdiff-cli"),
  gen: "128,256,512",
  batch: "1,8",
  block: "32",
  "prompt-len": "32",
  modes: "none,prefix,dual,dual+threshold",
  threshold: "0.9",
  threads: "2",
  seed: "1",
  skip: "",
  "kv-cache-dtype": "f32",
  "prompt-ids": undefined,
  json: undefined
})

const benchOne = (gen, mode, batches) => {
  const [cache, extra] = mode.split("+")
  if (extra !== undefined && extra !== "threshold") throw new Error(`unknown mode "${mode}"`)
  const args = [
    "bench",
    "--model",
    opts.model,
    "--prompt-len",
    opts["prompt-len"],
    "--gen",
    String(gen),
    "--block",
    opts.block,
    "--steps",
    String(gen),
    "--batch",
    batches.join(","),
    "--threads",
    opts.threads,
    "--seed",
    opts.seed,
    "--kv-cache",
    cache,
    "--kv-cache-dtype",
    opts["kv-cache-dtype"],
    "--repeat",
    "0"
  ]
  if (extra === "threshold") args.push("--threshold", opts.threshold)
  if (opts["prompt-ids"] !== undefined) args.push("--prompt-ids", opts["prompt-ids"])
  log(`gen ${gen}, ${mode}, batch ${batches.join(",")} ...`)
  const out = JSON.parse(run(opts.cli, args))
  return out.denoise.map((d) => ({ gen, mode, loadAverage: out.load_average, ...d }))
}

const main = () => {
  if (opts.model === undefined) throw new Error("--model DIR is required (e.g. vdiff make-model --preset small --out DIR)")
  if (!existsSync(opts.cli)) throw new Error(`${opts.cli} not found: run npm run build:native first`)
  const skip = new Set(list(opts.skip))
  const results = []
  for (const gen of list(opts.gen).map(Number)) {
    for (const mode of list(opts.modes)) {
      const batches = list(opts.batch)
        .map(Number)
        .filter((b) => !skip.has(`${mode}:${b}:${gen}`))
      if (batches.length > 0) results.push(...benchOne(gen, mode, batches))
    }
  }

  const header = ["gen", "batch", "mode", "tok/s", "x", "tok/cpu-s", "x", "steps", "fwd/tok", "canvas/tok", "load"]
  const rows = [header]
  for (const r of results) {
    const vanilla = results.find((v) => v.gen === r.gen && v.batch === r.batch && v.mode === "none")
    rows.push([
      r.gen,
      r.batch,
      r.mode,
      fixed(r.tokens_per_s, 2),
      vanilla ? `${fixed(r.tokens_per_s / vanilla.tokens_per_s, 2)}` : "-",
      fixed(r.tokens_per_cpu_s, 2),
      vanilla ? `${fixed(r.tokens_per_cpu_s / vanilla.tokens_per_cpu_s, 2)}` : "-",
      r.steps,
      fixed(r.forwards_per_token, 3),
      fixed(r.canvas_forwards_per_token, 3),
      r.loadAverage.map((l) => fixed(l, 1)).join("/")
    ])
  }
  const config = JSON.parse(readFileSync(join(opts.model, "config.json"), "utf8"))
  const promptLength =
    opts["prompt-ids"] === undefined ? `${opts["prompt-len"]} random tokens` : `${list(opts["prompt-ids"]).length} given tokens`
  report(
    `model ${opts.model} (${config.n_layers} layers, d_model ${config.d_model}), prompt ${promptLength}, ` +
      `block ${opts.block}, steps = gen, threshold ${opts.threshold}, threads ${opts.threads}, ` +
      `kv cache ${opts["kv-cache-dtype"]}\n` +
      `x: speedup over mode none at the same gen and batch; fwd/tok: forward passes per answer token; ` +
      `canvas/tok: positions computed per token, in canvases; load: 1-minute load average before/after\n\n` +
      table(rows) +
      "\n",
    opts.json,
    results
  )
}

runMain(main)
